"""Stopping (stop strings, max_new_tokens), per-step records and stats, input validation."""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
from conftest import ARCHS, cached_draft, cached_model, full_logits, reference_greedy

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams

TEXTS = ("hello world", "a", "the quick brown fox jumps", "def f(x):\n    return", "1234", "abc")
N_NEW = 40


def make_engine(arch: str, setup: str, tokenizer, target=None) -> SpeculativeEngine:
    """'target-only'; 'noisy' (partly agreeing draft, k=3); 'identical' (k=4: every step
    emits 5 tokens, so stops fall inside a step and later tokens must be dropped)."""
    target = target if target is not None else cached_model(arch)
    if setup == "target-only":
        return SpeculativeEngine(target, tokenizer, None)
    if setup == "noisy":
        return SpeculativeEngine(target, tokenizer, cached_draft(arch, "noisy"), k=3)
    if setup == "identical":
        return SpeculativeEngine(target, tokenizer, copy.deepcopy(target), k=4)
    raise ValueError(setup)


def _printable(t: int) -> bool:
    return 33 <= t < 127


def find_stop_string(ref: list[int], tokenizer, length: int, start: int = 4):
    """(j, s): s = the text of ref[j-length+1 .. j] (printable ASCII), absent from the text
    of ref[:j]: the stop string s is first completed by token j."""
    for j in range(max(start, length - 1), len(ref)):
        toks = ref[j - length + 1 : j + 1]
        if all(_printable(t) for t in toks):
            s = bytes(toks).decode()
            if s not in tokenizer.decode(ref[:j]):
                return j, s
    return None


# -- stop strings -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("setup", ["target-only", "noisy", "identical"])
@pytest.mark.parametrize("arch", ARCHS)
def test_stop_string(arch, setup, length, tokenizer):
    """A stop string that plain greedy produces mid-continuation ends generation at the token
    that completes it (kept in token_ids), finish_reason 'stop', and the text is cut just
    before the stop string. Length 2 strings span two tokens."""
    cases = []
    for text in TEXTS:
        ids = tokenizer.encode(text)
        ref = reference_greedy(arch, ids, N_NEW)
        found = find_stop_string(ref, tokenizer, length)
        if found:
            cases.append((ids, ref, *found))
    assert cases, "no usable stop string in these continuations"
    engine = make_engine(arch, setup, tokenizer)
    reqs = [Request(ids, SamplingParams(max_new_tokens=N_NEW, stop=("never-produced", s), ignore_eos=True)) for ids, _, _, s in cases]
    outs = engine.generate(reqs)
    for (ids, ref, j, s), o in zip(cases, outs):
        full = tokenizer.decode(ref[: j + 1])
        assert o.token_ids == ref[: j + 1]
        assert o.finish_reason == "stop"
        assert o.text == full[: full.find(s)]
        assert s not in o.text


def test_stop_string_as_plain_str(tokenizer):
    """stop='x' is accepted as a single stop string."""
    assert SamplingParams(stop="ab").stop == ("ab",)


def test_stop_string_before_eos_in_the_same_step(tokenizer):
    """When a stop string is completed by token j and the EOS comes at token j+1 of the same
    verify step, generation ends at token j, the token that completed the stop string (the
    documented contract: 'token ids keep the token that ended generation'). Speculative output
    must equal target-only output, which never sees the EOS."""
    arch, k = "llama", 4
    base = cached_model(arch)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        ref = reference_greedy(arch, ids, N_NEW)
        found = find_stop_string(ref, tokenizer, 1, start=1)
        # with an identical draft every step emits k+1 tokens: want j and j+1 in one step
        if found and found[0] % (k + 1) != k and ref[found[0] + 1] not in ref[: found[0] + 1]:
            j, s = found
            break
    else:
        pytest.fail("no usable case")
    target = copy.deepcopy(base)
    target.generation_config.eos_token_id = ref[j + 1]
    params = SamplingParams(max_new_tokens=N_NEW, stop=(s,))
    only = SpeculativeEngine(target, tokenizer, None).generate([Request(ids, params)])[0]
    spec = SpeculativeEngine(target, tokenizer, copy.deepcopy(target), k=k).generate([Request(ids, params)])[0]
    assert only.token_ids == ref[: j + 1] and only.finish_reason == "stop"
    assert spec.text == only.text and spec.finish_reason == "stop"
    assert spec.token_ids == only.token_ids, (
        f"stop string {s!r} completed by token {j} but generation went on to the EOS at {j + 1}"
    )


