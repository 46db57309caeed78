"""Which online-learning setting raises the draft's agreement on *new* queries: a cheap sweep
before an hours-long `onspec replay`. The default pair serves `--prompts` queries once (static
draft; the engine keeps the target's top-32 per token, as when serving; cached in `--cache`). Then
each way replays those served requests in order through the real distiller and buffer, as the
trainer would see them: before a block of `update_interval` requests joins the buffer, the current
student's greedy agreement with the target on that block is measured (teacher-forced on the served
text: the prequential alpha proxy; the block is new to the student), then the block is added and one
update is taken (guard included). The static way takes no updates. Ways differ only in trainer
options (`--ways`, ';'-separated, each a ','-list of option=value over `--base`).
Prints a table and, last, one JSON line.

With `--draft-layers M` every way's student is a derived draft instead: the draft's first M decoder
layers with its own final norm and head (`truncated`), trained whole (the default base is
`train_layers=M`). The run then also prices it: c = one single-position forward of the M-layer
draft as it would run (int8 via FastDraft, with the full head and with a reduced 32k head) over one
single-position pass of the packed bf16 target (and the whole draft's c beside it, for reference).
Each way reports its trainer seconds per update and per trained token, and the peak resident
memory it added (VmHWM, reset per way through /proc/self/clear_refs, less VmRSS before the way).

    .venv/bin/python experiments/online_sweep.py --dataset sharegpt --prompts 96 \\
        --ways "static;lr=1e-4;lr=2e-5;lora_rank=16,lr=2e-4" --plot sweep.png
    .venv/bin/python experiments/online_sweep.py --dataset humaneval --prompts 64 --draft-layers 4 \\
        --ways "static;lr=1e-3,steps=8;lr=3e-4,steps=8" --out docs/results/derived-draft-learner
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import fields
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from onspec.bench.report import save_json
from onspec.config import add_arguments, from_args
from onspec.data.streams import iter_queries
from onspec.engine.build import draft_vocab, make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.records import Example
from onspec.engine.sampling import SamplingParams
from onspec.models.fast_draft import FastDraft
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.buffer import ReplayBuffer
from onspec.online.distiller import Distiller, TrainerConfig

BASE = "train_layers=2,freeze_head=true,lr=1e-4"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--dataset", default="sharegpt")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--skip", type=int, default=0, help="queries of the stream skipped first")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--base", default=None, help=f"trainer options every way starts from (default: {BASE}; "
                    "with --draft-layers M: train_layers=M)")
    ap.add_argument("--ways", default="static;lr=1e-4;lr=2e-5;lora_rank=16,lr=2e-4")
    ap.add_argument("--plot", default=None, help="write agreement per block, every way, to this PNG")
    ap.add_argument("--cache", default=None, help="served requests cache (default: runs/sweep-<dataset>-<skip>-<n>.pt)")
    ap.add_argument("--draft-layers", type=int, default=0,
                    help="every way's student is the draft's first M layers + its final norm and head (0: the whole draft)")
    ap.add_argument("--cost-repeats", type=int, default=200,
                    help="with --draft-layers: timed single-position forwards per model for c (0: skip)")
    ap.add_argument("--cost-vocab", type=int, default=32768, help="ids of the reduced head priced for c")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for summary.json, rewritten after every way (partial results)")
    args = ap.parse_args()
    if args.base is None:
        args.base = f"train_layers={args.draft_layers}" if args.draft_layers else BASE
    console = Console(stderr=True)
    # every way on the base options (the same numerics: static too, it only never updates)
    ways = {w.strip(): _config(args.base + ("" if w.strip() == "static" else "," + w.strip()))
            for w in args.ways.split(";") if w.strip()}
    cache = Path(args.cache or f"runs/sweep-{args.dataset}-{args.skip}-{args.prompts}-{args.max_new_tokens}.pt")
    target, draft = load_pair(ModelConfig(target=args.target))
    examples, serve_tok_s = _served(args, target, draft, cache, console)
    student = truncated(draft.model, args.draft_layers) if args.draft_layers else draft.model
    result = {"dataset": args.dataset, "prompts": len(examples), "base": args.base, "serve_tok_s": serve_tok_s,
              "draft_layers": args.draft_layers or len(draft.model.base_model.layers), "ways": {}}
    if args.draft_layers and args.cost_repeats:
        result["cost"] = draft_cost(target, draft.model, student, examples[0], args.cost_repeats, args.cost_vocab, console)
        result["coverage"] = _coverage(examples, result["cost"].pop("vocab_ids"))
        save_json(args.out, result)
    del target
    rows = result["ways"]
    for name, cfg in ways.items():
        t0 = time.perf_counter()
        rows[name] = _replay(examples, student, cfg, learn=name != "static", console=console, name=name)
        rows[name]["wall_s"] = time.perf_counter() - t0
        console.print(f"{name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'options'})}")
        save_json(args.out, result)
    static = rows.get("static")
    table = Table(title=f"prequential greedy agreement on {len(examples)} {args.dataset} requests served once "
                        f"(blocks of --update-interval requests; base: {args.base})")
    for col in ("way", "all", "first half", "last half", "last 20%", "last 20% vs static",
                "taught block before -> after", "updates", "rolled back", "s / update", "ms / trained token",
                "peak MB added", "trained params"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        delta = "" if static is None else f"{r['last_20'] - static['last_20']:+.3f}"
        table.add_row(name, f"{r['all']:.3f}", f"{r['first_half']:.3f}", f"{r['last_half']:.3f}", f"{r['last_20']:.3f}",
                      delta, "" if r["seen_after"] is None else f"{r['seen_before']:.3f} -> {r['seen_after']:.3f}",
                      str(r["updates"]), str(r["rollbacks"]),
                      "" if not r["update_s"] else f"{r['update_s']:.1f}",
                      "" if not r["s_per_trained_token"] else f"{1e3 * r['s_per_trained_token']:.1f}",
                      "" if r["peak_mb_added"] is None else f"{r['peak_mb_added']:.0f}",
                      f"{r['trained_parameters'] / 1e6:.1f}M")
    Console(file=sys.stdout, width=200).print(table)
    if "cost" in result:
        Console(file=sys.stdout, width=200).print(cost_table(result["cost"]))
    anatomy = disagreements(examples, student, _config(args.base))
    Console(file=sys.stdout, width=180).print(anatomy_table(anatomy))
    result["disagreements"] = anatomy
    save_json(args.out, result)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result))
    return 0


def plot(result: dict, path: str) -> None:
    """Agreement per block of requests (before the block is trained on), one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, r in result["ways"].items():
        n = r["options"]["update_interval"]
        ax.plot([n * (i + 1) for i in range(len(r["per_block"]))], r["per_block"], label=name,
                lw=2.5 if name == "static" else 1.2, color="black" if name == "static" else None)
    ax.set_xlabel("requests served")
    ax.set_ylabel("greedy agreement on the next block (new requests)")
    ax.set_title(f"{result['dataset']}, {result['prompts']} requests; base {result['base']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def truncated(draft: torch.nn.Module, m: int) -> torch.nn.Module:
    """The draft's first `m` decoder layers with its own final norm and head: a new module over
    the same parameter tensors (nothing copied; the draft itself is unchanged)."""
    layers = draft.base_model.layers
    if not 1 <= m <= len(layers):
        raise SystemExit(f"--draft-layers must be in [1, {len(layers)}] for this draft, got {m}")
    shared = {id(t): t for t in list(draft.parameters()) + list(draft.buffers())}
    out = copy.deepcopy(draft, memo=shared)
    out.base_model.layers = torch.nn.ModuleList(list(out.base_model.layers)[:m])
    out.config.num_hidden_layers = m
    if getattr(out.config, "layer_types", None):
        out.config.layer_types = out.config.layer_types[:m]
    return out.eval()


def draft_cost(target, draft: torch.nn.Module, student: torch.nn.Module, example: Example, repeats: int,
               vocab: int, console) -> dict:
    """c = single-position forward of each running draft / that of the packed target, after
    `example`'s tokens (prefilled once per model): the M-layer draft and, for reference, the whole
    draft, each int8 with its full head and with a reduced head of `vocab` ids. `repeats` timed
    forwards per model in 10 rounds, rotating the order, so drift and other processes' load hit every
    model alike. Reports the median and the 10th percentile (a shared CPU's load only adds time: the
    low percentile is the nearer estimate of an unloaded forward)."""
    from onspec.engine.runner import ModelRunner

    ids = draft_vocab(target.model, target.tokenizer, vocab).ids
    models = {"target": target.model}
    for label, m in (("M layers", student), ("whole draft", draft)):
        models[f"{label}, int8, full head"] = FastDraft(m, None, quant="int8").model
        models[f"{label}, int8, {vocab // 1024}k head"] = FastDraft(m, ids, quant="int8").model
    prompt = example.tokens.tolist()
    runners = {}
    with torch.no_grad():
        for key, model in models.items():
            runners[key] = ModelRunner(model, 1)
            runners[key].prefill([prompt])
    rounds = 10
    per_round = max(1, repeats // rounds)
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    with torch.no_grad():
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                for i in range(per_round + 1):  # the first forward of each turn warms up
                    t0 = time.perf_counter()
                    runners[key].feed(None)
                    if i:
                        times[key].append(time.perf_counter() - t0)
                    runners[key].accept([0], [[prompt[-1]]])  # one token stays pending, the cache is unchanged
            console.print(f"cost round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {1e3 * statistics.median(v[-per_round:]):.1f} ms" for k, v in times.items()))

    def pct(v: list[float], q: float) -> float:
        return 1e3 * sorted(v)[int(q * (len(v) - 1))]

    ms = {k: pct(v, 0.5) for k, v in times.items()}
    ms_p10 = {k: pct(v, 0.1) for k, v in times.items()}
    return {"context_tokens": len(prompt), "forwards_per_model": rounds * per_round, "ms": ms, "ms_p10": ms_p10,
            "c": {k: v / ms["target"] for k, v in ms.items() if k != "target"},
            "c_p10": {k: v / ms_p10["target"] for k, v in ms_p10.items() if k != "target"}, "vocab_ids": ids}


def cost_table(cost: dict) -> Table:
    t = Table(title=f"c: one single-position forward / one packed bf16 target pass ({cost['forwards_per_model']} "
                    f"each, {cost['context_tokens']} tokens of context; target median {cost['ms']['target']:.1f} ms, "
                    f"10th percentile {cost['ms_p10']['target']:.1f} ms)")
    for col in ("running draft", "median ms", "c (medians)", "p10 ms", "c (p10s)"):
        t.add_column(col, justify="right")
    for k, c in cost["c"].items():
        t.add_row(k, f"{cost['ms'][k]:.1f}", f"{c:.3f}", f"{cost['ms_p10'][k]:.1f}", f"{cost['c_p10'][k]:.3f}")
    return t


def _coverage(examples: list[Example], ids: torch.Tensor) -> float:
    """Share of the target's greedy tokens inside the reduced head's ids (its agreement's ceiling)."""
    top = torch.cat([e.top_ids[:, 0].long() for e in examples])
    return float(torch.isin(top, ids).float().mean())


def _rss_kb(field: str) -> int | None:
    """VmRSS or VmHWM (peak) of this process in kB (None where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


BANDS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.01)
"""Bands of the target's top-1 probability at a position."""


@torch.no_grad()
def disagreements(examples: list[Example], draft, cfg: TrainerConfig) -> dict:
    """Where the static draft's greedy choice differs from the target's, and how sure the target
    was there: per band of the target's top-1 probability, the positions and the draft's
    agreement; among disagreements, how often the target's choice was the draft's second, and how
    often the target itself was at a near-tie (top-1 minus top-2 below 0.1). A position where the
    target's own top-1 is at 0.4 is one no draft predicts reliably: this bounds what learning can add."""
    d = Distiller(draft, cfg)
    hits, top1, margin, second = [], [], [], []
    for i in range(0, len(examples), 8):
        logits, top_ids, top_probs, _ = d._student_logits(examples[i: i + 8], grad=False)
        two = logits.topk(2, dim=-1).indices  # [M, 2]
        hits.append(two[:, 0] == top_ids[:, 0])
        second.append(two[:, 1] == top_ids[:, 0])
        top1.append(top_probs[:, 0])
        margin.append(top_probs[:, 0] - top_probs[:, 1])
    hits, second, top1, margin = (torch.cat(x) for x in (hits, second, top1, margin))
    wrong = ~hits
    bands = []
    for lo, hi in zip(BANDS, BANDS[1:]):
        inside = (top1 >= lo) & (top1 < hi)
        bands.append({"target_top1": f"{lo:.1f}-{min(hi, 1.0):.1f}", "positions": int(inside.sum()),
                      "share": float(inside.float().mean()),
                      "agreement": float(hits[inside].float().mean()) if inside.any() else None,
                      "share_of_disagreements": float((wrong & inside).sum() / max(1, int(wrong.sum())))})
    return {"positions": len(hits), "agreement": float(hits.float().mean()), "disagreements": int(wrong.sum()),
            "target_was_draft_second": float(second[wrong].float().mean()) if wrong.any() else None,
            "target_near_tie": float((margin[wrong] < 0.1).float().mean()) if wrong.any() else None,
            # the agreement a draft would reach if it stopped disagreeing wherever the target's top-1 is
            # at least t (and nowhere else): what a learner can add without predicting the target's coin flips
            "ceiling": {f"{t:.1f}": float((hits | (top1 >= t)).float().mean()) for t in (0.9, 0.7, 0.5)},
            "bands": bands}


def anatomy_table(a: dict) -> Table:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0%}"

    t = Table(title=f"static draft vs target, {a['positions']} positions: agreement {a['agreement']:.3f}; of the "
                    f"{a['disagreements']} disagreements the target's choice was the draft's 2nd in "
                    f"{pct(a['target_was_draft_second'])}, and the target was at a near-tie (top-1 - top-2 < 0.1) "
                    f"in {pct(a['target_near_tie'])}. Agreement if every disagreement where the target's top-1 >= t were "
                    f"fixed: " + ", ".join(f"t={t}: {v:.3f}" for t, v in a["ceiling"].items()))
    for col in ("target top-1 prob", "positions", "share", "draft agreement", "share of disagreements"):
        t.add_column(col, justify="right")
    for b in a["bands"]:
        t.add_row(b["target_top1"], str(b["positions"]), f"{b['share']:.3f}",
                  "" if b["agreement"] is None else f"{b['agreement']:.3f}", f"{b['share_of_disagreements']:.3f}")
    return t


