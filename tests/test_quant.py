"""A weight-only quantized target (models/quant.py, issue 25): each quantized linear computes
exactly x @ W_q^T for its own dequantized weight W_q, at one position and at several, and
speculation stays lossless against the quantized target (greedy equality in float32, where the
kernels give every row the same result whatever the width of the pass)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import noisy_copy, plain_greedy, tiny_model
from torch import nn

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams
from onspec.models.fast_draft import Int8Linear
from onspec.models.quant import Int4Linear, WidthSwitch, quantize_linears, weight_bytes


def _dequantized(q: nn.Module) -> torch.Tensor:
    if isinstance(q, Int4Linear):
        return q.dequantized()
    return q.weight.float() * q.scales.float()[:, None]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [1, 5, 9])
def test_quantized_linear_is_its_dequantized_weight(kind, dtype, positions):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64).to(dtype)
    q = Int8Linear(lin) if kind == "int8" else Int4Linear(lin, group_size=32)
    w = _dequantized(q)  # [out, in] float32
    # float32 scales: the weights' own rounding error is half a quantization step at most (bf16
    # scales and zero points add their own rounding, 2^-9 relative, on top)
    step = (lin.weight.float().abs().amax(1, keepdim=True) / 127 if kind == "int8" else
            (lin.weight.float().reshape(64, 4, 32).amax(-1) - lin.weight.float().reshape(64, 4, 32).amin(-1))
            .repeat_interleave(32, 1) / 15)
    if dtype == torch.float32:
        assert ((w - lin.weight.float()).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()
    x = torch.randn(positions, 128).to(dtype)
    y = q(x).float()  # [positions, out]
    ref = x.float() @ w.t() + lin.bias.float()
    # float32 activations: float32 arithmetic (reordered sums); bf16: the output is rounded to bf16
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    assert (y - ref).abs().max().item() <= tol
    # a row's result does not depend on the rows beside it (what greedy equality needs)
    alone = torch.cat([q(x[i:i + 1]) for i in range(positions)])
    assert torch.equal(alone, q(x))


def test_quantize_linears_replaces_the_decoder_layers_and_keeps_the_head():
    model = tiny_model("llama", 0)
    head = model.get_output_embeddings()
    before = weight_bytes(model)
    n = quantize_linears(model, "int4", group_size=32)
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert model.get_output_embeddings() is head
    assert not any(type(m) is nn.Linear for name, m in model.named_modules() if name != "lm_head")
    assert weight_bytes(model) < before
    with pytest.raises(ValueError, match="int2"):
        quantize_linears(model, "int2")
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(nn.Linear(100, 64), group_size=32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculation_is_lossless_against_the_quantized_target(kind, k, tokenizer):
    target = copy.deepcopy(tiny_model("llama", 0))
    draft = noisy_copy(target, 0.2, seed=1)
    quantize_linears(target, kind, group_size=32)
    engine = SpeculativeEngine(target, tokenizer, draft, k=k)
    prompts = [tokenizer.encode(t) for t in ("hello world", "def f(x):\n    return", "the quick brown fox")]
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o.token_ids == plain_greedy(target, p, 40)
    accepted = sum(o.stats.accepted for o in outs)
    assert 0 < accepted < sum(o.stats.evaluated for o in outs)  # mixed steps: both paths of verify ran


def test_width_switch_runs_the_narrow_kernel_up_to_its_rows_and_the_wide_one_beyond():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    switch = WidthSwitch(Int4Linear(lin, group_size=32), lin, max_rows=4)
    x = torch.randn(2, 3, 64)  # 6 rows: wide
    assert torch.equal(switch(x), lin(x))
    assert torch.equal(switch(x[:1, :3]), switch.narrow(x[:1, :3]))  # 3 rows: narrow
    assert not torch.equal(switch(x[:1, :3]), lin(x[:1, :3]))
