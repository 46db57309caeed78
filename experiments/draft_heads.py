"""The cheaper draft, measured: cost ratio c and acceptance alpha for a reduced head of N ids
(full, 64k, 32k, 16k) x the draft's weights (bf16, int8), on code and chat.

The target decodes each prompt alone (bf16, greedy); every draft variant is then scored
teacher-forced on those same tokens: alpha = share of positions where the draft's greedy choice
(over its kept ids) equals the target's token, which is the per-token acceptance rate of greedy
verification. c = one-position draft pass / one-position target pass (median over repeats,
variants timed in rotating order so drift hits all alike). coverage = share of the target's
tokens inside the kept ids.

    .venv/bin/python experiments/draft_heads.py --prompts 8 --out docs/results/draft-heads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bf16_divergence import prompts_for  # noqa: E402

from onspec.bench.machine import verify_cost_curve  # noqa: E402
from onspec.bench.report import finish  # noqa: E402
from onspec.engine.build import draft_vocab, make_engine  # noqa: E402
from onspec.engine.engine import EngineConfig, Request  # noqa: E402
from onspec.engine.sampling import SamplingParams  # noqa: E402
from onspec.models.fast_draft import FastDraft  # noqa: E402
from onspec.models.loading import load_model  # noqa: E402

SIZES = (0, 65536, 32768, 16384)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="per domain")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    target = load_model("qwen2.5-coder-1.5b", dtype="bfloat16")
    draft = load_model("qwen2.5-coder-0.5b", dtype="bfloat16")
    tok = target.tokenizer
    prompts = prompts_for(tok, 2 * args.prompts, seed=1)
    base = make_engine(target.model, tok, None, EngineConfig())
    outputs = [base.generate([Request(p, SamplingParams(max_new_tokens=args.max_new_tokens))])[0].token_ids
               for _, p in prompts]
    variants = {}
    for n in SIZES:
        for int8 in (False, True):
            ids = draft_vocab(target.model, tok, n).ids if n else None
            variants[(n, int8)] = FastDraft(draft.model, ids, quant="int8" if int8 else "none")
    probe = prompts[0][1] + outputs[0]
    times = {key: [] for key in variants}
    t_target = []
    for r in range(args.repeats):
        t_target.append(verify_cost_curve(target.model, probe, [1])["1"])
        keys = list(variants)
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[key].append(verify_cost_curve(variants[key].model, probe, [1])["1"])
    t1 = sorted(t_target)[len(t_target) // 2]
    table = []
    for key, fast in variants.items():
        row = {"vocab": key[0] or "full", "int8": key[1], "draft_ms": 1e3 * sorted(times[key])[len(times[key]) // 2]}
        row["c"] = row["draft_ms"] / 1e3 / t1
        for domain in ("humaneval", "sharegpt"):
            hits = total = covered = 0
            for (source, prompt), out in zip(prompts, outputs):
                if source != domain or not out:
                    continue
                with torch.no_grad():
                    logits = fast.model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
                choice = fast.to_full_ids(logits.argmax(-1))
                truth = torch.tensor(out)
                hits += int((choice == truth).sum())
                total += len(out)
                covered += len(out) if fast.vocab_ids is None else int(torch.isin(truth, fast.vocab_ids).sum())
            row[f"alpha_{domain}"] = hits / total
            row[f"coverage_{domain}"] = covered / total
        table.append(row)
    full = next(r for r in table if r["vocab"] == "full" and not r["int8"])
    print(f"target one-position pass: {t1 * 1e3:.1f} ms")
    print(f"{'vocab':>6} {'int8':>5} {'draft ms':>9} {'c':>6} {'c vs full bf16':>15} {'alpha code':>11} {'alpha chat':>11} "
          f"{'cover code':>11} {'cover chat':>11}")
    for r in table:
        print(f"{r['vocab']!s:>6} {r['int8']!s:>5} {r['draft_ms']:9.1f} {r['c']:6.3f} {r['c'] / full['c'] - 1:+15.0%} "
              f"{r['alpha_humaneval']:11.3f} {r['alpha_sharegpt']:11.3f} {r['coverage_humaneval']:11.3f} "
              f"{r['coverage_sharegpt']:11.3f}")
    result = {"target_ms": t1 * 1e3, "prompts_per_domain": args.prompts, "max_new_tokens": args.max_new_tokens,
              "rows": table}
    return finish(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
