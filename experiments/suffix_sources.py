"""Where the suffix learner's tokens come from: the request itself, or the stream it learned (issue 23).

The suffix learner (engine/suffix.py) proposes from two indexes: the request's own (its prompt and
output so far: needs no learning) and the stream's (earlier outputs: what it learns). This replays
served streams (caches made by experiments/online_sweep.py: the default pair's greedy outputs, in
stream order) through three learners built from the real class:
- local: the request's own index only (`--suffix-history 0`);
- history: the stream's index only;
- both: what serving runs.
Each decodes every request teacher-forced as suffix-only greedy speculation: at each step the
learner proposes up to `--max-tokens` tokens from the context, the accepted run is the proposal's
prefix equal to the served tokens, and the step emits that run plus the target's own token (a step
without a proposal emits one token). Tokens per target pass (the learner alone, no draft) and, for
`both`, each step's source: whether the request's own index alone would have accepted as many
tokens (local), fewer (the stream added tokens), or more (the stream's counts outvoted a correct
local continuation). Finished requests join the index after they are decoded, as in serving.

    .venv/bin/python experiments/suffix_sources.py --stream runs/sweep-humaneval-0-164-64.pt
    .venv/bin/python experiments/suffix_sources.py --stream runs/sweep-humaneval-0-164-64.pt:0:82 \\
        runs/sweep-sharegpt-0-240-64.pt:0:131 runs/sweep-humaneval-0-164-64.pt:0:82   # the shift stream

Prints a table per segment and window and a final JSON line. CPU only, seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from onspec.bench.report import save_json
from onspec.engine.suffix import SuffixLearner


def load_segment(spec: str) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """'PATH[:SKIP[:LIMIT]]' -> (label, [(prompt ids, output ids)]) in stream order."""
    path, *rest = spec.split(":")
    skip = int(rest[0]) if rest else 0
    limit = int(rest[1]) if len(rest) > 1 else None
    examples = torch.load(path, weights_only=False)["examples"]
    examples = examples[skip: None if limit is None else skip + limit]
    pairs = [(e["tokens"][: e["start"]].tolist(), e["tokens"][e["start"]:].tolist()) for e in examples]
    return f"{Path(path).stem.split('-')[1]} {skip}-{skip + len(pairs)}", pairs


def decode(learner: SuffixLearner, prompt: list[int], output: list[int], max_tokens: int,
           use_local: bool, use_history: bool) -> list[tuple[int, int]]:
    """Teacher-forced suffix-only speculation of one request: per step (position, accepted)."""
    local = learner.local_index(prompt) if use_local else None
    index = learner.index
    if not use_history:
        learner.index = type(index)(learner.max_depth)  # an empty stream index for this request
    steps, t = [], 0
    context = list(prompt)
    while t < len(output):
        proposal = learner.continuation(context, local, max_tokens)[0]
        accepted = 0
        while accepted < len(proposal) and t + accepted < len(output) and proposal[accepted] == output[t + accepted]:
            accepted += 1
        new = output[t: t + accepted + 1]
        steps.append((t, accepted if proposal else -1))
        if local is not None:
            SuffixLearner.extend(local, context, new)
        context += new
        t += len(new)
    learner.index = index
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", nargs="+", required=True, help="served caches, PATH[:SKIP[:LIMIT]], in order")
    parser.add_argument("--max-tokens", type=int, default=16, help="most tokens a proposal carries (engine default)")
    parser.add_argument("--window", type=int, default=32, help="requests per row of the table")
    parser.add_argument("--out", type=Path, help="directory for summary.json")
    args = parser.parse_args()

    segments = [load_segment(s) for s in args.stream]
    learner = SuffixLearner(max_tokens=args.max_tokens)
    rows = []  # per request
    for label, pairs in segments:
        for prompt, output in pairs:
            ways = {"local": decode(learner, prompt, output, args.max_tokens, True, False),
                    "history": decode(learner, prompt, output, args.max_tokens, False, True),
                    "both": decode(learner, prompt, output, args.max_tokens, True, True)}
            local_at = dict(ways["local"])
            row = {"segment": label, "tokens": len(output)}
            for name, steps in ways.items():
                row[f"{name}_passes"] = len(steps)
                row[f"{name}_proposed_steps"] = sum(a >= 0 for _, a in steps)
            # each `both` step against the local index alone from the same position (where local
            # had a step there; elsewhere the positions differ and the step counts as the stream's)
            src = {"local": 0, "stream_added": 0, "stream_outvoted": 0, "none": 0}
            added_tokens = 0
            for t, a in ways["both"]:
                if a < 0:
                    src["none"] += 1
                    continue
                la = max(local_at.get(t, 0), 0)
                if a > la:
                    src["stream_added"] += 1
                    added_tokens += a - la
                elif a < la:
                    src["stream_outvoted"] += 1
                else:
                    src["local"] += 1
            row.update({f"both_steps_{k}": v for k, v in src.items()})
            row["both_tokens_added_by_stream"] = added_tokens
            rows.append(row)
            learner.learn(prompt, output)

    console = Console(width=150)
    table = Table(title="suffix-only speculation, teacher-forced on the served outputs: tokens per target pass")
    for col in ("requests", "local (own prompt + output)", "history (earlier outputs)", "both (served)",
                "both: steps as local / stream added / outvoted", "tokens the stream added"):
        table.add_column(col)

    def agg(part: list[dict]) -> dict:
        tok = sum(r["tokens"] for r in part)
        out = {"requests": len(part), "tokens": tok}
        for name in ("local", "history", "both"):
            out[f"{name}_tokens_per_pass"] = tok / sum(r[f"{name}_passes"] for r in part)
        for k in ("local", "stream_added", "stream_outvoted", "none"):
            out[f"both_steps_{k}"] = sum(r[f"both_steps_{k}"] for r in part)
        out["tokens_added_by_stream_share"] = sum(r["both_tokens_added_by_stream"] for r in part) / tok
        return out

    def add(label: str, a: dict) -> None:
        steps = a["both_steps_local"] + a["both_steps_stream_added"] + a["both_steps_stream_outvoted"]
        table.add_row(label, f"{a['local_tokens_per_pass']:.2f}", f"{a['history_tokens_per_pass']:.2f}",
                      f"{a['both_tokens_per_pass']:.2f}",
                      f"{a['both_steps_local'] / max(steps, 1):.2f} / {a['both_steps_stream_added'] / max(steps, 1):.2f} / "
                      f"{a['both_steps_stream_outvoted'] / max(steps, 1):.2f}",
                      f"{a['tokens_added_by_stream_share']:.3f}")

    summary = {"stream": args.stream, "max_tokens": args.max_tokens, "segments": {}, "windows": []}
    start = 0
    for label, pairs in segments:
        part = rows[start: start + len(pairs)]
        for w in range(0, len(part), args.window):
            window = part[w: w + args.window]
            a = agg(window)
            a["first_request"] = start + w
            summary["windows"].append(a)
            add(f"{label} {start + w + 1}-{start + w + len(window)}", a)
        summary["segments"][label if label not in summary["segments"] else f"{label}#{start}"] = seg = agg(part)
        add(f"[b]{label} all[/b]", seg)
        start += len(pairs)
    summary["whole"] = agg(rows)
    add("[b]whole stream[/b]", summary["whole"])
    console.print(table)
    save_json(args.out, summary)
    print(json.dumps({"whole": summary["whole"], "segments": summary["segments"]}))


if __name__ == "__main__":
    main()
