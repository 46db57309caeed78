"""What a router finds on a query stream: it routes the stream exactly as `onspec replay` does
(same prompts, same prompt-length cap, same router), without decoding, and describes each group
that reached `--min-size` queries (a cluster, or a language): its size, whether it gets a draft,
the words most over-represented in its prompts against the whole stream, and the openings of a
few prompts. With `--replay-dir` (a replay run's output) it adds each route's specialist alpha
from the run's CSV. Prints a table and, last, one JSON line.

    .venv/bin/python experiments/routes.py --router cluster --dataset sharegpt --limit 400 --drafts 4
    .venv/bin/python experiments/routes.py --router language --dataset sharegpt --limit 5000 --min-size 8
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from onspec.models.loading import load_model
from onspec.apps.replay import ReplayConfig, load_stream
from onspec.pool.routers import ClusterRouter, LanguageRouter

WORD = re.compile(r"[a-z][a-z+#]{2,}")
COMMON = set("""the and for you that this with are can have what how your from not but all was will would there
their they them which about into more like some than then when who why also its it's our out use using one two
please write give make need want help just know get any other these those each such been being here where should
could does did has had were very may might must only well new tell explain following""".split())


def words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in COMMON}


def distinctive(members: list[str], everyone: Counter, total: int, top: int = 8, min_count: int = 3) -> list[str]:
    """Words over-represented in the cluster's prompts (document frequency ratio, smoothed)."""
    inside = Counter(w for text in members for w in words(text))
    n = len(members)
    score = {w: (c / n) / ((everyone[w] + 1) / (total + 1)) for w, c in inside.items() if c >= min(min_count, n)}
    return [w for w, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", choices=("cluster", "language"), default="cluster")
    ap.add_argument("--dataset", default="sharegpt", help="a replay stream (sharegpt, humaneval, mixed, shift, ...)")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--drafts", type=int, default=4, help="as replay's --drafts: at most drafts - 1 clusters open")
    ap.add_argument("--threshold", type=float, default=0.5, help="as replay's --cluster-threshold")
    ap.add_argument("--min-size", type=int, default=16,
                    help="as replay's --cluster-min-size (cluster) or --open-after (language)")
    ap.add_argument("--language-confidence", type=float, default=0.9, help="as replay's --language-confidence")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--replay-dir", help="a replay output directory with the same stream: add each route's alpha")
    args = ap.parse_args()
    if args.limit < 1 or args.drafts < 2 or args.min_size < 1 or not -1 <= args.threshold <= 1:
        ap.error("need --limit >= 1, --drafts >= 2, --min-size >= 1 and --threshold in [-1, 1]")
    if args.replay_dir and not (Path(args.replay_dir) / "replay_online.csv").is_file():
        ap.error(f"--replay-dir {args.replay_dir}: no replay_online.csv there")
    console = Console(stderr=True)
    try:
        queries = load_stream(ReplayConfig(dataset=args.dataset, limit=args.limit, skip=args.skip))
    except ValueError as e:
        ap.error(str(e))
    console.print("loading the target's tokenizer and embeddings ...")
    target = load_model(None)
    router = (ClusterRouter(target.model.get_input_embeddings().weight, threshold=args.threshold,
                            min_size=args.min_size, max_open=args.drafts - 1)
              if args.router == "cluster" else LanguageRouter(min_confidence=args.language_confidence))
    texts, routes, members = [], [], {}
    for q in queries:
        ids = q.encode(target.tokenizer)
        if len(ids) > args.max_prompt_tokens:
            continue
        key = router.route(q, ids)
        routes.append(key or "")
        texts.append(q.content)
        # the group a query belongs to: its cluster (open or still a candidate) or its language
        group = key
        if args.router == "cluster":
            group = None if router.last_cluster is None else f"cluster{router.last_cluster}"
        members.setdefault(group or "(no confident match)", []).append(len(texts) - 1)
    everyone = Counter(w for text in texts for w in words(text))
    alpha = _route_alpha(Path(args.replay_dir)) if args.replay_dir else {}
    opened = set(router.stats().get("opened", [])) if args.router == "cluster" else set()
    big = {g: idx for g, idx in members.items() if len(idx) >= args.min_size}
    rows = []
    for name, idx in sorted(big.items(), key=lambda kv: -len(kv[1])):
        gets_draft = name in opened if args.router == "cluster" else not name.startswith("(")
        rows.append({
            "group": name, "queries": len(idx), "gets_a_draft": gets_draft,
            "words": distinctive([texts[i] for i in idx], everyone, len(texts)),
            "examples": [" ".join(texts[i].split())[:70] for i in idx[: args.examples]],
            **({"alpha_last": alpha.get(name)} if alpha else {}),
        })
    small = {g: len(idx) for g, idx in members.items() if g not in big}
    detail = f"threshold {args.threshold}, " if args.router == "cluster" else f"confidence {args.language_confidence}, "
    table = Table(title=f"{args.router} on {args.dataset}: {len(texts)} queries ({detail}min size {args.min_size}); "
                        f"{sum(small.values())} queries in {len(small)} smaller groups")
    for col in ("group", "queries", "gets a draft", "distinctive words", "prompts begin"):
        table.add_column(col)
    if alpha:
        table.add_column("alpha_last (its draft)")
    for r in rows:
        cells = [r["group"], str(r["queries"]), "yes" if r["gets_a_draft"] else "no", ", ".join(r["words"]),
                 "\n".join(r["examples"])]
        if alpha:
            cells.append("n/a" if r.get("alpha_last") is None else f"{r['alpha_last']:.3f}")
        table.add_row(*cells)
    Console(file=sys.stdout, width=160).print(table)
    print(json.dumps({"router": args.router, "dataset": args.dataset, "queries": len(texts),
                      "groups": len(members), "in_smaller_groups": sum(small.values()),
                      "smaller_groups": dict(sorted(small.items(), key=lambda kv: -kv[1])[:20]),
                      "routed_to_general": sum(r == "" for r in routes), "large_groups": rows}))
    return 0


def _route_alpha(out_dir: Path) -> dict[str, float]:
    """alpha_last (last 20%) of each cluster route's queries served by its own draft, from a replay CSV."""
    with open(out_dir / "replay_online.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["route"] and r["draft"] == r["route"]]
    out = {}
    for name in sorted({r["route"] for r in rows}):
        alphas = [float(r["alpha_tf"] or r["alpha"]) for r in rows if r["route"] == name]
        fifth = max(1, len(alphas) // 5)
        out[name] = sum(alphas[-fifth:]) / fifth
    return out


if __name__ == "__main__":
    raise SystemExit(main())
