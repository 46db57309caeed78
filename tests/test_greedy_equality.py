"""The central guarantee: at temperature 0, speculative decoding is lossless.

Whatever the draft proposes, the output must equal plain greedy decoding of the target
(`plain_greedy`: one full forward per token, no KV cache) token for token.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, EOS, cached_draft, cached_model, reference_greedy

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams

N_NEW = 40  # many verify rounds for every k
TEXTS = ("hello world", "a", "the quick brown fox jumps", "def f(x):\n    return")


def prompts(tokenizer, batch: str) -> list[list[int]]:
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert len(ids[1]) == 1  # the batch includes a 1-token prompt
    return {"single": ids[:1], "one-token": ids[1:2], "batch4": ids}[batch]


def greedy(n: int = N_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


def assert_equals_reference(outs, arch, prompt_ids, tokenizer, dtype=torch.float32, n=N_NEW):
    for p, o in zip(prompt_ids, outs, strict=True):
        ref = reference_greedy(arch, p, n, dtype=dtype)
        assert o.token_ids == ref, f"prompt {p!r}: first difference at {_first_diff(o.token_ids, ref)}"
        assert o.finish_reason == "length"
        assert o.text == tokenizer.decode(ref, skip_special_tokens=True)


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("batch", ["single", "batch4"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["random", "noisy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_greedy_equals_plain_greedy(arch, draft_kind, k, batch, tokenizer):
    """Speculative greedy == plain greedy of the target, for a draft that never agrees
    ('random') and one that agrees partly ('noisy': accept, reject and partial steps mixed),
    alone and in a batch of 4 prompts of different lengths (one of them 1 token long)."""
    target, draft = cached_model(arch), cached_draft(arch, draft_kind)
    ids = prompts(tokenizer, batch)
    engine = SpeculativeEngine(target, tokenizer, draft, k=k)
    outs = engine.generate([Request(p, greedy(ignore_eos=True)) for p in ids])
    assert_equals_reference(outs, arch, ids, tokenizer)
    for o in outs:
        assert o.stats.steps > 1
        assert o.stats.k == k
    if draft_kind == "noisy":
        # the noisy draft exercises both paths: some proposals accepted, some rejected
        assert sum(o.stats.accepted for o in outs) > 0
        assert any(o.stats.evaluated > o.stats.accepted for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_token_prompt_alone(arch, tokenizer):
    """A 1-token prompt on its own (prefill has nothing to cache) still decodes exactly."""
    ids = prompts(tokenizer, "one-token")
    engine = SpeculativeEngine(cached_model(arch), tokenizer, cached_draft(arch, "noisy"), k=3)
    outs = engine.generate([Request(p, greedy(ignore_eos=True)) for p in ids])
    assert_equals_reference(outs, arch, ids, tokenizer)
    assert outs[0].stats.steps > 1


@pytest.mark.parametrize("draft", ["none", "k=0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_target_only_equals_plain_greedy(arch, draft, tokenizer):
    """Without a draft (or with k=0) the engine is plain KV-cached decoding: one token per step."""
    ids = prompts(tokenizer, "batch4")
    d = None if draft == "none" else cached_draft(arch, "noisy")
    engine = SpeculativeEngine(cached_model(arch), tokenizer, d, k=0 if d is not None else 4)
    outs = engine.generate([Request(p, greedy(ignore_eos=True)) for p in ids])
    assert_equals_reference(outs, arch, ids, tokenizer)
    for o in outs:
        assert o.stats.steps == N_NEW
        assert o.stats.alpha is None
        assert o.stats.accepted_hist == [N_NEW]
        assert o.stats.k == 0


def test_float64_exact(tokenizer):
    """The same equality in float64: exactness is a property of the algorithm, not a float accident."""
    dtype = torch.float64
    target, draft = cached_model("llama", dtype=dtype), cached_draft("llama", "noisy", dtype=dtype)
    assert next(target.parameters()).dtype == dtype and next(draft.parameters()).dtype == dtype
    ids = prompts(tokenizer, "batch4")
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    outs = engine.generate([Request(p, greedy(ignore_eos=True)) for p in ids])
    assert_equals_reference(outs, "llama", ids, tokenizer, dtype=dtype)
    assert all(o.stats.steps > 1 for o in outs)
    assert sum(o.stats.accepted for o in outs) > 0


K_EOS = 3


@pytest.mark.parametrize("draft_kind", ["noisy", "identical"])
@pytest.mark.parametrize("arch", ARCHS)
def test_eos_stops_generation(arch, draft_kind, tokenizer):
    """An EOS token ends a row right after it (EOS kept in token_ids, finish_reason 'stop'),
    also when it is an accepted draft token in the middle of a step (identical draft: every
    step emits k+1 tokens); the other rows of the batch go on and still equal plain greedy."""
    base = cached_model(arch)
    ids = prompts(tokenizer, "batch4")
    ref0 = reference_greedy(arch, ids[0], N_NEW)
    # T: a token the first prompt's greedy continuation emits for the first time at step j >= 8,
    # not at the end of an identical-draft step (so tokens after it must be dropped)
    j = next(j for j in range(8, N_NEW) if ref0[j] not in ref0[:j] and ref0[j] != EOS and j % (K_EOS + 1) != K_EOS)
    eos = ref0[j]
    target = copy.deepcopy(base)
    target.generation_config.eos_token_id = eos
    draft = cached_draft(arch, "noisy") if draft_kind == "noisy" else copy.deepcopy(target)
    engine = SpeculativeEngine(target, tokenizer, draft, k=K_EOS)
    outs = engine.generate([Request(p, greedy()) for p in ids])

    assert outs[0].token_ids == ref0[: j + 1]
    assert outs[0].finish_reason == "stop"
    for p, o in zip(ids, outs):
        expected = reference_greedy(arch, p, N_NEW, stop_ids=(eos, EOS))
        assert o.token_ids == expected
        assert o.finish_reason == ("stop" if expected[-1] in (eos, EOS) else "length")
    assert outs[0].stats.steps > 1


def test_eos_ignored_with_ignore_eos(tokenizer):
    """ignore_eos=True decodes through the EOS token up to max_new_tokens."""
    base = cached_model("llama")
    ids = prompts(tokenizer, "single")
    ref = reference_greedy("llama", ids[0], N_NEW)
    target = copy.deepcopy(base)
    target.generation_config.eos_token_id = ref[5]
    engine = SpeculativeEngine(target, tokenizer, cached_draft("llama", "noisy"), k=3)
    out = engine.generate([Request(ids[0], greedy(ignore_eos=True))])[0]
    assert out.token_ids == ref
    assert out.finish_reason == "length"


@pytest.mark.parametrize("batch", ["single", "batch4"])
@pytest.mark.parametrize("draft_kind", ["random", "noisy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_default_engine_greedy_equals_plain_greedy(arch, draft_kind, batch, tokenizer):
    """The engine every command builds (make_engine on default configs: adaptive k, the int8
    running draft on CPU) keeps greedy equality."""
    import copy

    from onspec.engine.build import make_engine
    from onspec.engine.engine import EngineConfig

    target, draft = cached_model(arch), copy.deepcopy(cached_draft(arch, draft_kind))
    ids = prompts(tokenizer, batch)
    engine = make_engine(target, tokenizer, draft, EngineConfig(k=4))
    assert engine.policy is not None and engine.fast.int8  # the defaults really are in play
    outs = engine.generate([Request(p, greedy(ignore_eos=True)) for p in ids])
    assert_equals_reference(outs, arch, ids, tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_several_drafts_verify_in_one_target_pass(arch, tokenizer):
    """Three drafters (one never agrees, one agrees partly, one target-only row k = 0 by budget)
    share one engine: rows of each join at different steps, with different k; each row's output
    equals plain greedy, and every engine step verifies in exactly one target forward (beside the
    prefill passes of rows added before it)."""
    from onspec.engine.drafter import Drafter

    target = cached_model(arch)
    engine = SpeculativeEngine(target, tokenizer, cached_draft(arch, "noisy"), k=3)
    engine.add_drafter(Drafter(cached_draft(arch, "random"), k=5, name="random"))
    engine.add_drafter(Drafter(copy.deepcopy(target), k=2, name="same"))
    calls = []
    # the head runs once per target pass, whichever forward runs the model (models/decode.py)
    hook = target.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    ids = prompts(tokenizer, "batch4")
    first = [Request(p, greedy(ignore_eos=True)) for p in ids[:2]]
    engine.add(first[0])
    engine.add(first[1], drafter="random")
    late = [Request(ids[2], greedy(ignore_eos=True)), Request(ids[3], greedy(n=N_NEW // 2, ignore_eos=True))]
    outs, steps = {}, 0
    prefills = sum(len(p) > 1 for p in ids[:2])  # prefill passes of the next step (a 1-token prompt has none)
    while len(outs) < 4:
        if steps == 3:  # two more rows join mid-stream, with other drafters
            engine.add(late[0], drafter="same")
            engine.add(late[1], drafter="random")
            prefills += sum(len(p) > 1 for p in ids[2:])
        before = len(calls)
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
                assert o.drafter == {first[0].request_id: "general", first[1].request_id: "random",
                                     late[0].request_id: "same", late[1].request_id: "random"}[o.request_id]
        steps += 1
        # a step first prefills the rows added before it (one pass for each add), then verifies
        assert len(calls) - before == prefills + 1, "one target pass per step for every drafter's rows"
        prefills = 0
    hook.remove()
    for r, p in zip(first + late, ids):
        n = r.params.max_new_tokens
        assert outs[r.request_id].output.token_ids == reference_greedy(arch, p, n)
    same = outs[late[0].request_id].output.stats
    assert same.alpha == 1.0 and same.k == 2  # the identical draft accepts everything, at its own k
    assert outs[first[1].request_id].output.stats.k == 5


def test_one_failing_row_leaves_the_batch_alone(tokenizer, monkeypatch):
    """A row whose own verification raises finishes with reason 'error' and a message; the other
    rows of the batch go on and still equal plain greedy."""
    arch = ARCHS[0]
    engine = SpeculativeEngine(cached_model(arch), tokenizer, cached_draft(arch, "noisy"), k=3)
    ids = prompts(tokenizer, "batch4")
    reqs = [Request(p, greedy(ignore_eos=True)) for p in ids]
    bad = reqs[1].request_id
    verify = engine.verify

    def flaky(seq, draw, logits):
        if seq.request.request_id == bad and len(seq.generated) > 5:
            raise RuntimeError("boom")
        return verify(seq, draw, logits)

    monkeypatch.setattr(engine, "verify", flaky)
    engine.add(reqs)
    outs = {}
    while engine.num_running:
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert outs[bad].finish_reason == "error" and "boom" in outs[bad].error and outs[bad].output is None
    good = [r for r in reqs if r.request_id != bad]
    assert_equals_reference([outs[r.request_id].output for r in good], arch, [r.prompt_ids for r in good], tokenizer)
    with pytest.raises(RuntimeError, match="boom"):  # offline generate names the failure
        monkeypatch.setattr(engine, "verify", lambda seq, draw, logits: (_ for _ in ()).throw(RuntimeError("boom")))
        engine.generate([Request(ids[0], greedy())])