# -- max_new_tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 13])
@pytest.mark.parametrize("setup", ["target-only", "noisy", "identical"])
def test_max_new_tokens_exact(setup, n, tokenizer):
    """Exactly max_new_tokens tokens, finish_reason 'length', even when a step could emit more."""
    engine = make_engine("qwen2", setup, tokenizer)
    ids = [tokenizer.encode(t) for t in TEXTS[:3]]
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in ids])
    for p, o in zip(ids, outs):
        assert o.token_ids == reference_greedy("qwen2", p, N_NEW)[:n]
        assert o.finish_reason == "length"
        assert o.stats.generated == n
        if setup == "identical":
            assert o.stats.steps == math.ceil(n / 5)


def test_mixed_budgets_in_one_batch(tokenizer):
    """Rows with different max_new_tokens leave the batch at their own budget; the others go on."""
    engine = make_engine("llama", "noisy", tokenizer)
    ids = [tokenizer.encode(t) for t in TEXTS[:4]]
    budgets = [3, 40, 1, 17]
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=b, ignore_eos=True)) for p, b in zip(ids, budgets)])
    for p, b, o in zip(ids, budgets, outs):
        assert o.token_ids == reference_greedy("llama", p, N_NEW)[:b]
        assert o.finish_reason == "length"


# -- records and stats --------------------------------------------------------------------------


def collect(engine, requests):
    engine.record_logits = True  # full logits in the records, to check them against plain forwards
    records = defaultdict(list)
    outs = engine.generate(requests, on_record=lambda r: records[r.request_id].append(r))
    return outs, records


@pytest.mark.parametrize("arch", ARCHS)
def test_records_and_stats(arch, tokenizer):
    """One StepRecord per verify step per request; records reconstruct the output; each
    record's target (and draft) logits equal those models' logits from scratch at the verified
    positions; stats agree with the records."""
    target, draft = cached_model(arch), cached_draft(arch, "noisy")
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    ids = [tokenizer.encode(t) for t in TEXTS[:3]]
    budgets = [25, 30, 11]
    reqs = [Request(p, SamplingParams(max_new_tokens=b, ignore_eos=True)) for p, b in zip(ids, budgets)]
    outs, records = collect(engine, reqs)
    assert set(records) == {r.request_id for r in reqs}

    for req, out in zip(reqs, outs):
        recs = records[req.request_id]
        st = out.stats
        assert [r.step for r in recs] == list(range(st.steps)) and len(recs) == st.steps
        emitted: list[int] = []
        for i, r in enumerate(recs):
            n = r.num_accepted
            context = req.prompt_ids + emitted  # the tokens before the verified positions
            assert r.position == len(context)
            assert 0 <= n <= r.k <= 3
            assert len(r.emitted) == n + 1
            assert r.proposed[:n].tolist() == r.emitted[:n]
            if n < r.k:  # greedy: a rejected proposal differs from the target's choice
                assert int(r.proposed[n]) != r.emitted[n]
            # target logits: row i predicts the token at position + i given context + emitted[:i]
            assert r.target_logits.shape == (n + 1, target.config.vocab_size)
            ref = full_logits(target, context + r.emitted[:n])[r.position - 1 :]
            assert torch.allclose(r.target_logits, ref, atol=1e-4), (r.target_logits - ref).abs().max()
            assert r.target_logits.argmax(-1).tolist() == r.emitted  # greedy: emitted = target argmax
            m = min(n + 1, r.k)
            if r.k:
                assert r.draft_logits.shape == (m, target.config.vocab_size)
                dref = full_logits(draft, context + r.emitted[: m - 1])[r.position - 1 :]
                assert torch.allclose(r.draft_logits, dref, atol=1e-4)
                assert r.draft_logits.argmax(-1).tolist() == r.proposed[:m].tolist()
            else:
                assert r.draft_logits is None
            emitted += r.emitted
            if i < len(recs) - 1:
                assert len(emitted) < len(out.token_ids)  # only the last step may be trimmed
        assert emitted[: len(out.token_ids)] == out.token_ids
        assert len(emitted) >= len(out.token_ids)

        assert st.accepted == sum(r.num_accepted for r in recs)
        assert st.evaluated == sum(r.evaluated for r in recs)
        assert st.proposed == sum(r.k for r in recs)
        assert st.alpha == st.accepted / st.evaluated
        assert sum(st.accepted_hist) == st.steps
        assert st.mean_accepted_length == (st.accepted + st.steps) / st.steps
        assert st.generated == len(out.token_ids)
        assert st.target_forwards == st.steps
        # the draft runs max(k_r) forwards for the whole batch; a row near its budget proposes fewer
        assert st.draft_forwards >= st.proposed

    solo = engine.generate([Request(ids[0], SamplingParams(max_new_tokens=25, ignore_eos=True))])[0].stats
    assert solo.draft_forwards == solo.proposed  # alone, every draft forward is one of its proposals


