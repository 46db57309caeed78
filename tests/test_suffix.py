"""The suffix learner beside the draft (engine/suffix.py) and the controller that chooses between
them per row and step (engine/controller.py): the index, learning across requests, checkpoints,
the controller's choice on synthetic stats, and losslessness with both speculators switching
inside one request, in a batch."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from conftest import ARCHS, cached_draft, cached_model, noisy_copy, reference_greedy

from onspec.engine.build import make_engine
from onspec.engine.controller import Controller
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import AdaptiveK, PolicyConfig, expected_tokens
from onspec.engine.sampling import SamplingParams
from onspec.engine.proposer import Draft
from onspec.engine.suffix import SuffixIndex, SuffixLearner
from onspec.engine.verify import rejection_sample

TEXTS = ("hello world", "a", "abcabcabcabc", "def f(x):\n    return x\ndef g(x):\n    return")


# -- the index ---------------------------------------------------------------------------------

def test_index_counts_next_tokens_after_every_context():
    index = SuffixIndex(max_depth=3)
    index.add([1, 2, 3, 1, 2, 4])
    assert index.row((1, 2)) == {3: 1, 4: 1}
    assert index.row((2,)) == {3: 1, 4: 1}
    assert index.row((3, 1, 2)) == {4: 1}
    assert index.row((1, 2, 3, 1)) == {}  # deeper than max_depth


def test_removing_a_sequence_leaves_the_index_as_if_never_added():
    a, b = [5, 6, 7, 5, 6, 8, 9], [6, 7, 5, 6, 7, 1]
    index = SuffixIndex(max_depth=4)
    index.add(a)
    before = copy.deepcopy(index.counts)
    index.add(b, start=2)
    index.add(b, start=2, sign=-1)
    assert index.counts == before


def test_proposal_follows_the_deepest_match_and_its_most_frequent_next_token():
    learner = SuffixLearner(max_depth=4, min_match=2, max_tokens=5)
    local = learner.local_index([1, 2, 3, 4, 9, 9, 1, 2, 3, 4, 7])
    # context ends ...2, 3: the deepest match (1, 2, 3) is followed by 4 twice, then (2, 3, 4) by 9 and 7 (tie:
    # the first seen), ...
    tokens, depths = learner.continuation([0, 1, 2, 3], local, max_tokens=3)
    assert tokens[0] == 4 and depths[0] == 3
    assert len(tokens) == 3
    assert learner.continuation([42, 43], local, 8) == ([], [])  # nothing matches at >= min_match tokens


def test_the_stream_index_learns_outputs_and_forgets_the_oldest():
    learner = SuffixLearner(max_depth=3, history=2, prompt_context=2)
    outputs = [([1, 2], [3, 4, 5]), ([7, 8], [9, 3, 4, 6]), ([1, 1], [2, 2, 2])]
    for prompt, out in outputs:
        learner.learn(prompt, out)
    assert learner.version == 3 and len(learner.history) == 2
    expected = SuffixIndex(3)
    for prompt, out in outputs[1:]:
        expected.add(prompt[-2:] + out, start=2)
    assert learner.index.counts == expected.counts
    # what the stream taught is proposed for a new request that has never seen it itself
    assert learner.continuation([0, 9, 3], None, 2)[0] == [4, 6]


def test_checkpoint_restores_the_learner_exactly():
    rng = random.Random(0)
    learner = SuffixLearner(max_depth=4, history=5)
    for _ in range(8):
        learner.learn([rng.randrange(20) for _ in range(6)], [rng.randrange(20) for _ in range(30)])
    for _ in range(50):
        learner.observe_verified([rng.randint(1, 4) for _ in range(5)], rng.randint(0, 5))
    restored = SuffixLearner(max_depth=4, history=5)
    restored.load_state_dict(learner.state_dict())
    assert restored.index.counts == learner.index.counts
    assert list(restored.history) == list(learner.history)
    assert restored.version == learner.version
    assert [restored.acceptance(d) for d in range(1, 5)] == [learner.acceptance(d) for d in range(1, 5)]
    for ctx in ([1, 2, 3], [4, 5], [rng.randrange(20) for _ in range(4)]):
        assert restored.continuation(ctx, None, 8) == learner.continuation(ctx, None, 8)
    with pytest.raises(ValueError, match="max_depth"):
        SuffixLearner(max_depth=6).load_state_dict(learner.state_dict())


# -- the controller ----------------------------------------------------------------------------

def _policy(alpha: float, t_draft: float, t_target: dict[int, float]) -> AdaptiveK:
    policy = AdaptiveK(4, PolicyConfig(probe_share=0.0))
    policy.reset_alpha(alpha)
    policy._t_draft = t_draft
    for k, t in t_target.items():
        policy.observe_target(k, t)
    return policy


def _learner(acceptance: float, **kw) -> SuffixLearner:
    return SuffixLearner(max_depth=4, prior=acceptance, **kw)


def _offer(learner: SuffixLearner, tokens: list[int], depths: list[int]) -> Draft:
    """The learner's offer of these tokens, as its `propose` makes it."""
    return Draft(torch.tensor(tokens), learner, match=list(depths), expected=learner.expected_accepted(depths))


