"""Verification and sampling: the verifiers on their own (exactly and statistically),
logit processing, and sampling through the whole engine (distribution, determinism, batch
independence).

Statistical tests use fixed seeds, so each is deterministic: it passes or fails the same way on
every run. The thresholds say how unlikely a failure would be *if the code were right*: each
chi-square assertion fails with probability ~1e-4 for a correct sampler (p-value threshold 1e-4,
asymptotic chi-square approximation with all pooled expected counts >= 5), each Hoeffding
assertion with probability <= 1e-4 (exact bound). A wrong sampler is caught with overwhelming
probability at these sample sizes: e.g. a total-variation error of 0.05 over 6 tokens gives a
chi-square statistic in the hundreds, against a critical value of about 26 at 5 degrees of freedom.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import cached_draft, cached_model, full_logits, noisy_copy

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.policy import AdaptiveK, PolicyConfig
from onspec.engine.sampling import InvalidRequest, SamplingParams, gumbel_noise, process_logits, sample
from onspec.engine.verify import greedy_verify, gumbel_verify, rejection_sample

P_THRESHOLD = 1e-4


# -- statistics helpers -------------------------------------------------------------------------


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution: P(X >= stat), X ~ chi2(df)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def assert_matches(counts: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Chi-square goodness of fit of integer `counts` [n] to `probs` [n] (sums to 1).

    Outcomes of probability 0 must never occur. Cells with expected count < 5 are pooled into
    one cell. Fails when the p-value is below P_THRESHOLD."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    assert n > 0, what
    impossible = probs <= 0
    assert counts[impossible].sum() == 0, f"{what}: outcomes of probability 0 occurred: {impossible.nonzero().flatten().tolist()}"
    expected = probs * n
    big = expected >= 5
    obs = counts[big].tolist()
    exp = expected[big].tolist()
    rest_exp = float(expected[~big & ~impossible].sum())
    if rest_exp > 0:
        obs.append(float(counts[~big & ~impossible].sum()))
        exp.append(rest_exp)
    assert len(obs) >= 2, f"{what}: too few cells"
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    pvalue = chi2_sf(stat, len(obs) - 1)
    assert pvalue > P_THRESHOLD, f"{what}: chi2={stat:.1f} df={len(obs) - 1} p={pvalue:.2e}"


def hoeffding_eps(n: int, delta: float = P_THRESHOLD) -> float:
    """|mean of n i.i.d. Bernoulli - its expectation| <= eps with probability >= 1 - delta."""
    return math.sqrt(math.log(2 / delta) / (2 * n))


def test_chi2_helper_is_calibrated():
    """Sanity of the helper itself: known chi-square quantiles, and it rejects a wrong fit."""
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(11.07, 5) == pytest.approx(0.05, abs=1e-3)
    with pytest.raises(AssertionError):
        assert_matches(torch.tensor([600, 400]), torch.tensor([0.5, 0.5]), "biased coin")
    with pytest.raises(AssertionError):
        assert_matches(torch.tensor([5, 5, 1]), torch.tensor([0.5, 0.5, 0.0]), "impossible outcome")


# -- rejection_sample alone ---------------------------------------------------------------------

V = 6


def random_dists(rows: int, gen: torch.Generator, zero_at: dict[int, int] | None = None) -> torch.Tensor:
    """Random distributions [rows, V]; zero_at {row: token} forces a zero probability."""
    d = torch.rand(rows, V, generator=gen, dtype=torch.float64) + 0.05
    for r, t in (zero_at or {}).items():
        d[r, t] = 0.0
    return (d / d.sum(-1, keepdim=True)).float()


def run_trials(p: torch.Tensor, q: torch.Tensor, n: int, seed: int):
    """n independent verify steps: draft tokens x_i ~ q[i], then rejection_sample."""
    gen = torch.Generator().manual_seed(seed)
    verdicts = []
    for _ in range(n):
        x = torch.multinomial(q, 1, generator=gen).squeeze(-1) if q.shape[0] else torch.empty(0, dtype=torch.long)
        verdicts.append(rejection_sample(x, q, p, gen))
    return verdicts


def lossless_case(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p [k+1, V] with a token the target never emits (p[0][2] = 0) and q [k, V] close-ish to it
    (so later positions get enough samples) with a token the draft never proposes (q[1][4] = 0)."""
    gen = torch.Generator().manual_seed(1234)
    p = random_dists(k + 1, gen, zero_at={0: 2})
    q = 0.5 * p[:k] + 0.5 * random_dists(k, gen)
    q[1, 4] = 0.0
    return p, q / q.sum(-1, keepdim=True)


