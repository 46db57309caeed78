"""onspec's suffix learner beside the SuffixDecoding reference, offline on the streams that repeat
(issue 40, item 3): no model runs.

The same teacher-forced replay as experiments/peer_offline.py (the reference's own simulator,
arctic_inference/suffix_decoding/simulator.py): each stream's queries are served in order as if
the target emitted exactly the dataset's answer; before each target pass the proposer drafts from
the prompt and the answer so far, the accepted run is the draft's prefix equal to the answer, and
the pass emits that run plus the target's own token, which the proposer then learns. A finished
request's answer joins the stream's index (the reference: its global tree) for the next ones. Every
proposer drafts at most --max-tokens tokens (16: the engine caps both at --suffix-tokens 16).

Settings (`SETTINGS`):
- reference: arctic-inference 0.3.0's suffix trees (`onspec.peers.arctic`, ArcticInference's vLLM
  defaults: tree depth 64, max_spec_factor 1, min_token_prob 0.1);
- frequency: onspec's suffix learner as the engine builds it (engine/suffix.py, scoring
  "frequency", contexts of 2..8 tokens);
- frequency-m1: the same from one-token contexts on (min_match 1);
- probability: the learner with SuffixDecoding's scoring (scoring "probability": contexts of 1..8
  tokens, the path's count-ratio probability >= 0.1, at most 2 * match length tokens, the request's
  and the stream's index competing on score);
- probability-m2: the same from two-token contexts on (the frequency scoring's min_match);
- probability-f1: the same with the reference's own budget, 1 * match length (a match is at most
  8 tokens here, 63 in the reference's tree).
With --tree-widths (e.g. 1,2,4) each learner setting also runs as a tree of up to W continuations
(`--suffix-tree-width`, setting name -wW): the accepted run is then the tree's path that follows
the answer, and a draft's tokens are its nodes (all verified in the one pass; the engine's
controller would cut a tree, as a chain, to the nodes that pay at the host's T(n)). The learner
observes each pass as in the engine, so its live acceptance per depth orders a tree's nodes.

Per stream and setting: tokens per target pass (answer tokens / passes: the bound on speedup a
free proposer gives), mean accepted length per speculation (passes with a non-empty draft), the
share of passes with a draft, drafted tokens (a tree's nodes) per pass and accepted / drafted (what
verification spends on the drafts), and the time per proposal. Then memory: the learner's stream index after
learning each stream's first --memory-requests outputs (tracemalloc around `learn()`, as MB per
1,000 outputs), beside the reference's own estimate for its global tree after its replay.

    .venv/bin/python experiments/suffix_offline.py --out docs/results/repeating-streams

Prints the tables and a final JSON line; with --out also writes suffix_offline.txt and
suffix_offline.json there. CPU only, minutes.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from onspec.bench.report import save_json
from onspec.data.streams import iter_queries
from onspec.engine.suffix import SuffixLearner
from onspec.engine.verify import Verdict
from onspec.models.kernels import host
from onspec.models.loading import resolve_spec
from onspec.peers.arctic import ArcticConfig, ArcticSuffixCache, load

LEARNERS: dict[str, dict] = {
    "frequency": {},
    "frequency-m1": {"min_match": 1},
    "probability": {"scoring": "probability"},
    "probability-m2": {"scoring": "probability", "min_match": 2},
    "probability-f1": {"scoring": "probability", "spec_factor": 1.0},
}
SETTINGS = ("reference", *LEARNERS)


class Reference:
    """The reference's trees, driven through `replay` (experiments/peer_offline.py uses it too)."""

    def __init__(self, config: ArcticConfig, module) -> None:
        self.cache = ArcticSuffixCache(config, module=module)
        self.n = 0

    def start(self, prompt: list[int]) -> None:
        self.n += 1
        self.cache.start(self.n, prompt)

    def propose(self, context: list[int]) -> tuple[list[int], None]:
        return self.cache.speculate(self.n, context[-self.cache.config.max_tree_depth:]).token_ids, None

    def verified(self, accepted: int, new: list[int]) -> None:
        pass

    def add(self, context: list[int], new: list[int]) -> None:
        self.cache.add(self.n, new)

    def stop(self, prompt: list[int], answer: list[int]) -> None:
        self.cache.stop(self.n)

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()