def _choose(controller: Controller, policy, k: int, offer: Draft, switch: bool = False) -> int:
    """Tokens of the offer taken (0: the draft proposes)."""
    taken = controller.choose(policy, k, [offer], switch=switch)
    return len(taken) if taken is not None else 0


def test_controller_never_picks_the_lower_expected_speedup():
    """On random synthetic stats: the chosen proposer's expected speedup is the larger one."""
    rng = random.Random(1)
    for _ in range(300):
        alpha, c = rng.uniform(0.05, 0.97), rng.uniform(0.01, 0.6)
        t0 = 0.1
        times = {k: t0 * (1 + rng.uniform(0.0, 0.05) * k) for k in range(0, 17)}
        policy = _policy(alpha, c * t0, times)
        learner, controller = _learner(rng.uniform(0.05, 0.99)), Controller(probe_share=0.0)
        n = rng.randint(1, 16)
        offer = _offer(learner, [7] * n, [rng.randint(2, 4) for _ in range(n)])
        switch = rng.random() < 0.5
        m = _choose(controller, policy, 4, offer, switch=switch)
        draft = max(policy.expected_speedup(k) for k in range(5))
        expected = learner.expected_accepted(offer.match)
        catch_up = c * t0 if switch else 0.0  # the draft's catch-up pass after a switch
        t = policy.target_time
        suffix = max((1 + expected[j]) * t(0) / (t(j) + catch_up) for j in range(1, n + 1))
        if m:
            assert suffix > draft
            assert (1 + expected[m]) * t(0) / (t(m) + catch_up) == pytest.approx(suffix)
        else:
            assert suffix <= draft


def test_controller_takes_the_better_of_two_offers():
    """Two model-free offers for one row: the one with the higher expected speedup is taken."""
    policy = _policy(0.3, 0.03, {0: 0.1, 4: 0.11, 16: 0.14})
    good, poor = _learner(0.95), _learner(0.3)
    controller = Controller(probe_share=0.0)
    offers = [_offer(poor, [1] * 8, [4] * 8), _offer(good, [2] * 8, [4] * 8)]
    taken = controller.choose(policy, 4, offers)
    assert taken is not None and taken.by is good and taken.tokens.tolist() == [2] * len(taken)


