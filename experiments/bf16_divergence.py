"""How lossless is bf16 speculation on this machine? Greedy outputs of the target alone vs the
speculative engine, both in bfloat16, on the same prompts (half HumanEval, half ShareGPT).

For each prompt: do the two outputs differ, and at the first divergence, what were the target's
top-2 logits in the one-position pass (target-only decoding) and in the multi-position verify
pass; were they exact ties after rounding? Then the distributional check: the mean log-probability
the float32 target assigns to each way's outputs, on the prompts where they differ (elsewhere the
two are the same tokens, so the same score). `--fp32-head` adds the same two ways with the
target's final projection (LM head) computed in float32 from the bf16 hidden state, the cheap fix
for ties made by rounding logits to bf16.

    .venv/bin/python experiments/bf16_divergence.py --prompts 64 --out docs/results/bf16-divergence
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

from onspec.bench.report import finish, save_json
from onspec.data.streams import iter_humaneval, iter_sharegpt
from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.sampling import SamplingParams
from onspec.models.loading import load_model
from onspec.models.pair import ModelConfig, load_pair


class Float32Head(torch.nn.Module):
    """An LM head that computes logits in float32 from the (e.g. bf16) hidden state, with a
    float32 copy of the weights: logits are never rounded to bf16, so two logits 0.05 apart stay
    apart (in bf16 logits near 20 are 0.125 apart). Costs the head's weights again in float32."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)
        self.bias = None if head.bias is None else torch.nn.Parameter(head.bias.detach().float(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)


def prompts_for(tokenizer, n: int, seed: int = 0, max_tokens: int = 512) -> list[tuple[str, list[int]]]:
    code = [("humaneval", q.encode(tokenizer)) for q in iter_humaneval()]
    chat = [("sharegpt", q.encode(tokenizer)) for q in itertools.islice(iter_sharegpt(), 2000)]
    chat = [c for c in chat if len(c[1]) <= max_tokens]
    rng = random.Random(seed)
    return rng.sample(code, n // 2) + rng.sample(chat, n - n // 2)


def decode(engine, prompt, n):
    """Output ids and, per generated position, (top-2 values, top-2 ids, width of the pass)."""
    seen = {}

    def on_record(rec):
        width = rec.k + 1
        top = rec.target_logits.float().topk(2, dim=-1)
        for j in range(rec.target_logits.shape[0]):
            seen.setdefault(rec.position + j - len(prompt), (top.values[j].tolist(), top.indices[j].tolist(), width))
    engine.record_logits = True  # full target logits in the records
    t0 = time.perf_counter()
    out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=n))], on_record=on_record)[0]
    return out.token_ids, seen, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--fp32-head", action="store_true", help="also run both ways with the target's LM head in float32")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", type=Path, default=None,
                    help="rows.json of an earlier run: decode only the prompts that differed there")
    args = ap.parse_args()

    target, draft = load_pair(ModelConfig(dtype="bfloat16"))  # what the CLI runs: packed target, int8 draft
    prompts = prompts_for(target.tokenizer, args.prompts)
    if args.only:
        earlier = json.loads(args.only.read_text())
        prompts = [p for p, r in zip(prompts, earlier) if r["bf16"]["differs"]]
    cfg = EngineConfig(k=args.k)
    bf16_head = target.model.get_output_embeddings()
    heads = {"bf16": bf16_head}
    if args.fp32_head:  # from the unpacked bf16 weights, re-read: the packed head has no plain weight
        plain = load_model("qwen2.5-coder-1.5b", dtype="bfloat16").model.get_output_embeddings()
        heads["fp32head"] = Float32Head(plain)
    rows = []
    for i, (source, prompt) in enumerate(prompts):
        row = {"source": source, "prompt_tokens": len(prompt)}
        for head_name, head in heads.items():
            target.model.set_output_embeddings(head)
            base = make_engine(target.model, target.tokenizer, None, cfg)
            spec = make_engine(target.model, target.tokenizer, draft.model, cfg)
            ref, ref_seen, t_ref = decode(base, prompt, args.max_new_tokens)
            out, out_seen, t_out = decode(spec, prompt, args.max_new_tokens)
            entry = {"target_only": ref, "speculative": out, "seconds": [t_ref, t_out], "differs": out != ref}
            if out != ref:
                d = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
                one, multi = ref_seen.get(d), out_seen.get(d)
                entry["first_divergence"] = {
                    "index": d,
                    "one_position": {"top2": one[0], "ids": one[1], "margin": one[0][0] - one[0][1]} if one else None,
                    "verify_pass": ({"top2": multi[0], "ids": multi[1], "margin": multi[0][0] - multi[0][1],
                                     "positions": multi[2]} if multi else None),
                }
            row[head_name] = entry
        target.model.set_output_embeddings(bf16_head)
        rows.append(row)
        save_json(args.out, rows, name="rows.partial.json", indent=None)  # progress survives an interruption
        print(f"[{i + 1}/{len(prompts)}] {source}: " + ", ".join(
            f"{h} {'DIFFERS' if row[h]['differs'] else 'same'}" for h in heads), file=sys.stderr, flush=True)

    # distributional check: the float32 target scores the outputs. Where the two ways agree the
    # scores are equal by construction, so only differing pairs are scored (both ways each).
    del draft, target
    fp32 = load_model("qwen2.5-coder-1.5b", dtype="float32").model
    for (source, prompt), row in zip(prompts, rows):
        for head_name in heads:
            if not row[head_name]["differs"]:
                continue
            for way in ("target_only", "speculative"):
                ids = row[head_name][way]
                with torch.no_grad():
                    logits = fp32(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
                lp = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
                row[head_name][way + "_fp32_logprob"] = float(lp.mean())

    summary = {"prompts": len(rows), "max_new_tokens": args.max_new_tokens, "k_max": args.k}
    for head_name in heads:
        es = [r[head_name] for r in rows]
        div = [e for e in es if e["differs"]]
        firsts = [e["first_divergence"] for e in div]
        ties = sum(1 for f in firsts if (f["one_position"] and f["one_position"]["margin"] == 0)
                   or (f["verify_pass"] and f["verify_pass"]["margin"] == 0))
        margins = [min(f["one_position"]["margin"], f["verify_pass"]["margin"]) for f in firsts
                   if f["one_position"] and f["verify_pass"]]
        lp_ref = sum(e["target_only_fp32_logprob"] for e in div) / len(div) if div else None
        lp_out = sum(e["speculative_fp32_logprob"] for e in div) / len(div) if div else None
        summary[head_name] = {
            "differing": len(div),
            "differing_code": sum(1 for r in rows if r[head_name]["differs"] and r["source"] == "humaneval"),
            "differing_chat": sum(1 for r in rows if r[head_name]["differs"] and r["source"] == "sharegpt"),
            "exact_ties_at_first_divergence": ties,
            "median_min_margin_at_divergence": sorted(margins)[len(margins) // 2] if margins else None,
            "max_min_margin_at_divergence": max(margins) if margins else None,
            "mean_first_divergence_index": sum(f["index"] for f in firsts) / len(firsts) if firsts else None,
            "fp32_mean_logprob_target_only_on_differing": lp_ref,
            "fp32_mean_logprob_speculative_on_differing": lp_out,
            "target_only_seconds": sum(e["seconds"][0] for e in es),
            "speculative_seconds": sum(e["seconds"][1] for e in es),
        }
    print(f"{'way':<10} {'differ':>7} {'code':>5} {'chat':>5} {'ties':>5} {'median margin':>14} {'fp32 logprob t-only':>20} "
          f"{'fp32 logprob spec':>18}")
    for head_name in heads:
        s = summary[head_name]
        med = "" if s["median_min_margin_at_divergence"] is None else f"{s['median_min_margin_at_divergence']:.4f}"
        lr, lo = s["fp32_mean_logprob_target_only_on_differing"], s["fp32_mean_logprob_speculative_on_differing"]
        print(f"{head_name:<10} {s['differing']:>4}/{len(rows):<2} {s['differing_code']:>5} {s['differing_chat']:>5} "
              f"{s['exact_ties_at_first_divergence']:>5} {med:>14} {lr if lr is None else round(lr, 4)!s:>20} "
              f"{lo if lo is None else round(lo, 4)!s:>18}")
    save_json(args.out, rows, name="rows.json", indent=None)
    return finish(args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