class Learner:
    """onspec's suffix learner, driven as the engine drives it (admit, propose, observe, release)."""

    def __init__(self, max_tokens: int, **options) -> None:
        self.learner = SuffixLearner(max_tokens=max_tokens, **options)
        self.max_tokens = max_tokens
        self.local = None
        self.draft = None

    def start(self, prompt: list[int]) -> None:
        self.local = self.learner.local_index(prompt)

    def propose(self, context: list[int]) -> tuple[list[int], list[int] | None]:
        """The draft's tokens and, for a tree, their parents."""
        tail = context[-self.learner.max_depth:]
        if self.learner.tree_width > 1:
            self.draft = self.learner.tree(tail, self.local, self.max_tokens)
            return ([], None) if self.draft is None else (self.draft.tokens.tolist(), self.draft.parents)
        return self.learner.continuation(tail, self.local, self.max_tokens)[0], None

    def verified(self, accepted: int, new: list[int]) -> None:
        """A tree learner's live acceptance learns from the pass, as in the engine (`observe`): it
        orders a tree's nodes (a chain's proposal does not depend on it)."""
        if self.draft is not None and self.draft.parents is not None:
            self.learner.observe_tree(self.draft, Verdict(accepted, new, len(self.draft)))
        elif self.draft is not None:
            self.learner.observe_verified(self.draft.match, accepted)

    def add(self, context: list[int], new: list[int]) -> None:
        SuffixLearner.extend(self.local, context, new)

    def stop(self, prompt: list[int], answer: list[int]) -> None:
        self.learner.learn(prompt, answer)
        self.local = None


def replay(proposer, encoded: list[tuple[list[int], list[int]]]) -> dict:
    """The stream teacher-forced through one proposer; its totals."""
    tokens = passes = proposed = drafted = accepted_total = 0
    seconds = 0.0
    for prompt, answer in encoded:
        proposer.start(prompt)
        t = 0
        while t < len(answer):
            context = prompt + answer[:t]
            t0 = time.perf_counter()
            draft, parents = proposer.propose(context)
            seconds += time.perf_counter() - t0
            accepted = walk(draft, parents, answer[t:])
            new = answer[t: t + accepted + 1]  # the accepted run and the target's own token
            proposer.verified(accepted, new)
            proposer.add(context, new)
            t += len(new)
            passes += 1
            proposed += bool(draft)
            drafted += len(draft)
            accepted_total += accepted
        proposer.stop(prompt, answer)
        tokens += len(answer)
    return {"tokens_per_pass": round(tokens / passes, 3),
            "accepted_per_speculation": round(accepted_total / max(proposed, 1), 3),
            "proposed_share": round(proposed / passes, 3),
            "drafted_per_pass": round(drafted / passes, 3),
            "accepted_over_drafted": round(accepted_total / max(drafted, 1), 3),
            "us_per_proposal": round(1e6 * seconds / passes, 1),
            "tokens": tokens, "passes": passes}


def walk(draft: list[int], parents: list[int] | None, rest: list[int]) -> int:
    """How many of the answer's next tokens `rest` the draft holds in a row from its root: a
    chain's prefix, a tree's path."""
    parents = parents if parents is not None else list(range(-1, len(draft) - 1))
    children = {}
    for j, (parent, token) in enumerate(zip(parents, draft)):
        children.setdefault((parent, token), j)
    node, accepted = -1, 0
    while accepted < len(rest) and (node := children.get((node, rest[accepted]))) is not None:
        accepted += 1
    return accepted


def learner_memory(encoded: list[tuple[list[int], list[int]]]) -> dict:
    """The default learner's memory after learning these outputs (tracemalloc around learn())."""
    learner = SuffixLearner(history=len(encoded), history_tokens=1 << 62)  # nothing evicted
    gc.collect()
    tracemalloc.start()
    for prompt, answer in encoded:
        learner.learn(prompt, answer)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"requests": len(encoded), "tokens": learner.tokens, "contexts": len(learner.index),
            "mb": round(used / 1e6, 1), "mb_per_1000_requests": round(used / 1e6 * 1000 / len(encoded), 1),
            "bytes_per_token": round(used / learner.tokens)}