def test_rejection_sample_emits_the_target_distribution():
    """Speculative sampling is lossless: with k=3 and fixed p (k+1 rows), q (k rows), the token
    emitted at position i, among the trials that accepted x_1..x_i, is distributed as p[i]
    (i=0: the first token, always; i=3: the bonus token after all k accepted).
    The test includes a token the target never emits but the draft proposes (p[0][2] = 0: it must
    always be rejected) and one the draft never proposes (q[1][4] = 0: only the recovered token
    can produce it)."""
    k, n = 3, 30_000
    p, q = lossless_case(k)
    verdicts = run_trials(p, q, n, seed=99)

    for v in verdicts:
        assert 0 <= v.num_accepted <= k and len(v.tokens) == v.num_accepted + 1 and v.proposed == k
    for i in range(k + 1):
        reached = [v.tokens[i] for v in verdicts if v.num_accepted >= i]
        assert len(reached) > 2000, f"too few trials reach position {i}"
        counts = torch.bincount(torch.tensor(reached), minlength=V)
        assert_matches(counts, p[i], f"position {i}")


def test_rejection_sample_without_draft_samples_p():
    """k = 0 (target-only step): the single emitted token is distributed as p[0]."""
    gen = torch.Generator().manual_seed(5)
    p = random_dists(1, gen)
    verdicts = run_trials(p, torch.empty(0, V), 5000, seed=6)
    assert all(v.num_accepted == 0 and not v.rejected and v.evaluated == 0 for v in verdicts)
    assert_matches(torch.bincount(torch.tensor([v.tokens[0] for v in verdicts]), minlength=V), p[0], "k=0")


def test_acceptance_rate_is_overlap():
    """For k=1 the probability of accepting x ~ q is sum_x min(p(x), q(x)) (Hoeffding bound)."""
    n = 20_000
    gen = torch.Generator().manual_seed(7)
    p, q = random_dists(2, gen), random_dists(1, gen)
    overlap = float(torch.minimum(p[0], q[0]).sum())
    verdicts = run_trials(p, q, n, seed=8)
    alpha = sum(v.num_accepted for v in verdicts) / n
    assert abs(alpha - overlap) <= hoeffding_eps(n), (alpha, overlap)
    assert all(v.evaluated == 1 for v in verdicts)


# -- gumbel_verify (seeded requests) -----------------------------------------------------------


def run_gumbel_trials(p: torch.Tensor, q: torch.Tensor, n: int):
    """n seeded verify steps at output positions 0..k: the draft proposes argmax(log q + G), the
    target verifies with the same noise G (seeds 0..n-1)."""
    k = q.shape[0]
    verdicts = []
    for seed in range(n):
        g = torch.stack([gumbel_noise(seed, i, V) for i in range(k + 1)])
        x = (q.log() + g[:k]).argmax(-1)
        verdicts.append(gumbel_verify(x, p, g))
    return verdicts


def test_gumbel_noise_is_a_function_of_seed_and_position():
    assert torch.equal(gumbel_noise(3, 5, 100), gumbel_noise(3, 5, 100))
    assert not torch.equal(gumbel_noise(3, 5, 100), gumbel_noise(3, 6, 100))
    assert not torch.equal(gumbel_noise(3, 5, 100), gumbel_noise(4, 5, 100))
    assert torch.isfinite(gumbel_noise(-1, 0, 1000)).all()


def test_gumbel_verify_emits_the_target_distribution():
    """Seeded speculative sampling is lossless as well: with the same p, q as the rejection test
    (k = 3, a token the target never emits, one the draft never proposes), the token emitted at
    position i among the trials that reached it is distributed as p[i]."""
    k, n = 3, 30_000
    p, q = lossless_case(k)
    verdicts = run_gumbel_trials(p, q, n)
    for i in range(k + 1):
        reached = [v.tokens[i] for v in verdicts if v.num_accepted >= i]
        assert len(reached) > 2000, f"too few trials reach position {i}"
        assert_matches(torch.bincount(torch.tensor(reached), minlength=V), p[i], f"position {i}")
    # the emitted tokens are the target's own Gumbel-max samples: the draft changes only how many
    # come from one step
    for seed, v in enumerate(verdicts[:200]):
        g = torch.stack([gumbel_noise(seed, i, V) for i in range(k + 1)])
        assert v.tokens == (p.log() + g).argmax(-1)[: len(v.tokens)].tolist()