def test_controller_steps_back_to_the_floor_when_the_learner_collapses_and_returns_when_it_pays():
    policy = _policy(0.8, 0.036, {0: 0.1, 4: 0.11, 16: 0.14})
    learner, controller = SuffixLearner(max_depth=4, decay=0.9), Controller(probe_share=0.0)
    offer = lambda: _offer(learner, [1] * 12, [4] * 12)  # noqa: E731 (priced at the learner's estimates now)
    for _ in range(30):  # the learner's proposals are all accepted: it proposes
        learner.observe_verified([4] * 12, 12)
    assert _choose(controller, policy, 4, offer()) > 4
    for _ in range(30):  # then every one is rejected at once: the draft takes over
        learner.observe_verified([4] * 12, 0)
    assert _choose(controller, policy, 4, offer()) == 0
    assert learner.acceptance(4) < 0.1
    for _ in range(40):  # judged on the draft's steps, it is accepted again: the work returns to it
        learner.observe_shadow(_offer(learner, [1, 1], [4, 4]), [1, 1])
    assert _choose(controller, policy, 4, offer()) > 0


def test_controller_gives_a_share_of_the_learners_steps_to_the_draft_to_keep_measuring_it():
    policy = _policy(0.3, 0.03, {0: 0.1, 4: 0.1, 16: 0.1})
    learner, controller = _learner(0.99), Controller(probe_share=0.25, seed=3)
    picks = [_choose(controller, policy, 4, _offer(learner, [1, 2, 3], [2, 2, 2])) for _ in range(400)]
    share = sum(1 for m in picks if m == 0) / len(picks)
    assert 0.15 < share < 0.35  # binomial(400, 0.25): 5 sigma either side
    assert set(picks) <= {0, 3} and controller.probe_steps == picks.count(0)


def test_the_draft_is_priced_at_its_acceptance_where_the_learner_matched():
    """Text the learner matches deeply is easy for the draft too: once the draft is seen accepting
    everything where the learner matched 4 tokens, the learner no longer wins those steps, though
    the draft's average alpha (0.3) alone would lose to it; shallow matches keep the average."""
    policy = _policy(0.3, 0.03, {0: 0.1, 4: 0.11, 16: 0.14})
    learner, controller = _learner(0.5), Controller(probe_share=0.0)
    deep, shallow = _offer(learner, [1] * 4, [4] * 4), _offer(learner, [1] * 4, [2] * 4)
    assert _choose(controller, policy, 4, deep) > 0 and _choose(controller, policy, 4, shallow) > 0
    assert controller.draft_alpha(4, policy.alpha) == pytest.approx(policy.alpha)
    for _ in range(50):
        controller.observe_draft(deep, 4, 4)
    assert controller.draft_alpha(4, policy.alpha) > 0.95
    assert _choose(controller, policy, 4, deep) == 0
    assert _choose(controller, policy, 4, shallow) > 0
    assert controller.draft_alpha(2, policy.alpha) == pytest.approx(policy.alpha)


def test_a_declined_proposal_is_judged_against_the_emitted_tokens():
    """observe_shadow: the matched prefix counts accepted, the first mismatch rejected, and what
    lies past the emitted tokens is not counted; the learner's own step counts do not move."""
    learner = SuffixLearner(max_depth=4, prior=0.5, decay=1.0)
    before = {d: (learner._accepted[d], learner._evaluated[d]) for d in (2, 3, 4)}
    learner.observe_shadow(_offer(learner, [5, 6, 7, 8], [2, 3, 4, 4]), [5, 6, 9])  # 2 accepted, then rejected
    assert learner._evaluated[2] - before[2][1] == 1 and learner._accepted[2] - before[2][0] == 1
    assert learner._evaluated[3] - before[3][1] == 1 and learner._accepted[3] - before[3][0] == 1
    assert learner._evaluated[4] - before[4][1] == 1 and learner._accepted[4] - before[4][0] == 0
    learner.observe_shadow(_offer(learner, [5, 6, 7], [4, 4, 4]), [5, 6])  # censored: 2 accepted, nothing more known
    assert learner._evaluated[4] - before[4][1] == 3 and learner._accepted[4] - before[4][0] == 2
    assert learner.shadow_evaluated == 5
    assert (learner.steps, learner.proposed, learner.accepted, learner.evaluated) == (0, 0, 0, 0)


