"""Time to first token of short requests beside one prompt that nearly fills the context (issue 26,
item 1). The server's scheduler runs in-process on the small pair (no HTTP, no online learning):
three short requests start streaming, one second later a prompt of --long-tokens ids arrives, then
further short requests arrive while it is prefilled. Per request: when it arrived, its time to first
token, its longest gap between two events (a streaming request stalled by the prefill shows it
here) and its latency; the long prompt's own time to first token; how many requests /metrics would
have counted as running while the long prompt was prefilled. Prints a table and, last, one JSON line.
Runs on code from before chunked prefill too (it then says `prefill_chunk: null`).

    .venv/bin/python experiments/prefill_stall.py --target smollm2-135m --dtype float32 --prefill-chunk 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time

import torch
from rich.console import Console
from rich.table import Table

from onspec.apps.serve import build_state
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig
from onspec.online.distiller import TrainerConfig
from onspec.serve.config import ServerConfig
from onspec.serve.scheduler import Event

SHORT = ["Write a haiku about the sea.", "def fibonacci(n):", "The capital of France is", "Explain recursion.",
         "import numpy as np\n", "Once upon a time", "SELECT name FROM users WHERE"]


@dataclasses.dataclass
class Timing:
    name: str
    sent: float
    events: list[float] = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: str | None = None

    def sink(self, ev: Event) -> None:
        self.events.append(time.perf_counter())
        if ev.error is not None:
            self.error = ev.error
        if ev.last:
            self.done.set()

    def row(self, t0: float) -> dict:
        e = self.events
        gaps = [b - a for a, b in zip([self.sent] + e, e)]
        return {"request": self.name, "arrived_s": self.sent - t0, "ttft_s": e[0] - self.sent if e else None,
                "max_gap_s": max(gaps[1:], default=0.0), "latency_s": e[-1] - self.sent if e else None,
                "events": len(e), "error": self.error}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="EngineConfig.prefill_chunk (0: whole prompts)")
    ap.add_argument("--long-tokens", type=int, default=8180, help="ids in the long prompt (8,180 of a context of 8,192)")
    ap.add_argument("--late", default="0.5,2,5,10", help="seconds after the long prompt at which short requests arrive")
    ap.add_argument("--early-tokens", type=int, default=96, help="max_tokens of the three requests streaming before")
    ap.add_argument("--late-tokens", type=int, default=16, help="max_tokens of the requests arriving after")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    chunked = "prefill_chunk" in EngineConfig.__dataclass_fields__
    engine_cfg = EngineConfig(prefill_chunk=args.prefill_chunk) if chunked else EngineConfig()
    state = build_state(ModelConfig(target=args.target, dtype=args.dtype), engine_cfg, PolicyConfig(), TrainerConfig(),
                        ServerConfig(state_dir=tempfile.mkdtemp(prefix="prefill-stall-"), no_online=True))
    tok, scheduler = state.pool.general.engine.tokenizer, state.scheduler
    scheduler.start()

    def submit(name: str, ids: list[int], max_tokens: int) -> Timing:
        t = Timing(name, time.perf_counter())
        scheduler.submit(Request(ids, SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)), t.sink)
        return t

    # warm up: one short request alone (first-call costs are not the prefill's)
    submit("warm-up", tok.encode(SHORT[0]), 8).done.wait()

    t0 = time.perf_counter()
    timings = [submit(f"early {i}", tok.encode(SHORT[i]), args.early_tokens) for i in range(3)]
    time.sleep(1.0)
    long = submit(f"long ({args.long_tokens} ids)", [1] * args.long_tokens, 8)
    running_seen = []
    for i, delay in enumerate(float(x) for x in args.late.split(",")):
        while time.perf_counter() < long.sent + delay:
            if not long.events:
                running_seen.append(scheduler.running)
            time.sleep(0.05)
        timings.append(submit(f"late +{delay:g}s", tok.encode(SHORT[3 + i % 4]), args.late_tokens))
    while not long.events:
        running_seen.append(scheduler.running)
        time.sleep(0.05)
    for t in timings + [long]:
        t.done.wait()
    scheduler.close()

    rows = [t.row(t0) for t in timings + [long]]
    table = Table(title=f"{args.target} {args.dtype}: short requests beside a {args.long_tokens}-id prompt, "
                        f"prefill chunk {args.prefill_chunk if chunked else 'none (whole, before chunked prefill)'}")
    for col in ("request", "arrived s", "TTFT s", "longest gap s", "latency s"):
        table.add_column(col, justify="left" if col == "request" else "right")
    for r in rows:
        table.add_row(r["request"], f"{r['arrived_s']:.2f}", f"{r['ttft_s']:.2f}", f"{r['max_gap_s']:.2f}",
                      f"{r['latency_s']:.2f}" + (f" ({r['error']})" if r["error"] else ""))
    Console(file=sys.stderr).print(table)
    late = [r["ttft_s"] for r in rows if r["request"].startswith("late")]
    early = [r["max_gap_s"] for r in rows if r["request"].startswith("early")]
    print(json.dumps({
        "target": args.target, "dtype": args.dtype, "prefill_chunk": args.prefill_chunk if chunked else None,
        "long_tokens": args.long_tokens, "threads": torch.get_num_threads(),
        "late_ttft_s": {"median": statistics.median(late), "max": max(late)},
        "early_longest_gap_s": max(early), "long_ttft_s": rows[-1]["ttft_s"], "long_latency_s": rows[-1]["latency_s"],
        "running_while_long_prefills": {"min": min(running_seen), "max": max(running_seen)},
        "requests": rows,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