def test_gumbel_acceptance_is_within_its_bound():
    """k = 1: P(accept) = P(argmax(log q + G) = argmax(log p + G)) lies in
    [(1 - TV) / (1 + TV), 1 - TV] (Daliri et al. 2024), up to the Hoeffding margin."""
    n = 20_000
    gen = torch.Generator().manual_seed(7)
    p, q = random_dists(2, gen), random_dists(1, gen)
    overlap = float(torch.minimum(p[0], q[0]).sum())  # 1 - TV
    tv = 1 - overlap
    alpha = sum(v.num_accepted for v in run_gumbel_trials(p, q, n)) / n
    eps = hoeffding_eps(n)
    assert (1 - tv) / (1 + tv) - eps <= alpha <= overlap + eps, (alpha, overlap)


def test_rejection_sample_with_one_hot_probs_is_greedy_verify():
    """Greedy params make p and q one-hot: rejection sampling then decides exactly like greedy_verify."""
    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams()
    for trial in range(50):
        k = trial % 5
        target_logits = torch.randn(k + 1, 20, generator=gen)
        argmax = target_logits.argmax(-1)
        draft = argmax[:k].clone()
        if k and trial % 2:
            pos = trial % k
            draft[pos] = (draft[pos] + 1) % 20  # a wrong guess at position pos
        q = torch.nn.functional.one_hot(draft, 20).float()
        expected = greedy_verify(draft, target_logits)
        got = rejection_sample(draft, q, process_logits(target_logits, greedy), gen)
        assert (got.num_accepted, got.tokens) == (expected.num_accepted, expected.tokens)


# -- greedy_verify ------------------------------------------------------------------------------


def _logits_with_argmax(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(argmax), vocab)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 5.0
    return logits


@pytest.mark.parametrize(
    ("draft", "argmax", "num_accepted", "tokens"),
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, [1, 2, 3, 4]),  # all accepted + bonus
        ([1, 2, 3], [1, 7, 3, 4], 1, [1, 7]),  # reject at 2: target's token replaces it
        ([1, 2, 3], [9, 2, 3, 4], 0, [9]),  # later matches do not count after a mismatch
        ([], [6], 0, [6]),  # k = 0: plain decoding
    ],
)
def test_greedy_verify(draft, argmax, num_accepted, tokens):
    """Accept the longest prefix equal to the target's argmax, then append the target's argmax."""
    v = greedy_verify(torch.tensor(draft, dtype=torch.long), _logits_with_argmax(argmax))
    assert v.num_accepted == num_accepted
    assert v.tokens == tokens
    assert v.proposed == len(draft)
    assert v.rejected == (num_accepted < len(draft))
    assert v.evaluated == num_accepted + int(num_accepted < len(draft))


# -- process_logits -----------------------------------------------------------------------------


@pytest.fixture
def logits():
    return torch.randn(5, 50, generator=torch.Generator().manual_seed(3)) * 3


def test_greedy_is_one_hot_argmax(logits):
    """temperature 0: one-hot at the argmax, whatever top_k/top_p say."""
    for params in (SamplingParams(), SamplingParams(temperature=0.0, top_k=3, top_p=0.5)):
        probs = process_logits(logits, params)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_only_is_softmax(logits, temperature):
    """No filters: softmax(logits / temperature), rows summing to 1."""
    probs = process_logits(logits, SamplingParams(temperature=temperature))
    assert torch.allclose(probs, (logits / temperature).softmax(-1), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 7, 49, 50, 80])
