"""Chunked prefill (issue 26, item 1): a joining request's prompt is cached a chunk per step, between
verify steps, so one long prompt does not stall the running requests. Chunked prefill gives the
logits of whole prefill (greedy equality holds in float32); while a long prompt prefills, a running
request gets tokens every step and no target pass feeds more than a chunk; a prefilling request can
be cancelled, counts as running, and is ended between chunks by --request-timeout."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from conftest import ARCHS, cached_draft, cached_model, reference_greedy
from test_http_reliability import app_client, models, openai_error  # noqa: F401 (fixtures)

from onspec.engine.engine import EngineConfig, Request, SpeculativeEngine
from onspec.engine.runner import ModelRunner
from onspec.engine.sampling import SamplingParams
from onspec.serve.scheduler import Event

PROMPT = list(range(3, 203))  # 200 tokens: many chunks of a few tokens
SHORT = [5, 6, 7, 8, 9]


def _widths(model) -> list[tuple[int, int]]:
    """Record the [batch, positions] of every forward pass of `model` from now on (at its input
    embedding, which transformers' forward and onspec's, models/decode.py, both run first)."""
    seen = []
    _HOOKS.append(model.get_input_embeddings().register_forward_pre_hook(
        lambda _, args: seen.append(tuple(args[0].shape))))
    return seen


_HOOKS = []


@pytest.fixture
def target():
    model = cached_model("llama")
    yield model
    while _HOOKS:  # the cached model is shared: drop the recording hooks
        _HOOKS.pop().remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_gives_the_logits_of_whole_prefill(arch, chunk):
    """Two prompts of different lengths, cached whole or in chunks: the next pass's logits agree in
    float32 (to rounding), the chunks return where the next starts, and the last tokens stay pending."""
    model = cached_model(arch)
    prompts = [PROMPT[:57], SHORT]
    whole = ModelRunner(model, 2)
    assert whole.prefill(prompts) == 56
    chunked = ModelRunner(model, 2)
    starts = [0]
    while starts[-1] < 56:
        starts.append(chunked.prefill(prompts, starts[-1], chunk))
        assert chunked.pending == ([[p[-1]] for p in prompts] if starts[-1] == 56 else [[], []])
    assert starts == sorted(set(starts)) and len(starts) - 1 == -(-56 // chunk)
    extra = torch.tensor([[11, 12], [13, 14]])
    torch.testing.assert_close(chunked.feed(extra), whole.feed(extra), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 3])
def test_greedy_equality_with_chunked_prefill(arch, k, tokenizer):
    """Requests join a running batch in chunks of 5 prompt tokens; each output equals the target's
    plain greedy output token for token."""
    engine = SpeculativeEngine(cached_model(arch), tokenizer, cached_draft(arch, "noisy"), k=k)
    engine.prefill_chunk = 5
    prompts = [PROMPT[:40], SHORT, PROMPT[100:123], PROMPT[:2]]
    lengths = [20, 30, 12, 16]
    reqs = [Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    engine.add(reqs[:2])
    outputs, step = {}, 0
    while engine.num_running:
        if step == 3:
            engine.add(reqs[2:])
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.output
        step += 1
    for r, p, n in zip(reqs, prompts, lengths):
        assert outputs[r.request_id].token_ids == reference_greedy(arch, p, n)


def test_a_running_request_gets_tokens_every_step_while_a_long_prompt_prefills(target, tokenizer):
    """A long prompt joins beside a running request: it prefills over ceil(199 / 16) steps, counts as
    running meanwhile, no target pass feeds more than a chunk, and the running request gets at least
    one token every step (before chunked prefill, `add` fed the whole prompt in one pass)."""
    engine = SpeculativeEngine(target, tokenizer, cached_draft("llama", "noisy"), k=3)
    engine.prefill_chunk = 16
    short = Request(SHORT, SamplingParams(max_new_tokens=200, ignore_eos=True))
    long = Request(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.add(short)
    engine.step()
    widths = _widths(target)
    engine.add(long)
    steps = 0
    while len(outputs := engine.step()) == 1:  # the long request's first output is in the step it joins
        steps += 1
        assert engine.num_running == 2 and engine.num_prefilling == 1
        assert outputs[0].request_id == short.request_id and outputs[0].token_ids
    assert steps == -(-199 // 16) - 1  # the step that caches the last chunk is the long request's first
    assert max(w for _, w in widths) <= 16
    while engine.num_running:
        for o in engine.step():
            if o.request_id == long.request_id and o.finished:
                assert o.output.token_ids == reference_greedy("llama", PROMPT, 8)


def test_the_prefill_budget_is_shared_by_long_prompts_and_never_exceeded(target, tokenizer, monkeypatch):
    """Two long prompts join beside a running request under a budget of 16 prompt tokens per step:
    no step caches more than 16 in all, the two get equal shares while both prefill (then the one
    left takes the whole budget), the running request gets tokens every step, and both long
    requests decode the target's greedy output."""
    from onspec.engine.sequence import Prefill

    cached: list[tuple[int, int]] = []  # (prefill, tokens) of this step's chunks
    advance = Prefill.advance

    def recording(p, chunk):
        before = p.cached
        tokens = advance(p, chunk)
        cached.append((id(p), (p.cached - before) * len(p.seqs)))
        return tokens

    monkeypatch.setattr(Prefill, "advance", recording)
    engine = SpeculativeEngine(target, tokenizer, cached_draft("llama", "noisy"), k=3)
    engine.prefill_chunk = 16
    short = Request(SHORT, SamplingParams(max_new_tokens=300, ignore_eos=True))
    engine.add(short)
    engine.step()
    longs = [Request(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True)),
             Request(PROMPT[:120], SamplingParams(max_new_tokens=8, ignore_eos=True))]
    engine.add(longs[0])
    engine.add(longs[1])
    done = {}
    while len(done) < 2:
        cached.clear()
        outputs = {o.request_id: o for o in engine.step()}
        assert sum(n for _, n in cached) <= 16
        if len(cached) == 2 and engine.num_prefilling == 2:
            assert cached[0][1] == cached[1][1] == 8
        assert outputs[short.request_id].token_ids
        done.update({r: o for r, o in outputs.items() if o.finished and r != short.request_id})
    for r in longs:
        assert done[r.request_id].output.token_ids == reference_greedy("llama", r.prompt_ids, 8)


