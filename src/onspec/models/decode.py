"""The engine's own forward pass for Llama- and Qwen2-family models on a CPU.

A decode step of the 1.5B target calls ~200 kernels; transformers wraps them in per-model and
per-layer Python (output-capturing decorators, mask preparation, keyword plumbing, attention
dispatch) that costs a few ms per pass here, a larger share of the 0.5B draft's pass than of the
target's. `DecodeForward` runs the same modules and weights in the same order with the same
arithmetic (equal logits to transformers' in float64 and bf16, tested) without those wrappers,
and with short-query attention (models/attention.py) for passes of up to 16 positions.

It is what the engine's ModelRunners call (`--forward auto`, the default, where `supported`);
`--forward transformers` calls the model itself. Training never uses it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from onspec.models.attention import short_query_attention

_FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def supported(model: nn.Module) -> str | None:
    """None if `DecodeForward` can run `model`, else why not."""
    name = type(model).__name__
    if name not in _FAMILIES:
        return f"{name} is not one of {', '.join(_FAMILIES)}"
    if next(model.parameters()).device.type != "cpu":
        return "not on a CPU"
    config = model.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(config, "hidden_act", "silu") != "silu":
        return "an MLP other than SwiGLU"
    return None


def decode_forward(model: nn.Module) -> "DecodeForward | None":
    """The engine's forward for `model`, or None where transformers' own must run it."""
    return DecodeForward(model) if supported(model) is None else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeForward:
    """Callable like the model with the arguments SlotKVCache passes; returns an object with
    `logits`. Modules are looked up at every call, so a head or layer replaced after a swap (the
    running draft's refresh) is the one used."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 past_key_values, logits_to_keep: int = 0, **_) -> SimpleNamespace:
        """input_ids, position_ids: [batch, L]; attention_mask: additive [batch, 1, L, slots + L];
        past_key_values: a DynamicCache the new keys and values are appended to."""
        body = self.model.model
        batch, length = input_ids.shape
        hidden = body.embed_tokens(input_ids)
        cos, sin = body.rotary_emb(hidden, position_ids)  # [batch, L, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            shape = (batch, length, -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = past_key_values.update(k, v, i)
            out, _ = short_query_attention(attn, q, k, v, attention_mask, scaling=attn.scaling)
            hidden = hidden + attn.o_proj(out.reshape(batch, length, -1))
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        hidden = body.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.model.lm_head(hidden))