def test_top_k_keeps_exactly_k(logits, top_k):
    """top_k keeps exactly the k largest logits (all of them if k >= vocab), renormalised."""
    probs = process_logits(logits, SamplingParams(temperature=0.7, top_k=top_k))
    kk = min(top_k, 50)
    assert ((probs > 0).sum(-1) == kk).all()
    top = logits.topk(kk, -1).indices
    assert (probs.gather(-1, top) > 0).all()
    ref = torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top) / 0.7).softmax(-1)
    assert torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_nucleus(logits, top_p):
    """top_p keeps the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    temperature = 1.3
    probs = process_logits(logits, SamplingParams(temperature=temperature, top_p=top_p))
    full = (logits / temperature).softmax(-1)
    for row in range(5):
        sorted_p, order = full[row].sort(descending=True)
        cum = sorted_p.cumsum(0)
        m = int((cum < top_p).sum()) + 1 if top_p < 1.0 else 50  # smallest prefix reaching top_p
        m = min(m, 50)
        kept = set(order[:m].tolist())
        assert set(probs[row].nonzero().flatten().tolist()) == kept
        assert float(full[row, list(kept)].sum()) >= top_p - 1e-6
        if m > 1:  # one token fewer would not reach top_p: the nucleus is the smallest
            assert float(cum[m - 2]) < top_p
        ref = torch.zeros(50)
        ref[order[:m]] = sorted_p[:m] / sorted_p[:m].sum()
        assert torch.allclose(probs[row], ref, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)


def test_top_k_then_top_p(logits):
    """Both filters: the kept set is inside the top-k set and rows sum to 1."""
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=10, top_p=0.8))
    topk = logits.topk(10, -1).indices
    for row in range(5):
        assert set(probs[row].nonzero().flatten().tolist()) <= set(topk[row].tolist())
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)


# -- sampling through the engine ----------------------------------------------------------------


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded-gumbel", "unseeded-rejection"])
def test_engine_sampling_is_lossless(seeded, tokenizer):
    """End to end: with a partly agreeing draft (top-k 8 supports overlap only partly, k=2),
    the joint distribution of the first two generated tokens equals the target's own
    p(x1) * p(x2 | x1) after the same temperature/top-k processing. 10,000 requests of one prompt
    decoded in a single batch; chi-square at p-value 1e-4 over the (x1, x2) cells. Seeded requests
    verify with gumbel_verify, unseeded ones with rejection_sample (their streams are drawn from
    torch's global RNG, seeded here so the test is deterministic)."""
    n = 10_000
    target = cached_model("llama")
    draft = noisy_copy(target, 0.3, seed=1)
    prompt = tokenizer.encode("hello")
    params = [SamplingParams(temperature=1.0, top_k=8, max_new_tokens=3, seed=s if seeded else None,
                             ignore_eos=True) for s in range(n)]
    engine = SpeculativeEngine(target, tokenizer, draft, k=2)
    torch.manual_seed(0)
    outs = engine.generate([Request(prompt, sp) for sp in params])

    p1 = process_logits(full_logits(target, prompt)[-1], params[0])  # [V]
    support = p1.nonzero().flatten().tolist()
    assert len(support) == 8
    joint = torch.zeros(len(support), p1.shape[0], dtype=torch.float64)
    for i, x1 in enumerate(support):
        joint[i] = p1[x1].double() * process_logits(full_logits(target, prompt + [x1])[-1], params[0]).double()
    counts = torch.zeros_like(joint)
    index = {x1: i for i, x1 in enumerate(support)}
    for o in outs:
        assert o.token_ids[0] in index, "first token outside the target's top-k support"
        counts[index[o.token_ids[0]], o.token_ids[1]] += 1
    assert_matches(counts, joint, "joint of the first two tokens")
    # the draft was really in play: some proposals accepted, some rejected
    accepted = sum(o.stats.accepted for o in outs)
    evaluated = sum(o.stats.evaluated for o in outs)
    assert 0.2 < accepted / evaluated < 0.9


def _sampling(seed, **kw):
    base = dict(temperature=0.8, max_new_tokens=30, seed=seed, ignore_eos=True)
    return SamplingParams(**(base | kw))


def test_same_seed_same_output(tokenizer):
    """Determinism: the same seed gives the same tokens (also from a fresh engine); different
    seeds give different samples."""
    target, draft = cached_model("llama"), cached_draft("llama", "noisy")
    prompt = tokenizer.encode("hello")
    first = SpeculativeEngine(target, tokenizer, draft, k=3).generate([Request(prompt, _sampling(11))])[0]
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    again = engine.generate([Request(prompt, _sampling(11))])[0]
    other = engine.generate([Request(prompt, _sampling(12))])[0]
    assert first.token_ids == again.token_ids
    assert len(first.token_ids) == 30
    assert first.token_ids != other.token_ids


def test_same_seed_same_output_whatever_the_draft(tokenizer):
    """A seeded request's tokens depend on the seed and the target alone: target-only decoding,
    a close draft at k = 1 and 3, an unrelated draft, a draft whose weights change between two
    requests (an online update), and adaptive k all give the same tokens."""
    target = cached_model("llama")
    prompt = tokenizer.encode("hello")
    params = [_sampling(seed) for seed in (11, 12)]

    def run(draft, k, policy=None):
        engine = SpeculativeEngine(target, tokenizer, draft, k=k, policy=policy)
        return [engine.generate([Request(prompt, sp)])[0] for sp in params]

    reference = [o.token_ids for o in run(None, 0)]
    noisy = cached_draft("llama", "noisy")
    for name, draft, k, policy in [
        ("noisy k=3", noisy, 3, None), ("noisy k=1", noisy, 1, None),
        ("unrelated draft", cached_draft("llama", "random"), 3, None),
        ("adaptive k", noisy, 4, AdaptiveK(4, PolicyConfig())),
    ]:
        outs = run(draft, k, policy)
        assert [o.token_ids for o in outs] == reference, name
    assert sum(o.stats.accepted for o in run(noisy, 3)) > 0  # the draft was in play
    engine = SpeculativeEngine(target, tokenizer, noisy_copy(target, 0.2, seed=5), k=3)
    first = engine.generate([Request(prompt, params[0])])[0].token_ids
    engine.offer_draft(noisy.state_dict(), version=1)  # an online update goes live
    assert [first, engine.generate([Request(prompt, params[1])])[0].token_ids] == reference


@pytest.mark.parametrize("draft_kind", ["none", "noisy"])
def test_batch_composition_does_not_change_a_sampled_row(draft_kind, tokenizer):
    """A seeded request gives the same tokens alone and batched with other requests (other
    prompt lengths, budgets, sampling parameters, a greedy row), as verify.py promises
    ('same seed -> same output, whoever shares the batch')."""
    target = cached_model("llama")
    draft = None if draft_kind == "none" else cached_draft("llama", "noisy")
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    prompt = tokenizer.encode("hello")
    others = [
        Request(tokenizer.encode("x"), _sampling(100, max_new_tokens=45)),
        Request(tokenizer.encode("a much longer prompt than the others"), _sampling(101, top_k=20)),
        Request(tokenizer.encode("def"), SamplingParams(max_new_tokens=40, ignore_eos=True)),
    ]
    for seed in range(4):
        alone = engine.generate([Request(prompt, _sampling(seed))])[0].token_ids
        batched = engine.generate([others[0], Request(prompt, _sampling(seed)), *others[1:]])[1].token_ids
        diff = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a != b), None)
        assert alone == batched, f"seed {seed}: alone and batched differ from token {diff} of {len(alone)}"