def _config(spec: str) -> TrainerConfig:
    """A TrainerConfig from 'option=value,...' (a later value wins), read by the CLI's own flags
    (onspec.config: the same types, choices and range checks as `onspec replay`)."""
    values = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        values[key] = value
    known = {f.name: f for f in fields(TrainerConfig)}
    argv = []
    for key, value in values.items():
        if key not in known:
            raise SystemExit(f"unknown trainer option {key!r} in --ways/--base")
        flag = "--" + key.replace("_", "-")
        if isinstance(known[key].default, bool):  # a switch: given when true
            argv += [flag] if value.lower() in ("1", "true", "yes") else []
        else:
            argv += [flag, value]
    parser = argparse.ArgumentParser(prog="online_sweep.py --ways/--base")
    add_arguments(parser, TrainerConfig)
    return from_args(TrainerConfig, parser.parse_args(argv), background=False)


def _served(args, target, draft, cache: Path, console) -> tuple[list[Example], float | None]:
    if cache.is_file():
        data = torch.load(cache, weights_only=False)
        console.print(f"served requests from {cache}")
        return [Example(**e) for e in data["examples"]], data.get("serve_tok_s")
    engine = make_engine(target.model, target.tokenizer, draft.model, EngineConfig(), PolicyConfig())
    engine.teacher_top_k = TrainerConfig().teacher_top_k
    queries = list(islice(iter_queries(args.dataset), args.skip, args.skip + args.prompts))
    examples, t0 = [], time.perf_counter()
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    for i, q in enumerate(queries):
        engine.generate([Request(q.encode(target.tokenizer), params)], on_finish=lambda o: examples.append(o.example))
        if (i + 1) % 16 == 0:
            console.print(f"served {i + 1}/{len(queries)}")
    serve_tok_s = sum(e.num_positions for e in examples) / (time.perf_counter() - t0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"examples": [vars(e) for e in examples], "serve_tok_s": serve_tok_s}, cache)
    return examples, serve_tok_s


