"""Per-step Python overhead of the engine: wall time of a verify step minus the time spent inside
the models' forward passes, in ms per step, target-only and speculative (fixed k), batch 1 and 8,
and speculative with a trainer listening (the engine keeps the target's top-32 per emitted token).
The ways are interleaved round by round; the median over rounds is reported.
Prints a table and, last, one JSON line.

    .venv/bin/python experiments/step_overhead.py --target smollm2-135m --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair

PROMPTS = ["def fibonacci(n):", "Write a haiku about the sea.", "The capital of France is", "import numpy as np\n",
           "Explain recursion to a child.", "SELECT name FROM users WHERE", "Once upon a time", "for i in range(10):"]


class ForwardClock:
    """Sums the wall time spent inside the forward passes of the hooked modules."""

    def __init__(self, *models: torch.nn.Module) -> None:
        """From the input embedding to the head's output: the first and last module of a pass
        whether transformers' forward or onspec's (models/decode.py) runs it."""
        self.calls: list[tuple[float, float]] = []
        self._start: float | None = None
        for m in models:
            m.get_input_embeddings().register_forward_pre_hook(self._pre)
            m.get_output_embeddings().register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.calls.append((self._start, time.perf_counter()))

    def seconds_after(self, t: float) -> float:
        return sum(b - a for a, b in self.calls if a >= t)


def teacher_on(engine) -> dict:
    """What a listening trainer costs the decoding thread: the lesson kept per emitted token."""
    engine.teacher_top_k = 32
    return {}


def measure(engine, clock: ForwardClock, batch: int, new_tokens: int, tokenizer, listen: bool) -> dict:
    requests = [Request(tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                        SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for i in range(batch)]
    clock.calls.clear()
    t0 = time.perf_counter()
    outs = engine.generate(requests, **(teacher_on(engine) if listen else {}))
    wall = time.perf_counter() - t0
    prefill = max(o.stats.prefill_time_s for o in outs)
    steps = max(o.stats.steps for o in outs)
    decode_wall = wall - prefill
    forward = clock.seconds_after(t0 + prefill)
    return {"step_ms": 1000 * decode_wall / steps, "forward_ms": 1000 * forward / steps,
            "overhead_ms": 1000 * (decode_wall - forward) / steps, "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.rounds < 1 or args.new_tokens < 2 or args.k < 1:
        ap.error("--rounds >= 1, --new-tokens >= 2, --k >= 1")
    console = Console(stderr=True)
    target, draft = load_pair(ModelConfig(target=args.target, dtype=args.dtype))
    tok = target.tokenizer
    spec = f"speculative k={args.k}"

    def speculative():
        return make_engine(target.model, tok, draft.model, EngineConfig(k=args.k), PolicyConfig(fixed_k=True))

    engines = {"target-only": make_engine(target.model, tok, None, EngineConfig(k=0)), spec: speculative(),
               spec + " + trainer": speculative()}
    clock = ForwardClock(target.model, *[e.fast.model for e in engines.values() if e.fast])
    ways = [(name, batch) for name in engines for batch in (1, 8)]

    def run(name, batch, n):
        return measure(engines[name], clock, batch, n, tok, listen=name.endswith("trainer"))

    for name, batch in ways:  # warm-up
        run(name, batch, 4)
    rows: dict[tuple[str, int], list[dict]] = {w: [] for w in ways}
    for r in range(args.rounds):
        for name, batch in ways:
            rows[(name, batch)].append(run(name, batch, args.new_tokens))
        console.print(f"round {r + 1}/{args.rounds}")
    table = Table(title=f"engine step overhead ({args.target}, {args.new_tokens} new tokens, median of {args.rounds})")
    for col in ("way", "batch", "ms/step", "ms in forwards", "overhead ms/step"):
        table.add_column(col)
    result = {}
    for (name, batch), runs in rows.items():
        med = {key: statistics.median(run[key] for run in runs) for key in ("step_ms", "forward_ms", "overhead_ms")}
        table.add_row(name, str(batch), f"{med['step_ms']:.2f}", f"{med['forward_ms']:.2f}", f"{med['overhead_ms']:.2f}")
        result[f"{name} b{batch}"] = {key: round(v, 3) for key, v in med.items()}
    Console().print(table)
    print(json.dumps({"target": args.target, "rounds": args.rounds, "new_tokens": args.new_tokens, "ways": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
