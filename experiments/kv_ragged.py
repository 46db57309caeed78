"""The ragged KV cache against the padded one (issue 41, item 1), two ways interleaved in one run.

padded: engine/kv.py's SlotKVCache, one left-padded rectangle (the engine's cache before the
ragged one; now transformers' forward's); ragged: RaggedKVCache, each row as long as itself. Both
run models/decode.py's forward and ModelRunner's feed/accept, as the engine does.

(a) --verify: the verify pass at batch 1 (the last committed token and n-1 proposals after a
    prompt, then a rollback), median seconds per n and the ratio ragged / padded. It must not move.
(b) --beside: a batch of --short rows of about 100 tokens beside one row of --long-tokens ids
    (prefilled once, ragged; the padded way gets the same keys and values, left-padded), and the
    short rows alone: median seconds of a pass of n=5 positions per row (a verify step at k=4), and
    the bytes of keys and values one short row holds.

Prints a table and, last, one JSON line.

    /tmp/runs/inbench.sh .venv/bin/python experiments/kv_ragged.py --verify --target qwen2.5-coder-1.5b
    /tmp/runs/inbench.sh .venv/bin/python experiments/kv_ragged.py --beside --target smollm2-135m --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from onspec.engine.kv import RaggedKVCache, SlotKVCache
from onspec.engine.runner import ModelRunner
from onspec.models.decode import decode_forward
from onspec.models.loading import load_model

WAYS = ("padded", "ragged")


def padded_runner(model, batch: int) -> ModelRunner:
    runner = ModelRunner(model, batch, decode_forward(model))
    runner.kv = SlotKVCache(batch, "cpu", next(model.parameters()).dtype)
    return runner


def as_padded(ragged: RaggedKVCache, dtype: torch.dtype) -> SlotKVCache:
    """The same keys and values as one left-padded rectangle of slots (what SlotKVCache holds after
    the same rows joined a batch)."""
    slots = max(ragged.lens)
    out = SlotKVCache(ragged.batch_size, "cpu", dtype)
    cache = DynamicCache()
    for i in range(ragged.layers):
        kv = []
        for j in (0, 1):
            rows = []
            for store, n in zip(ragged.rows, ragged.lens):
                t = store[i, j, :, :n]  # [kv_heads, n, dim]
                rows.append(torch.cat([t.new_zeros(t.shape[0], slots - n, t.shape[2]), t], 1))
            kv.append(torch.stack(rows))  # [batch, kv_heads, slots, dim]
        cache.update(kv[0], kv[1], i)
    out.cache = cache
    out.valid = torch.stack([torch.arange(slots) >= slots - n for n in ragged.lens])
    return out


def row_bytes(kv, row: int) -> int:
    """Bytes of keys and values `row` holds: its own tensor (ragged), or its share of the rectangle."""
    if isinstance(kv, RaggedKVCache):
        return kv.nbytes(row)
    return sum(t.numel() * t.element_size() for layer in kv.cache.layers
               for t in (layer.keys, layer.values)) // kv.batch_size


def step(runner: ModelRunner, n: int, token: int) -> float:
    """One pass of the pending token and n-1 proposals per row, then roll the proposals back."""
    batch = len(runner.pending)
    extra = torch.full((batch, n - 1), token, dtype=torch.long) if n > 1 else None
    t0 = time.perf_counter()
    runner.feed(extra)
    dt = time.perf_counter() - t0
    runner.accept([0] * batch, [[token]] * batch)
    return dt


def verify(model, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 10000, (args.prompt_tokens,), generator=g).tolist()
    runners = {"padded": padded_runner(model, 1), "ragged": ModelRunner(model, 1, decode_forward(model))}
    for r in runners.values():
        r.prefill([prompt])
    rows = []
    for n in args.ns:
        times = {w: [] for w in WAYS}
        for rep in range(args.repeats + 1):
            for w in (WAYS if rep % 2 else WAYS[::-1]):
                dt = step(runners[w], n, prompt[-1])
                if rep:
                    times[w].append(dt)
        med = {w: statistics.median(t) for w, t in times.items()}
        rows.append({"n": n, "padded_ms": 1e3 * med["padded"], "ragged_ms": 1e3 * med["ragged"],
                     "ratio": med["ragged"] / med["padded"]})
    return rows


def beside(model, args) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    shorts = [torch.randint(100, 10000, (90 + 7 * i,), generator=g).tolist() for i in range(args.short)]
    long = torch.randint(100, 10000, (args.long_tokens,), generator=g).tolist()
    t0 = time.perf_counter()
    big = ModelRunner(model, 1, decode_forward(model))
    start = 0
    while start < len(long) - 1:
        start = big.prefill([long], start, 512)
    prefill_s = time.perf_counter() - t0
    alone = ModelRunner(model, args.short, decode_forward(model))
    alone.prefill(shorts)
    both = ModelRunner(model, args.short, decode_forward(model))
    both.prefill(shorts)
    both.extend(big)  # the long row joins the short ones
    runners = {("alone", "ragged"): alone, ("beside", "ragged"): both}
    for where, src in (("alone", alone), ("beside", both)):
        r = padded_runner(model, src.kv.batch_size)
        r.kv, r.pending = as_padded(src.kv, dtype), [list(p) for p in src.pending]
        runners[where, "padded"] = r
    keys = [("alone", "padded"), ("alone", "ragged"), ("beside", "padded"), ("beside", "ragged")]
    times = {key: [] for key in keys}
    for rep in range(args.repeats + 1):
        for key in (keys if rep % 2 else keys[::-1]):
            dt = step(runners[key], 5, shorts[0][-1])
            if rep:
                times[key].append(dt)
    rows = []
    for key in keys:
        rows.append({"rows": key[0], "way": key[1], "step_ms": 1e3 * statistics.median(times[key]),
                     "short_row_kib": row_bytes(runners[key].kv, 0) / 1024,
                     "batch_kib": sum(row_bytes(runners[key].kv, b) for b in range(runners[key].kv.batch_size)) / 1024})
    base = {r["way"]: r["step_ms"] for r in rows if r["rows"] == "alone"}
    for r in rows:
        r["vs_alone"] = r["step_ms"] / base[r["way"]]
    rows.append({"long_prefill_s": prefill_s})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--verify", action="store_true", help="(a) the verify pass at batch 1")
    ap.add_argument("--beside", action="store_true", help="(b) short rows beside a long one")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="(a) tokens cached before the verify passes")
    ap.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 9],
                    help="(a) positions per verify pass")
    ap.add_argument("--short", type=int, default=8, help="(b) short rows")
    ap.add_argument("--long-tokens", type=int, default=8180, help="(b) ids in the long row")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.target, dtype=args.dtype).model
    result = {"target": args.target, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "repeats": args.repeats}
    console = Console()
    with torch.no_grad():
        if args.verify:
            result["verify"] = verify(model, args)
            table = Table(title=f"(a) verify pass at batch 1 after {args.prompt_tokens} tokens, {args.target}")
            for c in ("n", "padded ms", "ragged ms", "ragged / padded"):
                table.add_column(c, justify="right")
            for r in result["verify"]:
                table.add_row(str(r["n"]), f"{r['padded_ms']:.2f}", f"{r['ragged_ms']:.2f}", f"{r['ratio']:.3f}")
            console.print(table)
        if args.beside:
            result["beside"] = beside(model, args)
            table = Table(title=f"(b) {args.short} short rows (~100 tokens) beside {args.long_tokens} ids, a pass of 5 "
                                f"positions per row, {args.target}")
            for c in ("rows", "way", "step ms", "vs alone", "KiB one short row holds", "KiB the batch holds"):
                table.add_column(c, justify="right")
            for r in result["beside"][:-1]:
                table.add_row(r["rows"], r["way"], f"{r['step_ms']:.1f}", f"{r['vs_alone']:.2f}",
                              f"{r['short_row_kib']:.0f}", f"{r['batch_kib']:.0f}")
            console.print(table)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
