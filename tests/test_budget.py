"""The per-step prefill budget (issue 41, item 2): a step's prompt tokens are sized to a step-latency
target from the measured costs of a verify step and of a prefilled token; prompts that fit go first,
long prompts share the rest. The engine tests run under a fake clock that charges each target pass
for its tokens, so step times are exact and the same on every host."""

from __future__ import annotations

import pytest
from conftest import byte_tokenizer, cached_draft, cached_model, reference_greedy

from onspec.engine.budget import AUTO_FACTOR, PrefillBudget, parse_target
from onspec.engine.engine import EngineConfig, Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams

LONG = [3 + i % 200 for i in range(400)]  # 400 tokens
SHORT = [5, 6, 7, 8, 9]


# -- the budget alone -------------------------------------------------------------------------------


def test_off_and_idle_steps_cache_the_cap():
    b = PrefillBudget(cap=100, target="off")
    b.observe_decode(0.1)
    b.observe_prefill(10, 1.0)
    assert b.tokens(decoding=True) == 100
    auto = PrefillBudget(cap=100, target="auto")
    assert auto.tokens(decoding=False) == 100  # nothing decodes: nothing to protect
    assert PrefillBudget(cap=0, target="auto").tokens(decoding=True) == 0  # whole prompts


def test_auto_sizes_the_step_to_twice_a_verify_step():
    b = PrefillBudget(cap=512, target="auto", floor=16, probe=64)
    assert b.tokens(decoding=True) == 64  # nothing measured yet: a probe
    b.observe_decode(0.1)
    b.observe_prefill(64, 0.064)  # 1 ms a token
    assert b.seconds == pytest.approx(AUTO_FACTOR * 0.1)
    assert b.tokens(decoding=True) == 100  # (0.2 - 0.1) / 0.001
    b.decode_s = 0.6
    assert b.tokens(decoding=True) == 512  # capped
    b.token_s = 1.0
    assert b.tokens(decoding=True) == 16  # the floor: prompts always progress


def test_a_fixed_target_in_seconds():
    b = PrefillBudget(cap=1000, target="0.3")
    b.observe_decode(0.1)
    b.observe_prefill(100, 0.2)  # 2 ms a token
    assert b.seconds == 0.3 and b.tokens(decoding=True) == 100


@pytest.mark.parametrize("bad", ["0", "-1", "fast", "inf", "nan", ""])
def test_bad_targets_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="--step-latency"):
        parse_target(bad)
    with pytest.raises(ValueError, match="--step-latency"):
        EngineConfig(step_latency=bad)


def test_share_fits_first_then_evenly():
    share = PrefillBudget.share
    assert share([500, 4, 300], [1, 1, 1], 64) == [30, 4, 30]  # the short one whole, the long two evenly
    assert share([10, 20], [1, 1], 64) == [10, 20]
    assert share([10, 20], [3, 1], 50) == [10, 20]  # a group of 3 rows costs 30 tokens
    assert share([10, 20], [3, 1], 40) == [6, 20]  # the cheaper first; the group gets the 20 left, 6 a row
    assert share([1000, 1000, 1000], [1, 1, 1], 2) == [1, 1, 1]  # each advances
    assert share([7, 9], [1, 1], 0) == [0, 0]  # no budget: whole prompts
    # a prompt marked whole is cached whole even beyond the budget, before a cheaper long one's rest
    assert share([60, 3], [1, 1], 20, whole=[True, False]) == [60, 1]
    for remaining, rows, budget in [([100, 3, 50, 7], [1, 2, 1, 1], 32), ([900] * 5, [1] * 5, 512)]:
        chunks = share(remaining, rows, budget)
        assert sum(c * r for c, r in zip(chunks, rows)) <= budget
        assert all(0 < c <= n for c, n in zip(chunks, remaining))


# -- the engine, under a fake clock -------------------------------------------------------------------


class PassClock:
    """A clock that only moves when the target runs a pass: `overhead` s a pass plus `per_token` s for
    each position it feeds (a CPU's cost shape: prefill chunks cost by their tokens)."""

    def __init__(self, model, overhead: float = 0.002, per_token: float = 0.001) -> None:
        self.now = 0.0
        self.hook = model.get_input_embeddings().register_forward_pre_hook(self._charge)
        self.overhead, self.per_token = overhead, per_token

    def _charge(self, _, args) -> None:
        self.now += self.overhead + self.per_token * args[0].numel()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked():
    model = cached_model("llama")
    clock = PassClock(model)
    yield model, clock
    clock.hook.remove()


def _engine(model, clock, target: str, cap: int = 128) -> SpeculativeEngine:
    engine = SpeculativeEngine(model, byte_tokenizer(), cached_draft("llama", "noisy"), k=3)
    engine.budget = PrefillBudget(cap=cap, target=target, floor=4)
    engine.clock = clock
    return engine


