"""The adaptive-k policy: the speedup model picks k, down to 0, and probing keeps alpha measured."""

from __future__ import annotations

import copy

import pytest
from conftest import plain_greedy, tiny_model

from onspec.bench.machine import speedup_model
from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.policy import AdaptiveK, PolicyConfig, expected_tokens
from onspec.engine.sampling import SamplingParams


def trained(alpha: float, c: float, k_max: int = 8, probe_share: float = 0.0, steps: int = 400) -> AdaptiveK:
    """A policy that has seen many steps with the given alpha and cost ratio (T(k) flat)."""
    policy = AdaptiveK(k_max, PolicyConfig(probe_share=probe_share))
    for _ in range(steps):
        evaluated = 100
        policy.observe(1, round(alpha * evaluated), evaluated, draft_seconds=c, target_seconds=1.0)
        policy.observe(0, 0, 0, draft_seconds=0.0, target_seconds=1.0)
    return policy


@pytest.mark.parametrize("c, best", [(0.01, 7), (0.02, 6), (0.05, 4), (0.1, 3)])
def test_best_k_matches_the_paper_table(c, best):
    """OSD.md: for alpha = 0.6 the best k is 7, 6, 4, 3 at c = 0.01, 0.02, 0.05, 0.1."""
    policy = trained(0.6, c)
    assert abs(policy.alpha - 0.6) < 0.01
    assert policy.choose() == best
    assert max(range(9), key=lambda k: speedup_model(0.6, k, c)) == best


def test_steps_aside_when_no_k_pays():
    """alpha 0.04 at c 0.165 (the untrained default draft): every k loses, so k = 0."""
    policy = trained(0.04, 0.165)
    assert all(policy.expected_speedup(k) < 1 for k in range(1, 9))
    assert [policy.choose() for _ in range(50)] == [0] * 50


def test_probing_keeps_measuring_alpha_and_speculation_resumes():
    policy = trained(0.04, 0.165, probe_share=0.1)
    picks = [policy.choose() for _ in range(2000)]
    assert 0.07 < picks.count(1) / len(picks) < 0.13 and set(picks) == {0, 1}
    for _ in range(200):  # the draft got better (e.g. an online update): probe steps see it
        policy.observe(1, 1, 1, draft_seconds=0.165, target_seconds=1.0)
    assert policy.choose() > 0


def test_reset_alpha_from_a_hint():
    policy = trained(0.04, 0.165)
    policy.reset_alpha(0.8)
    assert policy.alpha == pytest.approx(0.8)
    assert policy.choose() >= 2


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)


def test_config_ranges():
    with pytest.raises(ValueError, match="probe-share"):
        PolicyConfig(probe_share=1.5)
    with pytest.raises(ValueError, match="alpha-decay"):
        PolicyConfig(alpha_decay=1.0)


def test_adaptive_engine_stays_lossless(tokenizer):
    """With the policy switching k (including 0) step by step, greedy output is still the target's."""
    target, draft = tiny_model("llama", 0), tiny_model("llama", 7, layers=1)
    policy = AdaptiveK(4, PolicyConfig(probe_share=0.3))
    engine = SpeculativeEngine(target, tokenizer, draft, k=4, policy=policy)
    for text in ["hello world", "abc", "the quick brown fox"]:
        prompt = tokenizer.encode(text)
        out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))])[0]
        assert out.token_ids == plain_greedy(target, prompt, 30)
    assert policy.alpha < 0.3  # a random draft: the policy learned it does not pay