def test_a_prefilling_request_can_be_cancelled(target, tokenizer):
    """Cancelled after two of its chunks, a long prompt leaves at once (no further pass feeds it); the
    running request is unaffected."""
    engine = SpeculativeEngine(target, tokenizer, cached_draft("llama", "noisy"), k=3)
    engine.prefill_chunk = 16
    short = Request(SHORT, SamplingParams(max_new_tokens=30, ignore_eos=True))
    long = Request(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.add([short, long])  # the long one is prefilled apart: the short one joins at once
    first = engine.step()
    assert [o.request_id for o in first] == [short.request_id] and engine.num_prefilling == 1
    first += engine.step()
    dropped = engine.cancel(long.request_id)
    assert dropped.finished and dropped.finish_reason == "abort" and dropped.output.token_ids == []
    assert engine.num_running == 1 and engine.num_prefilling == 0
    widths = _widths(target)
    tokens = [t for o in first for t in o.token_ids]
    while engine.num_running:
        for o in engine.step():
            tokens += o.token_ids
    assert max(w for _, w in widths) <= 4  # k + 1: only the short request's verify passes
    assert tokens == reference_greedy("llama", SHORT, 30)
    assert engine.cancel(long.request_id) is None


def test_engine_config_prefill_chunk():
    assert EngineConfig().prefill_chunk == 512
    with pytest.raises(ValueError, match="prefill-chunk"):
        EngineConfig(prefill_chunk=-1)


# -- the server: metrics, time to first token, --request-timeout between chunks ------------------------


def _slow(model, seconds_per_token: float) -> None:
    """Make each forward pass of `model` take time in proportion to the tokens it feeds (a real
    model's prefill cost, on the tiny one), at its input embedding (where any forward starts)."""
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _, args: time.sleep(seconds_per_token * args[0].numel()))


def _served(app_client, **server):
    """An in-process server on the tiny pair with 32-token chunks and a target whose prefill of
    4,000 tokens takes 4 s (the scheduler started after the model is slowed)."""
    c, state = app_client(start=False, **server)
    state.engine.prefill_chunk = 32
    _slow(state.engine.target, 1e-3)
    state.scheduler.start()
    return c, state


def _metric(c, name: str) -> float:
    line = next(x for x in c.get("/metrics").text.splitlines() if x.startswith(f"onspec:{name} "))
    return float(line.split()[1])