@pytest.mark.parametrize("temperature", [5e-324, 3.6e-118, 1e-38, 1e-30, 1e-12, 1e-6])
def test_a_tiny_temperature_is_argmax_not_nan(temperature):
    """logits / t overflowed to inf - inf = NaN for t <= ~1e-37 (and took the whole batch down in
    the sampler): processed logits are shifted first, so a tiny t is the argmax, never NaN."""
    logits = torch.tensor([[3.0, 1.0, -2.0, 2.999], [0.0, 5.0, 5.0, -1.0]]) * 40
    probs = process_logits(logits, SamplingParams(temperature=temperature))
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert probs[0].argmax() == 0 and probs[1, 1] > 0 and probs[1, 1] + probs[1, 2] == pytest.approx(1.0)


def test_tiny_temperatures_in_a_batch_fail_no_request(tokenizer):
    """The issue's batch poisoning: several requests with tiny temperatures beside greedy ones;
    every request finishes normally and the greedy ones still equal plain greedy."""
    from conftest import ARCHS, cached_draft, cached_model, reference_greedy

    arch = ARCHS[0]
    engine = SpeculativeEngine(cached_model(arch), tokenizer, cached_draft(arch, "noisy"), k=3)
    prompt = tokenizer.encode("the quick brown fox")
    tiny = [Request(prompt, SamplingParams(temperature=t, max_new_tokens=12, seed=s))
            for t, s in ((1e-38, None), (1e-37, 3), (5e-39, None), (3.6e-118, None))]
    plain = [Request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)) for _ in range(2)]
    outs = engine.generate(tiny + plain)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    for o in outs[len(tiny):]:
        assert o.token_ids == reference_greedy(arch, prompt, 12)


# -- sampling parameters at their extremes (issue 26) ---------------------------------------------

# Python floats that float32 cannot hold (1e-300, 5e-324 and 1e-46 round to 0 there), the smallest
# it can, and ordinary ones: each is a valid top_p, so each must keep at least the most likely token.
TINY_TOP_P = [5e-324, 1e-300, 1e-46, 1e-45, 1e-40, 1e-30, 1e-7]