def _tally(counts: dict, examples: list[Example]) -> tuple[int, int]:
    """(matching positions, positions) of `examples` from the distiller's per-example probe counts."""
    return sum(counts[id(e)][1] for e in examples), sum(counts[id(e)][2] for e in examples)


def _replay(examples: list[Example], draft, cfg: TrainerConfig, learn: bool, console, name: str) -> dict:
    reset = _reset_peak()
    rss0 = _rss_kb("VmRSS")
    d = Distiller(draft, cfg)
    buffer = ReplayBuffer(cfg.buffer_tokens, cfg.probe_every, cfg.probe_size, cfg.seed, cfg.max_buffer_records)
    per_block = []  # (matching positions, positions) of each block before it was trained on
    update_s = []
    seen = []  # per update: ((matching, positions) on its block's trained requests before, after)
    n = cfg.update_interval
    for i in range(0, len(examples), n):
        block = examples[i: i + n]
        counts = d._probe_counts(block, reuse=False)
        per_block.append(_tally(counts, block))
        kept = [e for e in block if buffer.add(e) == "train"]
        if learn and len(block) == n:
            entry = d.update(buffer)
            if entry is not None:
                update_s.append(entry.seconds)
            # the same block's trained requests after the update that saw them: what the update
            # learnt where it was taught (in-sample), beside what it carried to new requests
            seen.append((_tally(counts, kept), _tally(d._probe_counts(kept, reuse=False), kept)))
        m, t = per_block[-1]
        console.print(f"{name}: {i + len(block)}/{len(examples)} requests, block agreement {m / max(1, t):.3f} "
                      f"(before its update), v{d.version}, {d.rollbacks} rolled back"
                      + (f", update {update_s[-1]:.1f} s" if learn and update_s else ""))

    def share(lo: float, hi: float) -> float:
        part = per_block[int(lo * len(per_block)): max(int(lo * len(per_block)) + 1, int(hi * len(per_block)))]
        return sum(m for m, _ in part) / max(1, sum(t for _, t in part))

    def seen_share(i: int) -> float | None:
        return sum(x[i][0] for x in seen) / sum(x[i][1] for x in seen) if seen else None

    return {"all": share(0, 1), "first_half": share(0, 0.5), "last_half": share(0.5, 1), "last_20": share(0.8, 1),
            "per_block": [m / max(1, t) for m, t in per_block],
            "seen_before": seen_share(0), "seen_after": seen_share(1), "updates": d.updates, "rollbacks": d.rollbacks,
            "update_s": statistics.mean(update_s) if update_s else None,
            "trainer_s": d.trainer_time_s, "trained_tokens": d.trained_tokens,
            "s_per_trained_token": d.trainer_time_s / d.trained_tokens if d.trained_tokens else None,
            "peak_mb_added": (_rss_kb("VmHWM") - rss0) / 1024 if reset and rss0 is not None else None,
            "trained_parameters": sum(p.numel() for p in d.trainable.values()) if learn else 0,
            "options": {k: v for k, v in vars(cfg).items() if k != "background"}}


if __name__ == "__main__":
    sys.exit(main())
