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
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from onspec.bench.report import finish
from onspec.data.repeating import repeat_share
from onspec.data.streams import iter_queries
from onspec.models.kernels import host
from onspec.models.loading import resolve_spec
from onspec.peers.arctic import ArcticConfig, load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suffix_offline import Reference, replay, stream_options  # noqa: E402  (the one teacher-forced loop, for every proposer)

SETTINGS = {"reference": ArcticConfig(), "own-only": ArcticConfig(max_cached_requests=0)}


def run_stream(name: str, limit: int, max_answer_tokens: int, tokenizer, module) -> dict:
    queries = [q for q in itertools.islice(iter_queries(name), limit) if q.answer]
    encoded = [(q.encode(tokenizer), tokenizer.encode(q.answer, add_special_tokens=False)[:max_answer_tokens])
               for q in queries]
    result = {"queries": len(queries), "repeat_share": round(repeat_share(queries), 3),
              "mean_prompt_tokens": round(sum(len(p) for p, _ in encoded) / len(encoded), 1),
              "mean_answer_tokens": round(sum(len(a) for _, a in encoded) / len(encoded), 1)}
    for setting, config in SETTINGS.items():
        result[setting] = replay(Reference(config, module), encoded)
    return result


def main() -> None:
    parser = stream_options(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
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
                      f"{ref['proposed_share']:.2f}", f"{ref['accepted_over_drafted']:.2f}", f"{ref['us_per_proposal']:.0f}")
    Console(width=200).print(table)
    finish(args.out, {"experiment": "peer_offline", "host": host().vector, "limit": args.limit, "max_answer_tokens": args.max_answer_tokens,
                      "settings": {s: vars(c) for s, c in SETTINGS.items()}, "streams": streams})


if __name__ == "__main__":
    main()
