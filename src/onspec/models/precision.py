"""Numerics switches that sit outside the engine's logic."""

from __future__ import annotations

import torch
from torch import nn


class Float32Head(nn.Module):
    """An LM head that computes logits in float32 from the (e.g. bf16) hidden state, with a
    float32 copy of the weights: logits are never rounded to bf16, so two logits 0.05 apart stay
    apart (in bf16 logits near 20 are 0.125 apart). Costs the head's weights again in float32."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = nn.Parameter(head.weight.detach().float(), requires_grad=False)
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach().float(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden.float(), self.weight, self.bias)
