"""The SuffixDecoding reference offline on the streams that repeat (issue 40): no model runs.

Each stream's queries are served in order as if the target emitted exactly the dataset's own
answer (`Query.answer`: the edited file, the next tool call or final answer, ShareGPT's reply,
HumanEval's canonical solution), teacher-forced as the reference's own simulator does
(arctic_inference/suffix_decoding/simulator.py): before each target pass the reference speculates
from the prompt and the answer so far, the accepted run is the draft's prefix equal to the answer,
and the pass emits that run plus the target's own token, which are then added to its trees. A
finished request's answer stays in the global tree for the next ones.

Two settings of the reference (`onspec.peers.arctic`, its defaults otherwise):
- reference: the request's own tree and the global tree (max_cached_requests 100,000);
- own-only: the request's own tree (prompt and output) alone (max_cached_requests 0).

Per stream: tokens per target pass (answer tokens / passes, the bound on speedup a free proposer
gives), the mean accepted length per speculation (passes with a non-empty draft), the share of
passes with a draft, accepted / drafted, the reference's time per speculate call, and the 6-word
n-gram repeat share of the answers (`onspec.data.repeating.repeat_share`). Tokens are the default
target's (Qwen2.5-Coder); prompts go through its chat template.

    .venv/bin/python experiments/peer_offline.py --out docs/results/repeating-streams

Prints a table and a final JSON line. CPU only, a few minutes (tokenizing ShareGPT histories).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from onspec.bench.report import finish
from onspec.data.repeating import repeat_share
from onspec.data.streams import iter_queries
from onspec.models.kernels import host
from onspec.models.loading import resolve_spec
from onspec.peers.arctic import ArcticConfig, ArcticSuffixCache, load

SETTINGS = {"reference": ArcticConfig(), "own-only": ArcticConfig(max_cached_requests=0)}


def serve(cache: ArcticSuffixCache, req_id: str, prompt: list[int], answer: list[int]) -> dict:
    """One request teacher-forced through the reference; its counts."""
    cache.start(req_id, prompt)
    passes = proposed = drafted = accepted_total = 0
    seconds = 0.0
    t = 0
    while t < len(answer):
        context = (prompt + answer[:t])[-cache.config.max_tree_depth:]
        t0 = time.perf_counter()
        draft = cache.speculate(req_id, context).token_ids
        seconds += time.perf_counter() - t0
        accepted = 0
        while accepted < len(draft) and t + accepted < len(answer) and draft[accepted] == answer[t + accepted]:
            accepted += 1
        new = answer[t: t + accepted + 1]  # the accepted run and the target's own token
        cache.add(req_id, new)
        t += len(new)
        passes += 1
        proposed += bool(draft)
        drafted += len(draft)
        accepted_total += accepted
    cache.stop(req_id)
    return {"tokens": len(answer), "passes": passes, "proposed": proposed, "drafted": drafted,
            "accepted": accepted_total, "speculate_s": seconds}


def run_stream(name: str, limit: int, max_answer_tokens: int, tokenizer, module) -> dict:
    queries = [q for q in itertools.islice(iter_queries(name), limit) if q.answer]
    encoded = [(q.encode(tokenizer), tokenizer.encode(q.answer, add_special_tokens=False)[:max_answer_tokens])
               for q in queries]
    result = {"queries": len(queries), "repeat_share": round(repeat_share(queries), 3),
              "mean_prompt_tokens": round(sum(len(p) for p, _ in encoded) / len(encoded), 1),
              "mean_answer_tokens": round(sum(len(a) for _, a in encoded) / len(encoded), 1)}
    for setting, config in SETTINGS.items():
        cache = ArcticSuffixCache(config, module=module)
        totals: dict[str, float] = {}
        for n, (prompt, answer) in enumerate(encoded):
            for k, v in serve(cache, f"{name}-{n}", prompt, answer).items():
                totals[k] = totals.get(k, 0) + v
        result[setting] = {
            "tokens_per_pass": round(totals["tokens"] / totals["passes"], 3),
            "accepted_per_speculation": round(totals["accepted"] / max(totals["proposed"], 1), 3),
            "proposed_share": round(totals["proposed"] / totals["passes"], 3),
            "accepted_over_drafted": round(totals["accepted"] / max(totals["drafted"], 1), 3),
            "speculate_us": round(1e6 * totals["speculate_s"] / totals["passes"], 1),
            "tokens": int(totals["tokens"]), "passes": int(totals["passes"]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="edits,agent,multiturn,humaneval,sharegpt",
                        help="comma-separated datasets (onspec.data.streams.iter_queries names)")
    parser.add_argument("--limit", type=int, default=1000, help="queries per stream, from its start")
    parser.add_argument("--max-answer-tokens", type=int, default=512, help="answers are cut to this many tokens")
    parser.add_argument("--out", type=Path, help="directory for summary.json")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(resolve_spec(None))
    module = load()
    streams = {name: run_stream(name, args.limit, args.max_answer_tokens, tokenizer, module)
               for name in args.streams.split(",")}

    table = Table(title="SuffixDecoding reference, teacher-forced on each stream's own answers "
                        "(tokens per target pass / mean accepted per speculation)")
    for col in ("stream", "queries", "prompt tok", "answer tok", "6-gram repeat",
                *(f"{s} tok/pass" for s in SETTINGS), *(f"{s} acc/spec" for s in SETTINGS),
                "ref drafted share", "ref acc/drafted", "ref µs/spec"):
        table.add_column(col, justify="right")
    for name, r in streams.items():
        ref = r["reference"]
        table.add_row(name, str(r["queries"]), str(r["mean_prompt_tokens"]), str(r["mean_answer_tokens"]),
                      f"{r['repeat_share']:.2f}", *(f"{r[s]['tokens_per_pass']:.2f}" for s in SETTINGS),
                      *(f"{r[s]['accepted_per_speculation']:.2f}" for s in SETTINGS),
                      f"{ref['proposed_share']:.2f}", f"{ref['accepted_over_drafted']:.2f}", f"{ref['speculate_us']:.0f}")
    Console(width=200).print(table)
    finish(args.out, {"experiment": "peer_offline", "host": host().vector, "limit": args.limit, "max_answer_tokens": args.max_answer_tokens,
                      "settings": {s: vars(c) for s, c in SETTINGS.items()}, "streams": streams})


if __name__ == "__main__":
    main()
