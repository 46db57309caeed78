"""Drafts: derived from the target, or user-supplied and checked against it.

No separately pretrained small model with SmolLM2's vocabulary exists offline, so the default
draft is derived: the target's embeddings, its first N decoder layers and its final norm (and
LM head), with the target's tokenizer. Untrained it agrees with the target rarely; the online
trainer is what lifts it.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from transformers import AutoModelForCausalLM

from onspec.models.loading import LoadedModel, ModelSpecError, _atomic_save_dir, cache_dir, load_model
from onspec.models.precision import PackedLinear


def derive_draft(target: LoadedModel, num_layers: int) -> LoadedModel:
    """A shallow copy of the target: embeddings, the first `num_layers` layers, final norm."""
    packed = [n for n, m in target.model.named_modules() if isinstance(m, PackedLinear)]
    if packed:
        raise ModelSpecError(f"cannot derive a draft from {target.source}: its linear layers were packed for "
                             f"inference ({packed[0]}, ...), so their weights are gone; derive before packing")
    config = copy.deepcopy(target.model.config)
    total = config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ModelSpecError(f"--draft-layers must be in [1, {total - 1}] for this target ({total} layers), got {num_layers}")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=target.model.dtype)
    missing, _unexpected = draft.load_state_dict(target.model.state_dict(), strict=False)
    # the deeper layers are the expected "unexpected" keys; nothing the draft has may be missing
    if missing:
        raise ModelSpecError(f"cannot derive a draft from {target.source}: no weights for {missing[:5]}")
    draft.tie_weights()
    device = next(target.model.parameters()).device
    return LoadedModel(draft.to(device).eval(), target.tokenizer, f"{target.source}[first {num_layers} layers]")


def derived_draft_dir(target: LoadedModel, num_layers: int) -> Path:
    key = hashlib.sha256(target.source.encode()).hexdigest()[:12]
    return cache_dir() / "drafts" / f"{Path(target.source).name}-{key}-first{num_layers}"


def save_draft(draft: LoadedModel, out: Path, meta: dict) -> Path:
    """Write an HF directory (config, model.safetensors, tokenizer) atomically, replacing `out`."""
    _atomic_save_dir(Path(out), draft.model, draft.tokenizer, meta, overwrite=True)
    return Path(out)


def load_or_derive_draft(target: LoadedModel, num_layers: int, dtype: str = "auto") -> LoadedModel:
    """The default draft: derived once, saved as safetensors in the cache, loaded from there."""
    out = derived_draft_dir(target, num_layers)
    if not (out / "config.json").is_file():
        save_draft(derive_draft(target, num_layers), out, {"derived_from": target.source, "layers": num_layers})
    device = next(target.model.parameters()).device
    return load_model(str(out), device=device, dtype=dtype)


def check_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Speculative decoding compares p and q token by token: both must share one vocabulary."""
    tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if tv != dv:
        only_t = sorted(set(tv) - set(dv))[:5]
        only_d = sorted(set(dv) - set(tv))[:5]
        moved = sorted(t for t in set(tv) & set(dv) if tv[t] != dv[t])[:5]
        parts = [f"target vocabulary has {len(tv)} tokens, draft has {len(dv)}"]
        if only_t:
            parts.append(f"only in target: {only_t}")
        if only_d:
            parts.append(f"only in draft: {only_d}")
        if moved:
            parts.append(f"same token, different id: {moved}")
        raise ModelSpecError(f"draft {draft.source} does not share the target's tokenizer: " + "; ".join(parts))
    t_rows = target.model.get_output_embeddings().out_features
    d_rows = draft.model.get_output_embeddings().out_features
    if t_rows != d_rows:
        raise ModelSpecError(
            f"draft {draft.source} has an LM head over {d_rows} ids, the target over {t_rows}: "
            "the draft's and target's distributions must cover the same ids"
        )


def frozen_tables(model, train_embeddings: bool) -> dict:
    """A deepcopy memo that shares the (tied) float32 embedding table instead of copying it, when
    training leaves it frozen: drafts cloned with it, and their students, cost only their layers."""
    if train_embeddings:
        return {}
    return {id(p): p for p in model.parameters() if is_embedding(model, p) and p.dtype == torch.float32}


def is_embedding(model, p: torch.nn.Parameter) -> bool:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return p is emb or (out is not None and p is out.weight and out.weight is emb)
