"""Attention for short queries on a CPU: the decode and verify passes (1 to 16 positions).

torch's SDPA kernel on a CPU is built for long queries: for a query of a few positions over the
cached keys, two batched matmuls with the query heads grouped per KV head cost a fraction of it
(measured in docs/results.md, "onspec's own forward and short-query attention"). The arithmetic is
SDPA's: the scores, softmax and weighted sum in float32 (measured against a float64 reference the
error equals SDPA's; float64 models compute in float64). Longer queries (prefill, training), other devices, bool
masks and dropout go to transformers' SDPA function unchanged.

The engine's own forward (models/decode.py) calls it directly. It is also registered with
transformers' `AttentionInterface` under `NAME`, so a model's own forward can run it:
`implementation(model, NAME)` switches a model to it for a while (the bench's transformers ways use
this, so that they run the same kernels as onspec).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "onspec_short"
MAX_QUERY = 16
"""Longest query (positions per row) computed here; longer ones go to SDPA."""


def short_query_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query: [batch, heads, L, dim]; key, value: [batch, kv_heads, S, dim]; attention_mask: an
    additive float mask [batch, 1, L, S] or None. Returns ([batch, L, heads, dim], None), as
    transformers' attention functions do."""
    batch, heads, length, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    fast = (length <= MAX_QUERY and query.device.type == "cpu" and not (module.training and dropout > 0)
            and heads % kv_heads == 0 and kwargs.get("sliding_window") is None
            and (attention_mask is None and length == 1
                 or attention_mask is not None and attention_mask.is_floating_point()))
    if not fast:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    acc = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for a float64 model
    # query heads h = kv * groups + g (transformers' repeat_kv order): one matmul per KV head
    q = query.to(acc).reshape(batch * kv_heads, groups * length, dim)
    k = key.to(acc).reshape(batch * kv_heads, slots, dim)
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale).view(batch, heads, length, slots)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :slots].to(acc)
    probs = torch.softmax(scores, dim=-1).view(batch * kv_heads, groups * length, slots)
    out = torch.bmm(probs, value.to(acc).reshape(batch * kv_heads, slots, dim))
    out = out.view(batch, heads, length, dim).transpose(1, 2).to(query.dtype).contiguous()
    return out, None


AttentionInterface.register(NAME, short_query_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks it is given are built as for SDPA


@contextlib.contextmanager
def implementation(model: torch.nn.Module, name: str):
    """Run `model` with attention implementation `name` (e.g. "sdpa") inside the block."""
    before = model.config._attn_implementation
    _set(model, name)
    try:
        yield model
    finally:
        _set(model, before)


def _set(model: torch.nn.Module, name: str) -> None:
    # every submodule's config is this object or a sub-config of it; set them all
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            config._attn_implementation = name