class Scripted(AdaptiveK):
    """A policy that picks k from a fixed script and records what it is told."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(max(script), PolicyConfig())
        self.script = list(script)
        self.seen: list[tuple[int, float]] = []

    def choose(self) -> int:
        return self.script.pop(0) if self.script else 0

    def observe(self, k, accepted, evaluated, draft_seconds, target_seconds, width=None) -> None:
        self.seen.append((k, draft_seconds))
        super().observe(k, accepted, evaluated, draft_seconds, target_seconds, width)


def test_backlog_of_target_only_steps_is_cached_apart_from_the_proposal(tokenizer, monkeypatch):
    """After steps with k = 0 the draft has a backlog (one token per step). It is cached in its own
    pass before proposing, so every proposal pass feeds at most the steady two positions (the
    last accepted proposal and the bonus token) and the policy's draft time is the steady cost of
    proposing; the output is still the target's greedy output."""
    from onspec.engine.runner import ModelRunner

    target, draft = tiny_model("llama", 0), tiny_model("llama", 7, layers=1)
    script = [2, 0, 0, 0, 0, 0, 2, 0, 3, 1]
    engine = SpeculativeEngine(target, tokenizer, draft, k=3, policy=Scripted(script))
    widths, catch_ups = [], []
    feed, catch_up = ModelRunner.feed, ModelRunner.catch_up

    def spy_feed(self, extra=None, trees=None):
        if self.model is draft:
            widths.append(max(len(p) for p in self.pending) + (0 if extra is None else extra.shape[1]))
        return feed(self, extra, trees)

    def spy_catch_up(self):
        catch_ups.append(max(len(p) for p in self.pending))
        catch_up(self)

    monkeypatch.setattr(ModelRunner, "feed", spy_feed)
    monkeypatch.setattr(ModelRunner, "catch_up", spy_catch_up)
    prompt = tokenizer.encode("the quick brown fox")
    out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=len(script) + 8, ignore_eos=True))])[0]
    assert out.token_ids == plain_greedy(target, prompt, len(script) + 8)
    assert set(widths) <= {1, 2}  # every draft pass while proposing sees at most two new positions
    assert 6 in catch_ups  # five target-only steps (plus the token emitted before them) were caught up
    assert [k for k, _ in engine.policy.seen[: len(script)]] == script


def test_one_slow_pass_does_not_price_a_width_for_good():
    """T(k) is a line fitted to every pass: after one slow pass at k = 4, the passes at k = 2 that
    follow bring the price of k = 4 back (per-k averages kept it until k = 4 was chosen again,
    which the stale price prevented)."""
    policy = AdaptiveK(4, PolicyConfig(probe_share=0.0))
    for _ in range(20):
        policy.observe_target(4, 1.0)
        policy.observe_target(2, 1.0)
    policy.observe_target(4, 5.0)
    for _ in range(200):
        policy.observe_target(2, 1.0)
    assert policy.target_time(4) < 1.2
    for w in range(0, 17):  # a line through fresh passes of several widths
        policy.observe_target(w, 1.0 + 0.01 * w)
    assert policy.target_time(16) > policy.target_time(0)


def test_a_passing_slowdown_does_not_price_the_draft_out_for_good():
    """The draft's passes cost 10x while another process held the cores, long enough for k = 0;
    once they cost 0.3 again, the probes (5% of steps) price it again within ~100 steps (an average
    over draft passes needed ~30 probes, ~600 steps: a bench run of 512 tokens never recovered)."""
    policy = AdaptiveK(4, PolicyConfig(probe_share=0.05), prior_alpha=0.9)

    def run(steps: int, draft_cost: float) -> list[int]:
        picks = []
        for _ in range(steps):
            k = policy.choose()
            picks.append(k)
            policy.observe(k, round(0.9 * k), k, draft_seconds=draft_cost * k, target_seconds=1.0)
        return picks

    assert run(200, 10.0)[-50:].count(0) >= 40  # priced out
    picks = run(150, 0.3)
    assert sum(k >= 3 for k in picks[-50:]) >= 45, picks


