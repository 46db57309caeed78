"""Weight-only int8 linear layers, and the per-channel int8 quantizer the int8 kernels share."""

from __future__ import annotations

import torch
from torch import nn


def int8_per_channel(source: nn.Linear, inverse_smooth: torch.Tensor | None = None, pad: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`source`'s weight as symmetric int8 with one float32 scale per output channel (absmax / 127):
    (q [out + pad, in], scale [out + pad]). With `inverse_smooth` (1 / s, SmoothQuant's), W * s is
    quantized; `pad` zero rows are appended (kernels that pack whole blocks of outputs)."""
    w = source.weight.detach().float()
    if inverse_smooth is not None:
        w = w / inverse_smooth  # W * s
    if pad:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
    scale = (w.abs().amax(1) / 127.0).clamp_min(1e-8)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output channel (symmetric, absmax / 127)."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.register_buffer("weight", torch.empty(source.out_features, source.in_features, dtype=torch.int8,
                                                   device=source.weight.device))
        self.register_buffer("scales", torch.empty(source.out_features, dtype=source.weight.dtype,
                                                   device=source.weight.device))
        self.bias = source.bias  # shared with the master: small, and exact
        self.refresh(source)

    @torch.no_grad()
    def refresh(self, source: nn.Linear) -> None:
        w = source.weight.float()
        scales = (w.abs().amax(1) / 127.0).clamp_min(1e-12)  # [out]
        self.weight.copy_(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.scales.copy_(scales.to(self.scales.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [tokens, in]
        if x2.device.type == "cpu" and x2.dtype == self.scales.dtype:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # [tokens, out]
        else:  # other devices: dequantise on the fly (correct, not faster)
            y = nn.functional.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
