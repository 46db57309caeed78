"""The kernel table (models/kernels.py): the host's features decide the path, read at run time,
and a host's class can be stood in for with ONSPEC_CPU_FLAGS."""

from __future__ import annotations

import pytest
import torch

from onspec.models import kernels


@pytest.fixture
def as_host(monkeypatch):
    """Choose as a CPU with these flags would (the kernel libraries themselves are not held back)."""

    def set_flags(flags: str, machine: str = "x86_64"):
        monkeypatch.setenv(kernels.FLAGS_ENV, flags)
        kernels.host.cache_clear()
        monkeypatch.setattr(kernels.platform, "machine", lambda: machine)
        return kernels.host()

    yield set_flags
    kernels.host.cache_clear()


def test_an_avx2_host_runs_fbgemm_and_says_why_not_vllm(as_host):
    host = as_host("avx2,fma")
    assert host.overridden and not host.native_bf16 and host.vector == f"avx2 fma ({kernels.FLAGS_ENV})"
    why = dict((p.name, w) for p, w in kernels.table())
    assert "AVX-512 VNNI" in why["w8a8-vllm"]
    if "fbgemm" in torch.backends.quantized.supported_engines:
        assert why["w8a8-fbgemm"] is None and kernels.choose() == "w8a8-fbgemm"
    assert kernels.describe("w8a8-fbgemm") == {"cpu": "x86_64", "vector": host.vector, "kernels": "w8a8-fbgemm"}


def test_a_cpu_without_avx2_or_an_arm_cpu_falls_back_to_none(as_host):
    as_host("sse4_2")
    assert kernels.choose() == "none"
    assert "AVX2" in dict((p.name, w) for p, w in kernels.table())["w8a8-fbgemm"]
    as_host("asimd,asimddp", machine="aarch64")
    why = dict((p.name, w) for p, w in kernels.table())
    assert "aarch64" in why["w8a8-fbgemm"] and "aarch64" in why["w8a8-vllm"]
    assert kernels.choose() == "none"


def test_the_dtype_and_the_disk_copy_follow_the_host(as_host):
    """On an AVX2 host `--dtype auto` is float32, and a model that its kernel path quantizes is
    stored in bf16 (no float32 copy on disk); an explicit --dtype float32 keeps float32 numerics
    and its float32 copy; on a host with no quantized path, float32 is what runs and is stored."""
    from onspec.models.loading import resolve_dtype
    from onspec.models.pair import ModelConfig, stored_dtype

    cpu = torch.device("cpu")
    as_host("avx2,fma")
    assert resolve_dtype("auto", cpu) == torch.float32
    if "fbgemm" in torch.backends.quantized.supported_engines:
        assert stored_dtype(ModelConfig(), cpu) == torch.bfloat16
    assert stored_dtype(ModelConfig(dtype="float32"), cpu) is None
    assert ModelConfig(dtype="float32").target_kind == "none"
    assert stored_dtype(ModelConfig(target_quant="none"), cpu) is None
    as_host("sse4_2")
    assert stored_dtype(ModelConfig(), cpu) is None
    as_host("avx2,fma,avx512f,avx512_vnni,avx512_bf16")
    assert resolve_dtype("auto", cpu) == torch.bfloat16 and stored_dtype(ModelConfig(), cpu) is None
