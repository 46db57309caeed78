"""What a draft pool costs on the default pair: memory per extra draft (distinct tensor storage of
the serving drafts, the trainers' copies and AdamW state after one update each; the shared
embedding table counted once) and each router's time per request on ShareGPT prompts.
Prints a table and, last, one JSON line.

    .venv/bin/python experiments/pool_cost.py --drafts 4 --prompts 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice

from rich.console import Console
from rich.table import Table

from onspec.data.streams import iter_queries
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.distiller import TrainerConfig
from onspec.pool.pool import PoolConfig
from onspec.pool.routers import make_router
from onspec.wiring import build_pool


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafts", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=200, help="ShareGPT prompts timed per router")
    args = ap.parse_args()
    if args.drafts < 2 or args.prompts < 1:
        ap.error("--drafts must be >= 2 and --prompts >= 1")
    console = Console(stderr=True)
    console.print("loading the default pair ...")
    target, draft = load_pair(ModelConfig())
    trainer_cfg = TrainerConfig(background=False, update_interval=1, steps=1, batch_size=1, probe_every=0)
    pool, _ = build_pool(target.model, target.tokenizer, draft.model, EngineConfig(k=4), PolicyConfig(fixed_k=True),
                         PoolConfig(drafts=args.drafts, router="field", open_after=1), trainer_cfg=trainer_cfg)
    for i in range(args.drafts - 1):
        pool.pick(f"route{i}")
    prompt = target.tokenizer.encode("def add(a, b):")
    for m in pool.all_members:  # one update each, so every optimizer holds its state
        m.generate([Request(prompt, SamplingParams(max_new_tokens=8))], on_finish=m.trainer.on_output)
    general_only = pool.memory_bytes([pool.general])
    per_extra = pool.memory_per_extra_draft()
    embed = target.model.get_input_embeddings().weight
    queries = list(islice(iter_queries("sharegpt"), args.prompts))
    encoded = [(q, q.encode(target.tokenizer)) for q in queries]
    timing = {}
    for kind in ("field", "language", "cluster"):
        router = make_router(kind, target.model, threshold=0.5, min_size=16, max_open=args.drafts - 1,
                             language_confidence=0.9)
        t0 = time.perf_counter()
        routes = [router.route(q, ids) for q, ids in encoded]
        timing[kind] = {"us_per_request": 1e6 * (time.perf_counter() - t0) / len(encoded),
                        "routed": sum(r is not None for r in routes), "distinct_routes": len({r for r in routes if r})}
    table = Table(title=f"draft pool on the default pair ({args.drafts} drafts)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("general draft + trainer copy + AdamW state", f"{general_only / 2**20:.1f} MiB")
    table.add_row("per extra draft (same, embeddings shared)", f"{per_extra / 2**20:.1f} MiB")
    table.add_row("embedding table (shared, counted once)", f"{embed.numel() * embed.element_size() / 2**20:.1f} MiB")
    for kind, t in timing.items():
        table.add_row(f"router {kind}: time per request", f"{t['us_per_request']:.0f} us")
        table.add_row(f"router {kind}: routed / distinct routes", f"{t['routed']} / {t['distinct_routes']}")
    console.print(table)
    print(json.dumps({"drafts": args.drafts, "general_bytes": general_only, "bytes_per_extra_draft": per_extra,
                      "embedding_bytes": embed.numel() * embed.element_size(), "routers": timing,
                      "prompts": len(encoded)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
