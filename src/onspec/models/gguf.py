"""GGUF -> safetensors directory, once, tensor by tensor, straight to the dtype that will run.

transformers' own `from_pretrained(gguf_file=...)` dequantises the whole file to float32 first
(1.5B: ~7 GiB, and ~5 minutes for the default pair with a float32 save). Here each tensor is
dequantised (gguf-py), passed through transformers' per-architecture tensor processor (e.g. the
Llama q/k un-permutation) and cast at once, so memory holds the model in the final dtype only.
The directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from onspec.models.errors import ModelSpecError
from onspec.models.progress import StepProgress, human_size, note


def convert_gguf(path: Path, out: Path, dtype: torch.dtype, eos_token_ids: tuple[int, ...] = (),
                 meta: dict | None = None) -> Path:
    """Write an HF directory for the GGUF file `path` at `out` (kept if it exists)."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    if (out / "config.json").is_file():
        ensure_architectures(out)
        return out
    t0 = time.perf_counter()
    dtype_name = str(dtype).removeprefix("torch.")
    note(f"converting {path.name} to {dtype_name} safetensors, once, into {out}")
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as e:
        raise ModelSpecError(f"cannot read GGUF file {path}: {e}") from None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(str(path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    tensors: dict[str, torch.Tensor] = {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(int(t.n_elements) for t in reader.tensors) * itemsize  # the bytes it will hold in `dtype`
    with StepProgress(f"converting {path.name} ({len(reader.tensors)} tensors)", total) as progress:
        for t in reader.tensors:
            result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                       tensor_key_mapping=names, parsed_parameters={"tensors": {}, "config": {}})
            if result.name in names:
                w = np.ascontiguousarray(result.weights)
                tensors[names[result.name]] = torch.from_numpy(w if w.flags.writeable else w.copy()).to(dtype)
            progress.advance(int(t.n_elements) * itemsize)
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected -= {n for n in expected if n.startswith("lm_head.")}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ModelSpecError(f"GGUF file {path} lacks weights for {missing[:5]} ({len(missing)} in all)")
    config.dtype = dtype
    config.architectures = [type(skeleton).__name__]  # as save_pretrained writes it: the class it loads as
    generation = GenerationConfig.from_model_config(config)
    if eos_token_ids:
        generation.eos_token_id = list(eos_token_ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    note(f"writing {human_size(sum(t.numel() * t.element_size() for t in tensors.values()))} to {out}")
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"converted_from": str(path), "dtype": dtype_name,
                "seconds": round(time.perf_counter() - t0, 1), **(meta or {})}
        (tmp / "onspec.json").write_text(json.dumps(info, indent=2))
        if not out.exists():
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_architectures(out: Path) -> None:
    """Conversions written before `architectures` was in their config.json get it, in place: other
    tools reading the cache (vLLM) take it to pick the class, and without it load a headless model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = out / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures") or config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=out)
    except OSError:
        return  # a read-only cache: onspec itself loads it by model_type all the same
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