def test_suffix_draws_are_lossless_under_rejection_sampling():
    """A suffix proposal is deterministic: q is one-hot. The first emitted token is still distributed
    as p (chi-square over a 6-token vocabulary, 20k draws; false-failure probability < 1e-6)."""
    p = torch.tensor([[0.05, 0.4, 0.25, 0.1, 0.15, 0.05]] * 2)
    x = torch.tensor([1])
    q = torch.nn.functional.one_hot(x, 6).float()
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    n = 20_000
    for _ in range(n):
        counts[rejection_sample(x, q, p, gen).tokens[0]] += 1
    chi2 = float(((counts - n * p[0]) ** 2 / (n * p[0])).sum())
    assert chi2 < 35.9  # chi-square, 5 degrees of freedom, p = 1e-6


# -- in the engine -----------------------------------------------------------------------------

class _Alternating(Controller):
    """An offer on every other decision (when there is one): forces switches inside a request."""

    def choose(self, policy, k_draft, offers, switch=False):
        self._turn = not getattr(self, "_turn", False)
        return offers[0].cut(min(len(offers[0]), 6)) if self._turn and offers else None


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equality_with_both_proposers_switching_inside_a_request(arch, batch, tokenizer):
    target, draft = cached_model(arch), copy.deepcopy(cached_draft(arch, "noisy"))
    engine = make_engine(target, tokenizer, draft, EngineConfig(k=3, suffix_tokens=8))
    engine.controller = _Alternating()
    for d in engine.drafters.values():  # the draft proposes all its k (adaptive k would stop a noisy draft)
        d.policy.choose = lambda: 3
    ids = [tokenizer.encode(t) for t in (TEXTS if batch > 1 else TEXTS[2:3])]
    n = 40
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in ids])
    for p, o in zip(ids, outs):
        assert o.token_ids == reference_greedy(arch, p, n)
    # both proposed inside one request ("abcabc..." repeats itself from its prompt on)
    assert any(0 < o.stats.of("suffix").steps < o.stats.steps for o in outs)
    assert all(o.stats.of("suffix").steps + o.stats.of("draft").steps <= o.stats.steps for o in outs)
    # a second pass of the same prompts: the stream index proposes their whole outputs
    again = engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in ids])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert engine.suffix.version == 2 * batch


def test_a_learner_version_changes_only_between_steps(tokenizer):
    """Requests of different lengths in one batch: one finishes (the learner learns its output, a new
    version) while the others run on. Every proposal inside one engine step sees the same version,
    and the next step the new one: an output is never half learned when a row proposes."""
    engine = make_engine(cached_model("llama"), tokenizer, copy.deepcopy(cached_draft("llama", "noisy")),
                         EngineConfig(k=3, suffix_tokens=8))
    engine.controller = _Alternating()
    step, seen = [0], []
    verify_step, propose = engine._verify_step, engine.suffix.propose

    def counting_step(*args, **kwargs):
        step[0] += 1
        return verify_step(*args, **kwargs)

    def recording_propose(*args, **kwargs):
        seen.append((step[0], engine.suffix.version))
        return propose(*args, **kwargs)

    engine._verify_step, engine.suffix.propose = counting_step, recording_propose
    ids = [tokenizer.encode(t) for t in TEXTS]
    engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(ids, (8, 16, 24, 32))])
    assert engine.suffix.version == 4
    versions: dict[int, set[int]] = {}
    for s, v in seen:
        versions.setdefault(s, set()).add(v)
    assert all(len(v) == 1 for v in versions.values())  # one version per step
    assert len({next(iter(v)) for v in versions.values()}) >= 3  # and it changed between steps