class FakeCosts:
    """A clock that advances only by the modelled cost of each pass: a target pass over n
    positions costs n (a 2-row pass costs 2x a 1-row pass, as float32 GEMMs on an AVX2 host),
    a draft pass 0.7 whatever its width. Prefill is not a step's cost and is not charged."""

    def __init__(self, target, monkeypatch) -> None:
        from onspec.engine.runner import ModelRunner

        self.now = 0.0
        feed, catch_up = ModelRunner.feed, ModelRunner.catch_up

        def timed_feed(runner, extra=None, trees=None):
            width = max(len(p) for p in runner.pending) + (0 if extra is None else extra.shape[1])
            is_target = getattr(runner.model, "model", runner.model) is target
            self.now += width * 1.0 if is_target else 0.7
            return feed(runner, extra, trees)

        def timed_catch_up(runner, keep=2):
            if max(len(p) for p in runner.pending) > keep:
                self.now += 0.7
            catch_up(runner, keep)

        monkeypatch.setattr(ModelRunner, "feed", timed_feed)
        monkeypatch.setattr(ModelRunner, "catch_up", timed_catch_up)

    def __call__(self) -> float:
        return self.now


def test_speculation_steps_aside_when_its_measured_steps_lose(tokenizer, monkeypatch):
    """Issue 38's case: the draft is the target itself (every proposal accepted), but a 2-row pass
    costs 2x and a draft pass 0.7, so a step of k proposals takes 0.7 k + (k + 1) for k + 1 tokens:
    speculation loses at every k, while the speedup model, fitted on one width, predicts a gain.
    Timed by whole steps, the policy steps aside within a few steps, probes rarely, and the run
    decodes at >= 0.97x target-only (1.0 per token) on the fake clock; output is the target's."""
    target = tiny_model("llama", 0)
    draft = copy.deepcopy(target)
    policy = AdaptiveK(4, PolicyConfig())
    engine = SpeculativeEngine(target, tokenizer, draft, k=4, policy=policy)
    clock = FakeCosts(target, monkeypatch)
    engine.clock = clock
    ks: list[int] = []
    tokens = 0
    for text in ["hello world", "abc", "the quick brown fox", "one two three", "x", "lorem ipsum", "a b", "zz"]:
        prompt = tokenizer.encode(text)
        out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True))],
                              on_record=lambda rec: ks.append(len(rec.proposed)))[0]
        assert out.token_ids == plain_greedy(target, prompt, 100)
        tokens += len(out.token_ids)
    steps_before_aside = next(i for i, k in enumerate(ks) if i > 4 and k == 0 and policy.aside_steps)
    assert steps_before_aside <= 8
    assert sum(1 for k in ks[10:] if k) <= len(ks) / 50  # rare probes after that (each loses little here)
    assert policy.losing
    plain_time = tokens * 1.0
    assert plain_time / clock.now >= 0.97


def test_speculation_that_pays_is_kept(tokenizer, monkeypatch):
    """The same draft (all accepted) on a memory-bound clock (a pass costs 1 whatever its width,
    a draft pass 0.1): speculation wins, the policy keeps it, with a plain step every PLAIN_EVERY."""
    from onspec.engine.policy import PLAIN_EVERY
    from onspec.engine.runner import ModelRunner

    target = tiny_model("llama", 0)
    draft = copy.deepcopy(target)
    policy = AdaptiveK(4, PolicyConfig())
    engine = SpeculativeEngine(target, tokenizer, draft, k=4, policy=policy)
    now = [0.0]
    feed = ModelRunner.feed

    def timed_feed(runner, extra=None, trees=None):
        now[0] += 1.0 if getattr(runner.model, "model", runner.model) is target else 0.1
        return feed(runner, extra, trees)

    monkeypatch.setattr(ModelRunner, "feed", timed_feed)
    engine.clock = lambda: now[0]
    ks: list[int] = []
    prompt = tokenizer.encode("hello world")
    for _ in range(6):
        engine.generate([Request(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True))],
                        on_record=lambda rec: ks.append(len(rec.proposed)))
    assert not policy.losing and policy.aside_steps == 0
    plain = [i for i, k in enumerate(ks) if k == 0]
    assert len(plain) <= 4 + len(ks) // PLAIN_EVERY + 6  # start-up plain steps, one per PLAIN_EVERY, tail steps
