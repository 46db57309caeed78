"""The SuffixDecoding reference (`onspec.peers.arctic`): why it cannot be built, the sdist's index
entry, and, built into the cache (or skipped with `available()`'s reason), its speculation on
synthetic repeating streams."""

from __future__ import annotations

import random

import pytest

from onspec.peers import arctic
from onspec.peers.arctic import ArcticConfig, ArcticSuffixCache, ArcticUnavailable


def test_no_cmake_is_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert arctic.available() == "cannot build SuffixDecoding: `cmake` is not on PATH"
    with pytest.raises(ArcticUnavailable, match="cmake"):
        arctic.build()


def test_no_nanobind_is_the_reason(tmp_path, monkeypatch):
    if arctic.shutil.which("cmake") is None or arctic._compiler() is None:
        pytest.skip("no cmake or C++ compiler here: an earlier reason wins")
    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path))
    real = arctic.importlib.util.find_spec
    monkeypatch.setattr(arctic.importlib.util, "find_spec", lambda name: None if name == "nanobind" else real(name))
    reason = arctic.available()
    assert reason is not None and ("nanobind" in reason or "C++20" in reason)


def test_sdist_url_checks_the_pinned_digest():
    page = (f'<a href="https://files.example/x/{arctic.SDIST}#sha256={arctic.SDIST_SHA256}">{arctic.SDIST}</a>'
            '<a href="https://files.example/y/arctic_inference-0.2.0.tar.gz#sha256=00">old</a>')
    assert arctic.sdist_url(page) == f"https://files.example/x/{arctic.SDIST}"
    with pytest.raises(ArcticUnavailable, match="not the pinned"):
        arctic.sdist_url(page.replace(arctic.SDIST_SHA256, "ab" * 32))
    with pytest.raises(ArcticUnavailable, match="lists no"):
        arctic.sdist_url("<html></html>")


def test_config_ranges():
    with pytest.raises(ValueError):
        ArcticConfig(min_token_prob=1.5)
    with pytest.raises(ValueError):
        ArcticConfig(max_cached_requests=-2)


@pytest.fixture(scope="module")
def native():
    """The built extension: built here once (~30 s of compiling) unless it cannot be."""
    reason = arctic.available()
    if reason is not None:
        pytest.skip(reason)
    return arctic.load()


@pytest.mark.slow
def test_builds_and_loads(native):
    assert arctic.extension_path().is_file()
    assert hasattr(native, "SuffixTree") and hasattr(native, "Draft")


def _serve(cache: ArcticSuffixCache, req_id, prompt: list[int], output: list[int]) -> list[int]:
    """Emit `output` one token at a time as the target would, speculating before each; the
    accepted length of each speculation against what was emitted next."""
    cache.start(req_id, prompt)
    accepted = []
    for i in range(len(output)):
        draft = cache.speculate(req_id, prompt + output[:i]).token_ids
        n = 0
        while n < len(draft) and i + n < len(output) and draft[n] == output[i + n]:
            n += 1
        accepted.append(n)
        cache.add(req_id, [output[i]])
    cache.stop(req_id)
    return accepted


@pytest.mark.slow
def test_speculation_returns_the_continuation_seen_before(native):
    cache = ArcticSuffixCache(module=native)
    answer = random.Random(0).sample(range(100, 140), 40)  # a 40-token "answer" with no repeat inside
    first = _serve(cache, "r0", [1, 2, 3], answer)
    assert sum(first) == 0  # nothing seen before
    second = _serve(cache, "r1", [4, 5, 6], answer)  # the same answer again: the global tree knows it
    assert second[0] == 0 and max(second) >= 16  # a 1-token match proposes 1 token; longer matches the rest
    cache.start("r2", [9])
    draft = cache.speculate("r2", [9] + answer[:20])
    assert draft.token_ids == answer[20:36] and draft.match_len >= 16 and draft.score == pytest.approx(16.0)


@pytest.mark.slow
def test_own_prompt_is_matched_and_outputs_are_evicted_fifo(native):
    cache = ArcticSuffixCache(ArcticConfig(max_cached_requests=2), module=native)
    code = list(range(200, 240))
    cache.start("edit", [7] + code + [8])  # the prompt carries the file; the answer repeats it
    assert cache.speculate("edit", [7] + code + [8] + code[:10]).token_ids == code[10:20]
    cache.add("edit", code[:10])
    cache.stop("edit")
    for r in ("a", "b"):
        cache.start(r, [1])
        cache.add(r, [300, 301, 302])
        cache.stop(r)
    assert cache.cached == ["a", "b"]  # "edit" went first
    cache.start("c", [5])
    assert cache.speculate("c", [5] + code[:5]).token_ids == []  # its output is gone from the global tree
    assert cache.memory_bytes() > 0
    with pytest.raises(ValueError):
        cache.start("c", [5])


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_the_reference_proposes_in_the_engine_losslessly(native, batch, tokenizer):
    """`--proposers arctic`: the reference beside the draft, through the same controller and verify.
    Greedy equality over a stream that repeats itself (float32, tiny model), its offers verified on
    some steps, and the second pass of the same prompts needs fewer target passes (its global tree)."""
    import copy

    from conftest import cached_draft, cached_model, reference_greedy

    from onspec.engine.build import make_engine
    from onspec.engine.engine import EngineConfig, Request
    from onspec.engine.sampling import SamplingParams

    target, draft = cached_model("llama"), copy.deepcopy(cached_draft("llama", "random"))
    engine = make_engine(target, tokenizer, draft, EngineConfig(k=4, proposers="arctic"))
    assert [p.kind for p in engine.proposers] == ["arctic"] and engine.suffix is None
    texts = ("abcabcabcabc", "def f(x):\n    return x\ndef g(x):\n    return", "hello world")[:batch]
    ids = [tokenizer.encode(t) for t in texts]
    n = 40
    passes = []
    for _ in range(2):
        outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in ids])
        for p, o in zip(ids, outs):
            assert o.token_ids == reference_greedy("llama", p, n)
        passes.append(sum(o.stats.steps for o in outs))
        assert all(o.stats.of("suffix").steps == 0 for o in outs)
    assert sum(o.stats.of("arctic").accepted for o in outs) > 0
    assert passes[1] < passes[0]
    stats = engine.stats()["proposers"]["arctic"]
    assert stats["cached_requests"] == 2 * batch and stats["memory_bytes"] > 0
