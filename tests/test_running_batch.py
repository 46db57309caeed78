"""Requests join and leave a running batch between steps (what a server's scheduler does); each
row's output must equal running that request alone: greedy token for token, sampling seed for seed."""

from __future__ import annotations

import pytest
from conftest import ARCHS, cached_draft, cached_model, reference_greedy

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams

TEXTS = ("hello world", "a", "the quick brown fox jumps over", "def f(x):\n    return")


def _run_staggered(engine, requests, join_at, cancel=None):
    """requests[i] joins before step join_at[i]; `cancel` = (request index, step) drops one."""
    outputs, step = {}, 0
    pending = sorted(range(len(requests)), key=lambda i: join_at[i])
    while pending or engine.num_running:
        joining = [i for i in pending if join_at[i] <= step]
        pending = [i for i in pending if join_at[i] > step]
        engine.add([requests[i] for i in joining])
        if cancel is not None and step == cancel[1]:
            dropped = engine.cancel(requests[cancel[0]].request_id)
            assert dropped is not None and dropped.finish_reason == "abort" and dropped.finished
            outputs[dropped.request_id] = dropped.output
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.output
        step += 1
    return [outputs[r.request_id] for r in requests]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 3])
def test_joining_rows_decode_as_if_alone_greedy(arch, k, tokenizer):
    target, draft = cached_model(arch), cached_draft(arch, "noisy")
    engine = SpeculativeEngine(target, tokenizer, draft, k=k)
    ids = [tokenizer.encode(t) for t in TEXTS]
    lengths = [30, 12, 25, 18]  # rows leave at different steps while others join
    reqs = [Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(ids, lengths)]
    outs = _run_staggered(engine, reqs, join_at=[0, 2, 3, 9])
    for p, n, o in zip(ids, lengths, outs):
        assert o.token_ids == reference_greedy(arch, p, n)


def test_joining_rows_sample_as_if_alone(tokenizer):
    target, draft = cached_model("llama"), cached_draft("llama", "noisy")
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    ids = [tokenizer.encode(t) for t in TEXTS]
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=20, seed=s, ignore_eos=True) for s in range(4)]
    alone = [engine.generate([Request(p, sp)])[0].token_ids for p, sp in zip(ids, params)]
    outs = _run_staggered(engine, [Request(p, sp) for p, sp in zip(ids, params)], join_at=[0, 1, 5, 5])
    assert [o.token_ids for o in outs] == alone


def test_cancelled_row_leaves_and_others_are_unaffected(tokenizer):
    target, draft = cached_model("qwen2"), cached_draft("qwen2", "noisy")
    engine = SpeculativeEngine(target, tokenizer, draft, k=2)
    ids = [tokenizer.encode(t) for t in TEXTS]
    reqs = [Request(p, SamplingParams(max_new_tokens=16, ignore_eos=True)) for p in ids]
    outs = _run_staggered(engine, reqs, join_at=[0, 0, 1, 2], cancel=(1, 3))
    assert outs[1].finish_reason == "abort" and len(outs[1].token_ids) < 16
    for i in (0, 2, 3):
        assert outs[i].token_ids == reference_greedy("qwen2", ids[i], 16)


def test_an_invalid_request_is_refused_without_touching_the_batch(tokenizer):
    engine = SpeculativeEngine(cached_model("llama"), tokenizer, cached_draft("llama", "noisy"), k=2)
    ok = Request(tokenizer.encode("hello"), SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.add([ok])
    with pytest.raises(ValueError, match="empty"):
        engine.add([Request([], SamplingParams())])
    assert engine.num_running == 1
    while engine.num_running:
        done = engine.step()
    assert done[0].output.token_ids == reference_greedy("llama", ok.prompt_ids, 8)


def test_step_outputs_stream_the_whole_output(tokenizer):
    """The StepOutputs of a request add up to its output: token ids, and the incremental text
    (with a stop string held back, then cut) equals the text decoded at the end."""
    engine = SpeculativeEngine(cached_model("llama"), tokenizer, cached_draft("llama", "noisy"), k=3)
    whole = engine.generate([Request(tokenizer.encode("hello"), SamplingParams(max_new_tokens=40, ignore_eos=True))])[0]
    for stop in ((), (whole.text[10:13],)):
        params = SamplingParams(max_new_tokens=40, ignore_eos=True, stop=stop)
        engine.add([Request(tokenizer.encode("hello"), params), Request(tokenizer.encode("a"), params)])
        ids, text, last = {}, {}, {}
        while engine.num_running:
            for o in engine.step():
                ids.setdefault(o.request_id, []).extend(o.token_ids)
                text[o.request_id] = text.get(o.request_id, "") + o.text
                if o.finished:
                    last[o.request_id] = o.output
        assert len(last) == 2
        for rid, out in last.items():
            assert ids[rid] == out.token_ids and text[rid] == out.text