def test_a_short_request_streams_beside_a_long_prompt_and_metrics_count_it(app_client):
    """While a 4,000-token prompt prefills (4 s whole), /metrics counts it as running and a short
    request sent after it gets its first token within a few chunks and finishes."""
    c, state = _served(app_client)
    events: dict[str, list[float]] = {"long": [], "short": []}

    def sink(name):
        return lambda ev: events[name].append(time.monotonic())

    t0 = time.monotonic()
    state.scheduler.submit(Request([7] * 4000, SamplingParams(max_new_tokens=4, ignore_eos=True)), sink("long"))
    time.sleep(0.3)
    assert _metric(c, "num_requests_running") == 1 and _metric(c, "num_requests_waiting") == 0
    sent = time.monotonic()
    state.scheduler.submit(Request(SHORT, SamplingParams(max_new_tokens=8, ignore_eos=True)), sink("short"))
    deadline = time.monotonic() + 30
    while len(events["long"]) < 1 or not events["short"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert events["short"][0] - sent < 1.0, "the short request waited for the long prompt's prefill"
    assert events["short"][0] < events["long"][0] and events["long"][0] - t0 > 3.5


def test_long_prompts_waiting_their_turn_hold_no_decoding_slot(app_client):
    """--max-batch 2 and two 4,000-token prompts: the second waits in the engine for its turn to
    prefill (--long-prefills 1) and holds no slot, so a short request sent after both still joins at
    once and streams while the first long prompt prefills (before, the two long prompts filled both
    slots and the short one waited for the first to finish)."""
    c, state = _served(app_client, max_batch=2)
    assert state.engine.long_prefills == 1
    events: dict[str, list[float]] = {"long": [], "long2": [], "short": []}

    def sink(name):
        return lambda ev: events[name].append(time.monotonic())

    for name in ("long", "long2"):
        state.scheduler.submit(Request([7] * 4000, SamplingParams(max_new_tokens=4, ignore_eos=True)), sink(name))
    time.sleep(0.3)
    assert state.engine.num_waiting == 1 and state.scheduler.running == 1
    assert _metric(c, "num_requests_running") == 1 and _metric(c, "num_requests_waiting") == 1
    sent = time.monotonic()
    state.scheduler.submit(Request(SHORT, SamplingParams(max_new_tokens=8, ignore_eos=True)), sink("short"))
    deadline = time.monotonic() + 60
    while not events["short"] or not events["long2"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert events["short"][0] - sent < 1.0, "the short request waited for a slot held by a waiting long prompt"
    assert events["short"][0] < events["long"][0] < events["long2"][0]  # the long ones in arrival order


def test_request_timeout_ends_a_prefilling_request_between_chunks(app_client, caplog):
    """--request-timeout 0.5 s on a prompt whose prefill takes 4 s: a 504 at the deadline, the slot is
    free within a chunk or two, the rest of the prompt is never fed, and the log says what ended it."""
    c, state = _served(app_client, request_timeout=0.5)
    widths = _widths(state.engine.target)
    caplog.set_level(logging.INFO, logger="onspec.serve")
    r = c.post("/v1/completions", json={"prompt": [7] * 4000, "max_tokens": 4, "ignore_eos": True})
    openai_error(r, 504, "request_timeout")
    ended = time.monotonic()
    while state.scheduler.running:
        assert time.monotonic() - ended < 0.5, "the prefill went on after the request timed out"
        time.sleep(0.01)
    time.sleep(0.2)
    assert sum(b * w for b, w in widths) < 2000
    assert any("ended by --request-timeout; slot freed" in m for m in caplog.messages), caplog.messages
    assert not any("cancelled by its client" in m for m in caplog.messages)


def test_a_draft_swap_during_a_prefill_leaves_no_mixed_cache(target, tokenizer):
    """A new draft version goes live while a long prompt is half cached: the row joins with a draft
    cache of the new version only (its logits equal a cache made whole with the new weights; before,
    the first chunks' keys and values were the old version's), and its output is the target's."""
    from copy import deepcopy

    engine = SpeculativeEngine(target, tokenizer, deepcopy(cached_draft("llama", "noisy")), k=3)
    engine.prefill_chunk = 16
    engine.add(Request(SHORT, SamplingParams(max_new_tokens=100, ignore_eos=True)))
    engine.step()
    long = Request(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.add(long)
    engine.step()
    engine.step()  # two chunks cached with version 0
    g = torch.Generator().manual_seed(1)
    new = {n: p + 0.05 * torch.randn(p.shape, generator=g) for n, p in engine.draft.state_dict().items()}
    engine.offer_draft(new, version=1)
    while engine.num_prefilling:
        engine.step()  # the swap goes live at the next verify step, mid-prefill
    assert engine.draft_version == 1
    row = [s.request.request_id for s in engine._rows].index(long.request_id)
    fresh = ModelRunner(engine.drafter.fast.model, 1, engine.drafter.forward)
    fresh.prefill([PROMPT])
    cut = len(PROMPT) - 1  # the prompt's keys and values (all but its last token), layer by layer
    store = engine.drafter.runner.kv.rows[row]
    made = fresh.kv.rows[0]
    torch.testing.assert_close(store[:, :, :, :cut], made[:, :, :, :cut], rtol=1e-4, atol=1e-4)
    while engine.num_running:
        for o in engine.step():
            if o.request_id == long.request_id and o.finished:
                assert o.output.token_ids == reference_greedy("llama", PROMPT, 8)