def run_stream(name: str, args, tokenizer, module, log: Callable[[str], None]) -> dict:
    queries = [q for q in itertools.islice(iter_queries(name), args.limit) if q.answer]
    encoded = [(q.encode(tokenizer), tokenizer.encode(q.answer, add_special_tokens=False)[:args.max_answer_tokens])
               for q in queries]
    result: dict = {"queries": len(queries),
                    "mean_answer_tokens": round(sum(len(a) for _, a in encoded) / len(encoded), 1)}
    for setting in settings(args):
        base, _, width = setting.partition("-w")
        proposer = (Reference(ArcticConfig(max_spec_tokens=args.max_tokens), module) if setting == "reference"
                    else Learner(args.max_tokens, **LEARNERS[base], tree_width=int(width or 1)))
        t0 = time.perf_counter()
        result[setting] = replay(proposer, encoded)
        if setting == "reference":
            result["reference_memory_mb_per_1000_requests"] = round(
                proposer.memory_bytes() / 1e6 * 1000 / len(encoded), 1)
        log(f"{name} {setting}: {result[setting]['tokens_per_pass']:.2f} tokens/pass ({time.perf_counter() - t0:.0f} s)")
    if name in args.memory_streams.split(","):
        result["memory"] = learner_memory(encoded[:args.memory_requests])
    return result


def settings(args) -> list[str]:
    """The settings run: --settings, each learner's also as a tree of each --tree-widths width > 1."""
    chosen = args.settings.split(",")
    widths = [int(w) for w in args.tree_widths.split(",")]
    return [s for base in chosen
            for s in ([base] if base == "reference" else [base if w == 1 else f"{base}-w{w}" for w in widths])]


def stream_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that choose the streams and their queries (experiments/peer_offline.py too)."""
    parser.add_argument("--streams", default="edits,agent,multiturn,humaneval,sharegpt",
                        help="comma-separated datasets (onspec.data.streams.iter_queries names)")
    parser.add_argument("--limit", type=int, default=1000, help="queries per stream, from its start")
    parser.add_argument("--max-answer-tokens", type=int, default=512, help="answers are cut to this many tokens")
    return parser


def main() -> None:
    parser = stream_options(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--max-tokens", type=int, default=16, help="most tokens any proposer drafts per pass")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings (see above)")
    parser.add_argument("--tree-widths", default="1", help="comma-separated tree widths each learner setting runs "
                        "with (1: its chain; W > 1: the setting -wW, a tree of up to W continuations)")
    parser.add_argument("--memory-streams", default="edits,sharegpt", help="streams whose learner memory is measured")
    parser.add_argument("--memory-requests", type=int, default=1000, help="outputs learned for the memory figure")
    parser.add_argument("--out", type=Path, help="directory for suffix_offline.txt and suffix_offline.json")
    args = parser.parse_args()

    console = Console(width=160, record=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_spec(None))
    module = load() if "reference" in settings(args) else None
    streams = {name: run_stream(name, args, tokenizer, module, lambda s: print(s, flush=True))
               for name in args.streams.split(",")}

    table = Table(title=f"Suffix proposers teacher-forced on each stream's own answers (at most {args.max_tokens} "
                        "tokens a draft)")
    for col in ("stream", "setting", "tok/pass", "acc/spec", "drafted share", "drafted/pass", "acc/drafted", "µs/call"):
        table.add_column(col, justify="right")
    for name, r in streams.items():
        run = settings(args)
        for i, setting in enumerate(run):
            s = r[setting]
            table.add_row(name if i == 0 else "", setting, f"{s['tokens_per_pass']:.2f}",
                          f"{s['accepted_per_speculation']:.2f}", f"{s['proposed_share']:.2f}",
                          f"{s['drafted_per_pass']:.2f}", f"{s['accepted_over_drafted']:.2f}",
                          f"{s['us_per_proposal']:.0f}", end_section=i == len(run) - 1)
    console.print(table)
    memory = Table(title="Memory: the learner's stream index (tracemalloc around learn()) and the reference's "
                         "global tree (its estimate), per 1,000 outputs")
    for col in ("stream", "outputs", "tokens", "contexts", "learner MB", "learner MB/1k", "B/token", "reference MB/1k"):
        memory.add_column(col, justify="right")
    for name, r in streams.items():
        if (m := r.get("memory")) is not None:
            memory.add_row(name, str(m["requests"]), str(m["tokens"]), str(m["contexts"]), f"{m['mb']:.1f}",
                           f"{m['mb_per_1000_requests']:.1f}", str(m["bytes_per_token"]),
                           f"{r.get('reference_memory_mb_per_1000_requests', float('nan')):.1f}")
    console.print(memory)
    summary = {"experiment": "suffix_offline", "host": host().vector, "limit": args.limit,
               "max_answer_tokens": args.max_answer_tokens, "max_tokens": args.max_tokens,
               "learners": LEARNERS, "tree_widths": args.tree_widths, "streams": streams}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "suffix_offline.txt").write_text(console.export_text())
        save_json(args.out, summary, name="suffix_offline.json")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