class _PassClock:
    """Time that moves only when a model runs a pass: the target 10 ms plus 0.2 ms a position, the
    draft 4 ms a pass. The live controller and policy then decide from costs of a CPU's shape, not
    from this machine's load."""

    def __init__(self, target, draft) -> None:
        self.now = 0.0
        self.hooks = [target.get_input_embeddings().register_forward_pre_hook(
                          lambda _, args: self._charge(0.010 + 0.0002 * args[0].numel())),
                      draft.get_input_embeddings().register_forward_pre_hook(lambda _, args: self._charge(0.004))]

    def _charge(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("arch", ARCHS)
def test_default_engine_with_the_live_controller_is_lossless_and_learns(arch, tokenizer):
    """make_engine's defaults (the suffix learner on, the real controller, on a clock that counts
    target passes): greedy equality over a stream that repeats itself, and fewer target passes the
    second time it is served."""
    target, draft = cached_model(arch), copy.deepcopy(cached_draft(arch, "random"))
    engine = make_engine(target, tokenizer, draft, EngineConfig(k=4))
    assert engine.suffix is not None
    clock = engine.clock = _PassClock(target, engine.drafter.fast.model)
    ids = [tokenizer.encode(t) for t in TEXTS]
    n = 48
    try:
        first = [engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))])[0] for p in ids]
        second = [engine.generate([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))])[0] for p in ids]
    finally:
        for hook in clock.hooks:
            hook.remove()
    for p, a, b in zip(ids, first, second):
        assert a.token_ids == b.token_ids == reference_greedy(arch, p, n)
    assert sum(o.stats.steps for o in second) < sum(o.stats.steps for o in first)
    assert sum(o.stats.of("suffix").accepted for o in second) > 0
    assert engine.suffix.shadow_evaluated > 0  # proposals the draft beat were judged too


def test_seeded_sampling_is_the_same_with_and_without_the_suffix_learner(tokenizer):
    """A seeded request's output is a function of the seed and the target alone (gumbel_verify),
    whoever proposes: the floor alone and the floor with the suffix learner agree token for token."""
    target = cached_model("llama")
    ids = [tokenizer.encode(t) for t in TEXTS]
    outs = {}
    for no_suffix in (True, False):
        engine = make_engine(target, tokenizer, copy.deepcopy(cached_draft("llama", "noisy")),
                             EngineConfig(k=3, no_suffix=no_suffix))
        if not no_suffix:
            engine.controller = _Alternating()
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_new_tokens=32, ignore_eos=True)
        outs[no_suffix] = [o.token_ids for o in engine.generate([Request(p, params) for p in ids])]
    assert outs[True] == outs[False]


def test_no_suffix_is_the_floor_alone(tokenizer):
    engine = make_engine(cached_model("llama"), tokenizer, copy.deepcopy(cached_draft("llama", "noisy")),
                         EngineConfig(k=3, no_suffix=True))
    assert engine.suffix is None
    out = engine.generate([Request(tokenizer.encode("abcabcabc"), SamplingParams(max_new_tokens=16))])[0]
    assert out.stats.of("suffix").steps == 0
    with pytest.raises(ValueError, match="suffix-tokens"):
        EngineConfig(suffix_tokens=0)


def test_expected_accepted_is_the_running_product():
    learner = SuffixLearner(max_depth=3)
    learner._accepted = {1: 1.0, 2: 2.0, 3: 3.0}
    learner._evaluated = {1: 4.0, 2: 4.0, 3: 4.0}
    got = learner.expected_accepted([3, 2, 1])
    a = [0.75, 0.5, 0.25]
    want = [0.0] + list(itertools.accumulate(itertools.accumulate(a, lambda x, y: x * y)))
    assert got == pytest.approx(want)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


# -- serving: state across restarts, metrics ------------------------------------------------------

