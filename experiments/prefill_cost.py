"""What one long prompt costs this host (issue 41): the engine prefills a prompt of --long-ids token
ids alone, in chunks of each --chunks size, and times a verify step of --rows short decoding rows, on
the pair `onspec serve` would load. Says whether a long prompt every S seconds is within the host's
means (prefill seconds < S) before a serving benchmark is read. Prints a table and, last, one JSON line.

    .venv/bin/python experiments/prefill_cost.py --target smollm2-135m --dtype float32 --long-ids 8000
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import host  # noqa: E402

from onspec.engine.build import make_engine  # noqa: E402
from onspec.engine.engine import EngineConfig, Request  # noqa: E402
from onspec.engine.sampling import SamplingParams  # noqa: E402
from onspec.models.pair import ModelConfig, load_pair  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="as `onspec serve --target` (default: the default pair)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--long-ids", type=int, default=8000)
    ap.add_argument("--chunks", default="512,64", help="comma-separated prefill chunk sizes")
    ap.add_argument("--rows", type=int, default=8, help="short rows decoding for the verify-step timing")
    ap.add_argument("--steps", type=int, default=10, help="verify steps timed (median)")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.long_ids < 2 or args.rows < 1 or args.steps < 1 or any(c < 1 for c in chunks):
        ap.error("--long-ids >= 2, --rows, --steps and every chunk >= 1")
    target, draft = load_pair(ModelConfig(**({"target": args.target} if args.target else {}), dtype=args.dtype))
    engine = make_engine(target.model, target.tokenizer, draft.model if draft else None, EngineConfig())
    rng = random.Random(0)

    def request(n: int, tokens: int) -> Request:
        return Request([rng.randrange(100, 20000) for _ in range(n)],
                       SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True))

    engine.add([request(60, 1000) for _ in range(args.rows)])
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    engine.close()
    prefill = {}
    for chunk in chunks:
        engine.prefill_chunk = chunk
        engine.add(request(args.long_ids, 1))
        t0 = time.perf_counter()
        while engine.num_prefilling:
            engine.step()
        prefill[chunk] = time.perf_counter() - t0
        engine.close()
    table = Table(title=f"prefill cost: {args.long_ids} ids alone; a verify step of {args.rows} short rows")
    for col in ("chunk", "prefill s", "tokens / s", f"verify step of {args.rows} rows, s"):
        table.add_column(col, justify="right")
    for chunk, seconds in prefill.items():
        table.add_row(str(chunk), f"{seconds:.1f}", f"{args.long_ids / seconds:.0f}", f"{step:.3f}")
    Console(file=sys.stdout, width=140).print(table)
    print(json.dumps({"bench": "prefill_cost", "host": host(), "args": vars(args), "verify_step_s": step,
                      "prefill_s": prefill}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
