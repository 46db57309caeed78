"""Numerics switches that sit outside the engine's logic."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """nn.Linear whose weight is reordered once into oneDNN's blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing uses), run with
    `torch.ops.mkldnn._linear_pointwise`: on a native-bf16 CPU, faster than `F.linear` at the few
    positions of a decode or verify pass (docs/results.md). Inference only: the packed weight is not a trainable parameter."""

    BATCH_HINT = 4  # the layout is chosen for ~k+1 positions; any number of positions works

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.BATCH_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)


def can_pack(model: nn.Module) -> bool:
    """oneDNN packing pays for bf16 weights on a CPU with native bf16."""
    from onspec.models.loading import cpu_has_native_bf16

    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and cpu_has_native_bf16() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of an inference-only model by a PackedLinear; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, PackedLinear(getattr(owner, child)))
    return len(names)