def test_serve_keeps_the_suffix_learner_across_a_restart(tmp_path):
    """`onspec serve` writes the learner at shutdown and resumes it exactly; `--no-online` serves
    it as saved and learns nothing more; a corrupt file is set aside and the learner starts empty."""
    from conftest import save_tiny_pair

    from onspec.apps.serve import SUFFIX_FILE, build_state, shutdown
    from onspec.models.pair import ModelConfig
    from onspec.online.distiller import TrainerConfig
    from onspec.serve.config import ServerConfig

    target, draft = save_tiny_pair(tmp_path)
    models = ModelConfig(target=str(target), draft=str(draft), dtype="float32")

    def state(**server):
        return build_state(models, EngineConfig(k=2), PolicyConfig(), TrainerConfig(),
                           ServerConfig(state_dir=str(tmp_path / "state"), **server))

    first = state()
    first.engine.generate([Request([65, 66, 67, 65, 66], SamplingParams(max_new_tokens=12))] * 2)
    learned = first.engine.suffix.state_dict()
    assert int(learned["version"]) == 2
    shutdown(first)
    path = tmp_path / "state" / SUFFIX_FILE
    assert path.is_file() and (path.stat().st_mode & 0o077) == 0  # user traffic: owner only

    second = state(no_online=True)
    got = second.engine.suffix.state_dict()
    assert all(torch.equal(got[k], learned[k]) for k in learned)
    second.engine.generate([Request([70, 71, 72], SamplingParams(max_new_tokens=8))])
    assert second.engine.suffix.version == 2  # frozen: served, not learned
    shutdown(second)

    path.write_bytes(b"not a safetensors file")
    third = state()
    assert third.engine.suffix.version == 0 and (tmp_path / "state" / (SUFFIX_FILE + ".corrupt")).is_file()
    shutdown(third)


def test_serve_learns_with_the_suffix_learner_by_default_and_the_floor_stays_frozen(tmp_path):
    """The default server: the suffix learner learns, no trainer touches the draft (the floor); --learn
    draft is the draft's trainer alone, both is both; --drafts > 1 without a trainer is refused."""
    from conftest import save_tiny_pair

    from onspec.apps.serve import build_state, shutdown
    from onspec.models.pair import ModelConfig
    from onspec.online.distiller import TrainerConfig
    from onspec.pool.pool import PoolConfig
    from onspec.serve.app import learning
    from onspec.serve.config import ServerConfig

    target, draft = save_tiny_pair(tmp_path)
    models = ModelConfig(target=str(target), draft=str(draft), dtype="float32")
    seen = {}
    for learn in ("suffix", "draft", "both"):
        state = build_state(models, EngineConfig(k=2), PolicyConfig(), TrainerConfig(),
                            ServerConfig(state_dir=str(tmp_path / learn), learn=learn))
        seen[learn] = (learning(state), state.trainer is not None, state.engine.suffix is not None)
        shutdown(state)
    assert seen == {"suffix": ("suffix", False, True), "draft": ("draft", True, False),
                    "both": ("suffix+draft", True, True)}
    assert ServerConfig().resolved().learn == "suffix" and ServerConfig().resolved("vllm").learn == "draft"
    assert ServerConfig(learn="both").resolved("vllm").learn == "both"  # said outright, it stays
    with pytest.raises(ValueError, match="--learn draft"):
        build_state(models, EngineConfig(k=2), PolicyConfig(), TrainerConfig(),
                    ServerConfig(state_dir=str(tmp_path / "pool")), PoolConfig(drafts=3))
    with pytest.raises(ValueError, match="--learn"):
        ServerConfig(learn="everything")


def test_metrics_count_the_suffix_learners_steps_apart():
    from onspec.engine.records import StepOutput
    from onspec.serve.metrics import ServerMetrics

    m = ServerMetrics(k=4)
    m.observe_step(StepOutput("a", [1, 2, 3], "", proposed=6, accepted=2, speculator="suffix"))
    m.observe_step(StepOutput("a", [1], "", proposed=3, accepted=0, speculator="draft"))
    text = m.exposition().decode()
    assert 'onspec:suffix_num_draft_tokens_total 6.0' in text
    assert 'onspec:suffix_num_accepted_tokens_total 2.0' in text
    assert 'onspec:spec_decode_num_draft_tokens_total{draft="general"} 9.0' in text