def test_records_target_only(tokenizer):
    """Target-only steps: no proposals, no draft logits, one target row per step, alpha None."""
    engine = make_engine("gpt2", "target-only", tokenizer)
    ids = tokenizer.encode("hello")
    outs, records = collect(engine, [Request(ids, SamplingParams(max_new_tokens=6, ignore_eos=True))])
    (recs,) = records.values()
    assert len(recs) == 6
    for r in recs:
        assert r.k == 0 and r.num_accepted == 0 and r.evaluated == 0
        assert r.draft_logits is None
        assert r.target_logits.shape[0] == 1
    assert [r.emitted[0] for r in recs] == outs[0].token_ids
    assert outs[0].stats.alpha is None and outs[0].stats.accepted_hist == [6]


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(stop=("ok", "")), "stop"),
    ],
)
def test_sampling_params_rejects_bad_values(kwargs, name):
    """Invalid sampling parameters raise ValueError naming the parameter."""
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_engine_rejects_negative_k(tokenizer):
    with pytest.raises(ValueError, match="k"):
        SpeculativeEngine(cached_model("llama"), tokenizer, cached_draft("llama", "noisy"), k=-1)


@pytest.mark.parametrize("setup", ["target-only", "noisy"])
def test_engine_rejects_empty_prompt(setup, tokenizer):
    engine = make_engine("llama", setup, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([Request([], SamplingParams())])


@pytest.mark.parametrize("setup", ["target-only", "noisy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_rejects_too_long(arch, setup, tokenizer):
    """prompt + max_new_tokens beyond max_position_embeddings (512) is refused up front."""
    engine = make_engine(arch, setup, tokenizer)
    assert cached_model(arch).config.max_position_embeddings == 512
    with pytest.raises(ValueError, match="context"):
        engine.generate([Request([65] * 500, SamplingParams(max_new_tokens=20))])
    with pytest.raises(ValueError, match="context"):
        engine.generate([Request([65] * 600, SamplingParams(max_new_tokens=1))])


def test_engine_at_the_context_limit(tokenizer):
    """A request that fits exactly is accepted and decodes correctly up to the last position
    (gpt2: learned absolute positions, an off-by-one would index past the table)."""
    target = cached_model("gpt2")
    prompt = [(i * 7) % 200 + 33 for i in range(500)]
    ref = reference_greedy("gpt2", prompt, 12)
    only = SpeculativeEngine(target, tokenizer, None).generate([Request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
    assert only.token_ids == ref
    spec = SpeculativeEngine(target, tokenizer, cached_draft("gpt2", "noisy"), k=3)
    out = spec.generate([Request(prompt, SamplingParams(max_new_tokens=9, ignore_eos=True))])[0]  # 500 + 9 + k = 512
    assert out.token_ids == ref[:9]


def test_engine_empty_request_list(tokenizer):
    assert make_engine("llama", "noisy", tokenizer).generate([]) == []