def _run(engine, clock, late: Request):
    """Three short requests decode; a 400-token prompt joins, then one more short request. Returns
    the fake seconds of every step while the long prompt prefilled with the target then, the steps the late short
    request waited for its first token, and every output."""
    shorts = [Request(SHORT, SamplingParams(max_new_tokens=120, ignore_eos=True)) for _ in range(3)]
    long = Request(LONG, SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.add(shorts)
    for _ in range(4):
        engine.step()  # the costs are measured
    engine.add(long)
    times, waited, outputs, step = [], None, {}, 0
    while engine.num_running:
        if step == 2:
            engine.add(late)
        t0, target = clock(), engine.budget.seconds
        for o in engine.step():
            if o.request_id == late.request_id and o.token_ids and waited is None:
                waited = step - 2
            if o.finished:
                outputs[o.request_id] = o.output
        if any(p.seqs[0].request is long for p in engine._prefilling):
            times.append((clock() - t0, target))
        step += 1
    return times, waited, outputs, [*shorts, long, late]


def test_auto_keeps_steps_near_the_target_beside_a_long_prompt(clocked):
    """Under the auto target each step while the long prompt prefills takes about twice a verify step
    (measured from the fake clock), where the fixed budget's steps take several times that; a short
    request arriving meanwhile gets its first token in the next step; every output is the target's
    greedy output."""
    model, clock = clocked
    engine = _engine(model, clock, "auto")
    late = Request(SHORT[:3], SamplingParams(max_new_tokens=10, ignore_eos=True))
    times, waited, outputs, requests = _run(engine, clock, late)
    assert len(times) > 3
    assert all(seconds <= 1.25 * target for seconds, target in times[2:])  # the first steps measure the costs
    assert waited == 0
    for r in requests:
        assert outputs[r.request_id].token_ids == reference_greedy("llama", r.prompt_ids, r.params.max_new_tokens)

    fixed = _engine(model, clock, "off")  # the same load with the fixed budget of 128 tokens
    late = Request(SHORT[:3], SamplingParams(max_new_tokens=10, ignore_eos=True))
    times_off, _, _, _ = _run(fixed, clock, late)
    assert max(seconds for seconds, _ in times_off) > 2 * max(target for _, target in times)


def test_long_prompts_share_the_budget_and_all_finish(clocked):
    """Two long prompts beside decoding rows advance in the same steps by equal chunks, and finish."""
    from onspec.engine.sequence import Prefill

    model, clock = clocked
    engine = _engine(model, clock, "auto")
    seen: list[list[int]] = []
    advance = Prefill.advance

    def recording(p, chunk):
        seen[-1].append(chunk)
        return advance(p, chunk)

    engine.add(Request(SHORT, SamplingParams(max_new_tokens=200, ignore_eos=True)))
    for _ in range(3):
        engine.step()
    longs = [Request(LONG, SamplingParams(max_new_tokens=4, ignore_eos=True)),
             Request(LONG[:300], SamplingParams(max_new_tokens=4, ignore_eos=True))]
    engine.add(longs[0])
    engine.add(longs[1])
    Prefill.advance = recording
    try:
        done = set()
        while not {r.request_id for r in longs} <= done:
            seen.append([])
            done |= {o.request_id for o in engine.step() if o.finished}
    finally:
        Prefill.advance = advance
    both = [chunks for chunks in seen if len(chunks) == 2]
    assert len(both) > 3 and all(a == b for a, b in both[:-1])  # the last may cache one's rest


def test_long_prompts_prefill_one_at_a_time_in_arrival_order(clocked):
    """long_prefills 1: of two long prompts, the second is not touched (no chunk, no memory) until the
    first has joined the batch; it counts as waiting meanwhile; both decode the target's output."""
    model, clock = clocked
    engine = _engine(model, clock, "auto")
    engine.long_prefills = 1
    engine.add(Request(SHORT, SamplingParams(max_new_tokens=400, ignore_eos=True)))
    engine.step()
    longs = [Request(LONG, SamplingParams(max_new_tokens=4, ignore_eos=True)),
             Request(LONG[:300], SamplingParams(max_new_tokens=4, ignore_eos=True))]
    engine.add(longs[0])
    engine.add(longs[1])
    first, second = engine._prefilling
    outputs = {}
    while not {r.request_id for r in longs} <= outputs.keys():
        if first in engine._prefilling:
            assert second.cached == 0 and all(r is None for r in second.target.kv.rows)
            assert engine.num_waiting == 1 and engine.num_running == 3
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.output
    assert [r for r in outputs if r in {q.request_id for q in longs}] == [longs[0].request_id, longs[1].request_id]
    for r in longs:
        assert outputs[r.request_id].token_ids == reference_greedy("llama", r.prompt_ids, 4)


def test_a_short_prompt_beyond_the_step_budget_is_cached_whole(clocked):
    """A 60-token prompt (within --prefill-chunk, beyond the ~12 tokens the latency target leaves a
    step here) is cached in one step beside the long prompt: its first token comes in the step after
    it joins, and its output is the target's."""
    model, clock = clocked
    engine = _engine(model, clock, "auto")
    late = Request(LONG[100:160], SamplingParams(max_new_tokens=10, ignore_eos=True))
    times, waited, outputs, _ = _run(engine, clock, late)
    assert engine.budget.tokens(decoding=True) < 60
    assert waited == 0
    assert outputs[late.request_id].token_ids == reference_greedy("llama", late.prompt_ids, 10)
