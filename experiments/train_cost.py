"""What one training step of the online distiller costs on this machine, by how much of the draft
is trained (`--train-layers`, `--freeze-head`): every layer (0) against only the top N layers from
kept boundary states, with the output head trained or frozen. The examples are real: the default
pair serves `--prompts` prompts (the engine keeps the target's top-32 per token, as when serving);
then each way takes the same batches, interleaved.
Reports seconds per step and per trained token, the one-time boundary cost per buffered token,
the trainer's memory (its own tensors: student copies not shared with the serving draft, gradients,
AdamW state) and bytes per buffered token. Prints a table and, last, one JSON line.

    .venv/bin/python experiments/train_cost.py --prompts 8 --layers 0,4,2 --freeze-head both
    .venv/bin/python experiments/train_cost.py --prompts 8 --layers 2 --freeze-head on --lora-ranks 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import islice

import torch
from rich.console import Console
from rich.table import Table

from onspec.data.streams import iter_queries
from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.distiller import Distiller, TrainerConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--layers", default="0,4,2", help="train-layers values to compare (0 = every layer)")
    ap.add_argument("--freeze-head", choices=("off", "on", "both"), default="off",
                    help="each --layers value with the head trained (off), frozen (on) or both")
    ap.add_argument("--lora-ranks", default="", help="also each --layers value trained through LoRA adapters of "
                    "these ranks (','-list; head frozen)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per way (after one warm-up step)")
    args = ap.parse_args()
    heads = {"off": (False,), "on": (True,), "both": (False, True)}[args.freeze_head]
    ranks = [int(r) for r in args.lora_ranks.split(",") if r.strip()]
    ways = [(int(x), frozen, 0) for x in args.layers.split(",") for frozen in heads]
    ways += [(int(x), True, r) for x in args.layers.split(",") for r in ranks]
    console = Console(stderr=True)
    target, draft = load_pair(ModelConfig(target=args.target))
    engine = make_engine(target.model, target.tokenizer, draft.model, EngineConfig(), PolicyConfig())
    engine.teacher_top_k = 32
    queries = list(islice(iter_queries(args.dataset), args.prompts))
    examples, t0 = [], time.perf_counter()
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    for q in queries:
        engine.generate([Request(q.encode(target.tokenizer), params)], on_finish=lambda o: examples.append(o.example))
    serve_s = time.perf_counter() - t0
    generated = sum(e.num_positions for e in examples)
    console.print(f"served {len(examples)} requests, {generated} tokens in {serve_s:.0f} s")
    batches = [examples[i: i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    distillers, first_step = {}, {}
    for way in ways:
        m, frozen, rank = way
        cfg = TrainerConfig(background=False, train_layers=m, freeze_head=frozen, lora_rank=rank,
                            batch_size=args.batch_size, positions="all")
        d = Distiller(draft.model, cfg)
        t = time.perf_counter()
        d.train_step(batches[0])  # warm-up; with --train-layers it also crosses the frozen layers for batch 0
        first_step[way] = time.perf_counter() - t
        distillers[way] = d
        console.print(f"{_name(way)}: first step {first_step[way]:.1f} s")
    times = {m: [] for m in ways}
    boundary_s = {m: 0.0 for m in ways}
    for r in range(args.rounds):
        batch = batches[(r + 1) % len(batches)]
        for m in (ways[r % len(ways):] + ways[: r % len(ways)]):  # interleaved, rotating order
            d = distillers[m]
            if d.boundary is not None:  # the one-time cost of a new example, timed apart from the step
                t = time.perf_counter()
                d._boundary_states(batch)
                boundary_s[m] += time.perf_counter() - t
            t = time.perf_counter()
            d.train_step(batch)
            times[m].append(time.perf_counter() - t)
        console.print(f"round {r + 1}: " + "  ".join(f"{_name(m)}: {times[m][-1]:.1f}s" for m in ways))
    tokens_per_batch = statistics.mean(sum(len(e.tokens) for e in b) for b in batches)
    rows = {}
    for m in ways:
        d = distillers[m]
        step = statistics.median(times[m])
        new_tokens = sum(len(batches[(r + 1) % len(batches)][i].tokens) for r in range(args.rounds)
                         for i in range(len(batches[(r + 1) % len(batches)])))
        rows[_name(m)] = {
            "train_layers": m[0], "freeze_head": m[1], "lora_rank": m[2], "trained_parameters": sum(p.numel() for p in d.trainable.values()),
            "seconds_per_step": step, "ms_per_trained_token": 1e3 * step / tokens_per_batch,
            "boundary_ms_per_new_token": 1e3 * boundary_s[m] / new_tokens if d.boundary is not None else None,
            "trainer_bytes": _own_bytes(d, draft.model),
            "boundary_bytes_per_token": (d.boundary_bytes / max(1, sum(len(st) for _, st, _, _ in d._states.values()))
                                         if d.boundary is not None else 0),
        }
    base = rows[_name((0, False, 0))]["seconds_per_step"] if _name((0, False, 0)) in rows else None
    table = Table(title=f"one AdamW step on {args.batch_size} served requests ({tokens_per_batch:.0f} tokens), "
                        f"{next(draft.model.parameters()).dtype} draft, trained part in float32, {torch.get_num_threads()} threads")
    for col in ("train layers", "head", "lora", "trained params", "s / step", "vs all layers", "ms / token", "boundary ms / new token",
                "trainer GB", "boundary B / token"):
        table.add_column(col, justify="right")
    for r in rows.values():
        table.add_row("all" if r["train_layers"] == 0 else str(r["train_layers"]),
                      "frozen" if r["freeze_head"] else "trained", str(r["lora_rank"] or ""), f"{r['trained_parameters'] / 1e6:.1f}M", f"{r['seconds_per_step']:.2f}",
                      f"{base / r['seconds_per_step']:.1f}x faster" if base else "", f"{r['ms_per_trained_token']:.2f}",
                      "" if r["boundary_ms_per_new_token"] is None else f"{r['boundary_ms_per_new_token']:.2f}",
                      f"{r['trainer_bytes'] / 1e9:.2f}", f"{r['boundary_bytes_per_token']:.0f}")
    Console(file=sys.stdout, width=150).print(table)
    decode_ms = 1e3 * serve_s / generated
    print(f"for scale: serving decoded {generated / serve_s:.1f} tok/s ({decode_ms:.0f} ms per token, adaptive k)")
    print(json.dumps({"prompts": len(examples), "tokens_per_batch": tokens_per_batch, "serve_tok_s": generated / serve_s,
                      "ways": rows}))
    return 0


def _name(way: tuple[int, bool, int]) -> str:
    m, frozen, rank = way
    return (f"{m}-frozen-head" if frozen else str(m)) + (f"-lora{rank}" if rank else "")


def _own_bytes(d: Distiller, served: torch.nn.Module) -> int:
    """Bytes of the trainer's own tensors: student storages not shared with the serving draft,
    gradients and optimizer state."""
    shared = {p.untyped_storage().data_ptr() for p in served.parameters()}
    seen, total = set(), 0
    tensors = list(d.student.parameters()) + [p.grad for p in d.trainable.values() if p.grad is not None]
    for state in d.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in shared or ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


if __name__ == "__main__":
    sys.exit(main())
