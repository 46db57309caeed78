"""Short-query attention (models/attention.py): the same arithmetic as SDPA's for the decode and
verify passes, SDPA itself everywhere else, and the engine exact with it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cached_draft, tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.kv import SlotKVCache
from onspec.engine.sampling import SamplingParams
from onspec.models.attention import MAX_QUERY, NAME, implementation, short_query_attention, use_for


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_switch_and_cached_passes_equal_sdpa(arch):
    model = tiny_model(arch, 0, dtype=torch.float64)
    assert model.config._attn_implementation == "sdpa"
    assert use_for(model)
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {NAME}
    logits = {}
    for impl in ("sdpa", NAME):
        with implementation(model, impl):
            kv = SlotKVCache(2, "cpu", torch.float64)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 200, (2, 30), generator=g)
            valid = torch.ones_like(ids, dtype=torch.bool)
            valid[1, :7] = False  # rows of different lengths
            out = [kv.forward(model, ids, valid)]
            for width in (5, 1, 9):
                x = torch.randint(0, 200, (2, width), generator=g)
                out.append(kv.forward(model, x, torch.ones_like(x, dtype=torch.bool)))
            logits[impl] = out
    assert model.config._attn_implementation == NAME  # restored
    for a, b in zip(logits["sdpa"], logits[NAME]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_gradients_equal_sdpas():
    """A trainer's short forward (a draft that is its own running copy) differentiates alike."""
    grads = {}
    for impl in ("sdpa", NAME):
        model = tiny_model("qwen2", 0, dtype=torch.float64).train()
        with implementation(model, impl):
            ids = torch.arange(3, 3 + 12)[None]
            model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads["sdpa"], grads[NAME]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_engine_greedy_equality_either_way(attention, tokenizer):
    """Speculative output equals target-only output with either attention (float32, a batch)."""
    target = tiny_model("llama", 0)
    draft = copy.deepcopy(cached_draft("llama", "noisy"))
    prompts = [tokenizer.encode(t) for t in ("hello world", "the quick brown fox jumps", "x")]
    params = SamplingParams(max_new_tokens=32)
    spec = SpeculativeEngine(target, tokenizer, draft, k=4, attention=attention)
    assert (target.config._attn_implementation == NAME) == (attention == "auto")
    assert (spec.fast.model.config._attn_implementation == NAME) == (attention == "auto")
    plain = SpeculativeEngine(target, tokenizer, None, k=0, attention=attention)
    outs = spec.generate([Request(p, params) for p in prompts])
    refs = plain.generate([Request(p, params) for p in prompts])
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