@pytest.mark.parametrize("top_p", TINY_TOP_P)
def test_a_tiny_top_p_keeps_the_most_likely_token(logits, top_p):
    """top_p 1e-300 became 0 in float32, the nucleus test `mass before >= 0` dropped every token and
    the request failed with 'probability tensor contains either inf, nan or element < 0' (a 500).
    Any top_p in (0, 1] keeps the most likely token; one this small keeps it alone."""
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.isfinite(probs).all()
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


_FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_LOGITS = st.lists(st.one_of(_FINITE32, st.floats(-20, 20, width=32), st.just(float("-inf"))), min_size=1, max_size=12) \
    .filter(lambda row: any(math.isfinite(x) for x in row))
_TEMPERATURE = st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-300, 1e-38, 1e-20, 1.0, 100.0, 1e38, 1e300]),
                         st.floats(min_value=0.0, max_value=1e308, exclude_min=True))
_TOP_P = st.one_of(st.sampled_from([*TINY_TOP_P, 0.5, 1 - 1e-12, 1.0]),
                   st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
_TOP_K = st.integers(0, 15)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(row=_LOGITS, temperature=_TEMPERATURE, top_p=_TOP_P, top_k=_TOP_K, seed=st.integers(0, 2**63 - 1))
def test_every_valid_sampling_parameter_gives_a_distribution(row, temperature, top_p, top_k, seed):
    """Property (hypothesis, derandomized: the same 400 cases on every run): for any logits a model
    can produce (finite float32 of any size, some -inf) and any valid temperature, top_p and top_k,
    alone or together, process_logits gives a distribution both samplers can draw from: finite,
    >= 0, summing to 1, keeping a most likely token, inside the top-k set, and a prefix of the
    tokens sorted by logit (no kept token is less likely than a dropped one)."""
    logits = torch.tensor(row, dtype=torch.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    probs = process_logits(logits, params)  # [vocab]
    assert torch.isfinite(probs).all() and (probs >= 0).all(), probs
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    best = logits == logits.max()
    assert float(probs[best].sum()) > 0, "no most likely token kept"
    kept = probs > 0
    if (~kept).any():
        assert float(logits[kept].min()) >= float(logits[~kept].max()), "a dropped token is likelier than a kept one"
    if 0 < top_k < len(row):
        assert int(kept.sum()) <= top_k or float(logits[kept].min()) == float(logits.topk(top_k).values[-1])
    # both samplers take it: multinomial (rejection_sample) and Gumbel-max (gumbel_verify)
    drawn = int(sample(probs[None], torch.Generator().manual_seed(seed % 2**62))[0])
    assert kept[drawn]
    assert kept[int((probs.log() + gumbel_noise(seed, 0, len(row))).argmax())]


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1e-300])
def test_a_temperature_that_is_not_a_finite_number_ge_0_is_refused(temperature):
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=temperature)


EXTREMES = {  # each keeps only the most likely token, so the output is the target's greedy output
    "top_p 1e-300": dict(temperature=1.0, top_p=1e-300),
    "top_p 5e-324": dict(temperature=1.0, top_p=5e-324),
    "top_p 5e-324, temperature 1e38": dict(temperature=1e38, top_p=5e-324),
    "top_k 1": dict(temperature=1.0, top_k=1),
    "top_k 1, top_p 1e-300, temperature 1e300": dict(temperature=1e300, top_k=1, top_p=1e-300),
    "temperature 5e-324, top_p 1e-46": dict(temperature=5e-324, top_p=1e-46),
}


@pytest.mark.parametrize("seeded", [False, True], ids=["rejection", "gumbel"])
@pytest.mark.parametrize("draft_kind", ["none", "noisy"])
def test_extreme_sampling_parameters_decode_through_draft_and_target(draft_kind, seeded, tokenizer):
    """The engine end to end, in one batch: each extreme above samples from the draft (when there is
    one) and verifies against the target without failing, and gives the target's greedy tokens."""
    from conftest import reference_greedy

    target = cached_model("llama")
    draft = None if draft_kind == "none" else cached_draft("llama", "noisy")
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    prompt = tokenizer.encode("the quick brown fox")
    requests = [Request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, seed=7 if seeded else None, **kw))
                for kw in EXTREMES.values()]
    outs = engine.generate(requests)
    reference = reference_greedy("llama", prompt, 12)
    for name, o in zip(EXTREMES, outs):
        assert o.finish_reason == "length", f"{name}: {o.finish_reason} {getattr(o, 'error', '')}"
        assert o.token_ids == reference, name
    if draft is not None:
        assert sum(o.stats.draft_forwards for o in outs) > 0  # the draft path was taken
