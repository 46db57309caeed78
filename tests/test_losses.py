"""Distillation losses: identities (in the style of TRL's GKD tests), brute-force values, safety at
exact zeros, gradients, and the top-K bucketing of a compact teacher."""

from __future__ import annotations

import math

import pytest
import torch

from onspec.online.losses import (
    LOSSES,
    bucket,
    distill_loss,
    expected_acceptance,
    forward_kl,
    jsd,
    mixture_jsd,
    reverse_kl,
    tvd,
)

DTYPES = (torch.float32, torch.float64)
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
INF = float("inf")


def rand_logp(n: int, v: int, seed: int, dtype=torch.float64, scale: float = 2.0) -> torch.Tensor:
    """Random log-probabilities [n, v], fairly peaked (logits ~ N(0, scale^2))."""
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, v, generator=gen, dtype=torch.float64) * scale, -1).to(dtype)


def with_zeros(logp: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """logp with the outcomes in `zero` [n, v] bool set to probability exactly 0, renormalised."""
    return torch.log_softmax(logp.masked_fill(zero, -INF), -1)


def binary_entropy(b: float) -> float:
    return -sum(x * math.log(x) for x in (b, 1 - b) if x > 0)


def all_losses(p, q, beta):
    """Every loss of the module on (p, q), by name."""
    return {"fkl": forward_kl(p, q), "rkl": reverse_kl(p, q), "tvd": tvd(p, q),
            "jsd": jsd(p, q, beta), "mixture_jsd": mixture_jsd(p, q, beta)}


# -- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
def test_identical_inputs_give_zero(dtype, beta):
    p = rand_logp(8, 50, seed=0, dtype=dtype)
    for name, loss in all_losses(p, p.clone(), beta).items():
        assert loss.shape == (8,) and loss.dtype == dtype, name
        assert loss.abs().max() <= 1e-6, name
    for name in LOSSES:
        assert distill_loss(name, p, p.clone(), beta=beta).abs().max() <= 1e-6, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_reverse_swap_and_nonnegative(dtype):
    p, q = rand_logp(8, 50, 1, dtype), rand_logp(8, 50, 2, dtype)
    torch.testing.assert_close(forward_kl(p, q), reverse_kl(q, p))
    torch.testing.assert_close(reverse_kl(p, q), forward_kl(q, p))
    assert (forward_kl(p, q) > 0).all() and (reverse_kl(p, q) > 0).all()
    assert not torch.allclose(forward_kl(p, q), reverse_kl(p, q))  # KL is not symmetric


@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_endpoints(dtype):
    p, q = rand_logp(8, 50, 3, dtype), rand_logp(8, 50, 4, dtype)
    assert mixture_jsd(p, q, 0.0).abs().max() <= 1e-6
    assert mixture_jsd(p, q, 1.0).abs().max() <= 1e-6
    # TRL's GKD convention for the loss users select
    torch.testing.assert_close(jsd(p, q, 0.0), forward_kl(p, q))
    torch.testing.assert_close(jsd(p, q, 1.0), reverse_kl(p, q))
    torch.testing.assert_close(jsd(p, q, 0.3), mixture_jsd(p, q, 0.3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_half_symmetric_and_bounded(dtype):
    p, q = rand_logp(8, 50, 5, dtype, scale=4.0), rand_logp(8, 50, 6, dtype, scale=4.0)
    torch.testing.assert_close(jsd(p, q, 0.5), jsd(q, p, 0.5))
    assert (jsd(p, q, 0.5) > 0).all() and (jsd(p, q, 0.5) <= math.log(2)).all()
    # in general 0 <= JSD_beta <= H(beta): m >= beta p and m >= (1 - beta) q bound both KLs
    for beta in (0.01, 0.1, 0.3, 0.7, 0.99):
        value = mixture_jsd(p, q, beta)
        assert (value >= 0).all() and (value <= binary_entropy(beta) + 1e-6).all(), beta
    # disjoint supports reach the bound log 2 exactly
    disjoint_p = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=dtype))
    disjoint_q = torch.log(torch.tensor([[0.0, 0.0, 0.25, 0.75]], dtype=dtype))
    torch.testing.assert_close(jsd(disjoint_p, disjoint_q, 0.5), torch.tensor([math.log(2)], dtype=dtype))


def test_mixture_jsd_continuous_and_vanishing_at_endpoints():
    p, q = rand_logp(8, 50, 7), rand_logp(8, 50, 8)
    betas = torch.linspace(0.02, 0.98, 49).tolist()
    for beta in betas:  # |dJ/dbeta| is bounded away from the endpoints
        assert (mixture_jsd(p, q, beta + 1e-6) - mixture_jsd(p, q, beta)).abs().max() <= 1e-4, beta
    for eps in (1e-2, 1e-4, 1e-6):  # -> 0 at both ends, within H(eps) ~ eps log(1/eps)
        assert (mixture_jsd(p, q, eps) <= binary_entropy(eps)).all(), eps
        assert (mixture_jsd(p, q, 1 - eps) <= binary_entropy(eps) + 1e-12).all(), eps
    assert mixture_jsd(p, q, 1e-4).max() < 2e-3
    assert (mixture_jsd(p, q, 1e-4) < mixture_jsd(p, q, 1e-2)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tvd_is_one_minus_acceptance(dtype):
    p, q = rand_logp(8, 50, 9, dtype), rand_logp(8, 50, 10, dtype)
    value = tvd(p, q)
    torch.testing.assert_close(value, 1 - torch.minimum(p.exp(), q.exp()).sum(-1))
    torch.testing.assert_close(value, 1 - expected_acceptance(p, q))
    assert (value >= 0).all() and (value <= 1).all()
    disjoint_p = torch.log(torch.tensor([[1.0, 0.0]], dtype=dtype))
    disjoint_q = torch.log(torch.tensor([[0.0, 1.0]], dtype=dtype))
    assert tvd(disjoint_p, disjoint_q).item() == 1.0 and expected_acceptance(disjoint_p, disjoint_q).item() == 0.0


# -- brute force --------------------------------------------------------------------------------


def bf_kl(x: list[float], y: list[float]) -> float:
    total = 0.0
    for xi, yi in zip(x, y):
        if xi > 0:
            total += xi * math.log(xi / yi) if yi > 0 else INF
    return total


def bf_mixture_jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return sum(w * bf_kl(x, m) for w, x in ((beta, p), (1 - beta, q)) if w > 0)  # 0 * KL = 0 even if KL = inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_against_brute_force(dtype):
    p64, q64 = rand_logp(4, 5, 11), rand_logp(4, 5, 12)
    p64[0], q64[1] = with_zeros(p64[:1], torch.tensor([[True, False, False, True, False]]))[0], with_zeros(
        q64[1:2], torch.tensor([[False, True, False, False, False]]))[0]  # zeros in p (row 0) and q (row 1)
    p, q = p64.to(dtype), q64.to(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for row in range(4):
        pr, qr = p64[row].exp().tolist(), q64[row].exp().tolist()
        expect = {
            "fkl": bf_kl(pr, qr),
            "rkl": bf_kl(qr, pr),
            "tvd": 0.5 * sum(abs(a - b) for a, b in zip(pr, qr)),
            "alpha": sum(min(a, b) for a, b in zip(pr, qr)),
        }
        got = {"fkl": forward_kl(p, q), "rkl": reverse_kl(p, q), "tvd": tvd(p, q), "alpha": expected_acceptance(p, q)}
        for beta in (0.0, 0.25, 0.5, 0.9, 1.0):
            expect[f"jsd{beta}"] = {0.0: expect["fkl"], 1.0: expect["rkl"]}.get(beta, bf_mixture_jsd(pr, qr, beta))
            got[f"jsd{beta}"] = jsd(p, q, beta)
            expect[f"mix{beta}"] = bf_mixture_jsd(pr, qr, beta)
            got[f"mix{beta}"] = mixture_jsd(p, q, beta)
        for key, value in got.items():
            assert value.dtype == dtype
            torch.testing.assert_close(value[row].double(), torch.tensor(expect[key], dtype=torch.float64), **tol,
                                       msg=f"{key} row {row}")


# -- exact zeros --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["shared", "p_only", "q_only"])
def test_zeros_make_no_nan(dtype, where):
    """-inf log-probs: values may be +inf only where the divergence is infinite, never NaN; the
    gradient w.r.t. student_logp is never NaN."""
    p, q = rand_logp(6, 12, 13, dtype), rand_logp(6, 12, 14, dtype)
    gen = torch.Generator().manual_seed(15)
    zero = torch.rand(6, 12, generator=gen) < 0.4
    zero[:, 0] = False  # keep some mass in every row
    if where in ("shared", "p_only"):
        p = with_zeros(p, zero)
    if where in ("shared", "q_only"):
        q = with_zeros(q, zero)
    finite = {"shared": set(LOSSES) | {"mixture_jsd"}, "p_only": {"fkl", "tvd", "mixture_jsd"},
              "q_only": {"rkl", "tvd", "mixture_jsd"}}[where]
    for beta in BETAS:
        q_leaf = q.clone().requires_grad_(True)
        for name, loss in all_losses(p, q_leaf, beta).items():
            assert not loss.isnan().any(), (name, beta)
            if name in finite or (name == "jsd" and 0 < beta < 1):
                assert loss.isfinite().all(), (name, beta)
            (grad,) = torch.autograd.grad(loss.sum(), q_leaf)
            assert not grad.isnan().any(), (name, beta)
    # the realistic path: masked logits through log_softmax, shared zeros -> finite everything
    logits = torch.randn(6, 12, generator=gen, dtype=dtype).masked_fill(zero, -INF).requires_grad_(True)
    for name in LOSSES:
        loss = distill_loss(name, with_zeros(p, zero), torch.log_softmax(logits, -1), beta=0.5)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert loss.isfinite().all() and grad.isfinite().all(), name


# -- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kl_gradient_is_q_minus_p(dtype):
    p = rand_logp(8, 50, 16, dtype)
    logits = (torch.randn(8, 50, generator=torch.Generator().manual_seed(17), dtype=torch.float64) * 2).to(dtype)
    logits.requires_grad_(True)
    forward_kl(p, torch.log_softmax(logits, -1)).sum().backward()
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), -1) - p.exp())


# -- bucketing a compact teacher ----------------------------------------------------------------


def topk_teacher(p_logp: torch.Tensor, k: int):
    """The compact form of a teacher: its top-k ids [N, k] and probabilities [N, k]."""
    top = p_logp.exp().topk(k, dim=-1)
    return top.indices, top.values


def test_bucket_rest_buckets_are_correct():
    p = rand_logp(6, 40, 18)
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    ids, probs = topk_teacher(p, 5)
    t, s = bucket(ids, probs, logits)
    assert t.shape == s.shape == (6, 6) and t.dtype == s.dtype == torch.float64
    q = torch.softmax(logits, -1)
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    torch.testing.assert_close(t[:, :5].exp(), probs)
    torch.testing.assert_close(t[:, 5].exp(), 1 - probs.sum(-1))
    torch.testing.assert_close(s[:, :5].exp(), q.gather(-1, ids))
    torch.testing.assert_close(s[:, 5].exp(), (q * outside).sum(-1))
    torch.testing.assert_close(s.exp().sum(-1), torch.ones(6, dtype=torch.float64))
    # the student rest keeps its precision when the top-K holds nearly all of q
    sharp = torch.full((1, 40), -30.0, dtype=torch.float32)
    sharp[0, :5] = 0.0
    _, s_sharp = bucket(torch.arange(5)[None], torch.full((1, 5), 0.2), sharp)
    exact = math.log(35) - 30 - math.log(5 + 35 * math.exp(-30))
    assert abs(s_sharp[0, 5].item() - exact) < 1e-4  # log1p(-sum q_top) would give -inf in float32


@pytest.mark.parametrize("k", ["V-1", "all_mass"])
def test_bucket_exact_cases(k):
    v = 30
    p, q = rand_logp(6, v, 20), rand_logp(6, v, 21)
    if k == "all_mass":  # the teacher lives on 8 tokens; the top-8 holds all of its mass
        keep = p.topk(8, dim=-1).indices
        p = with_zeros(p, torch.ones_like(p, dtype=torch.bool).scatter(-1, keep, False))
    ids, probs = topk_teacher(p, v - 1 if k == "V-1" else 8)
    t, s = bucket(ids, probs, q)  # log-probs are valid logits
    exact = ("fkl", "rkl", "tvd", "jsd") if k == "V-1" else ("fkl", "tvd", "jsd")
    for name in exact:
        if k == "all_mass":
            # true zeros in p are floored at TEACHER_FLOOR inside bucket(): exact up to the
            # floor's own contribution, (K+1) * TEACHER_FLOOR * |log ratio| < 1e-4
            torch.testing.assert_close(distill_loss(name, t, s), distill_loss(name, p, q), msg=name, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(distill_loss(name, t, s), distill_loss(name, p, q), msg=name)
    if k == "all_mass":  # q has mass where p has none: the full reverse KL is infinite, while
        # the bucketed one is large but finite (the teacher's empty rest is floored at TEACHER_FLOOR,
        # so online training with --loss rkl is not discarded as non-finite)
        bucketed = reverse_kl(t, s)
        assert reverse_kl(p, q).isinf().all() and torch.isfinite(bucketed).all() and (bucketed > 1).all()


def test_bucket_partial_mass_is_a_lower_bound():
    p, q = rand_logp(16, 40, 22, scale=1.0), rand_logp(16, 40, 23, scale=1.0)
    t, s = bucket(*topk_teacher(p, 6), q)
    for name in LOSSES:
        coarse, full = distill_loss(name, t, s), distill_loss(name, p, q)
        assert (coarse <= full + 1e-12).all(), name
        assert (coarse < full - 1e-3).any(), name  # the bound is not trivially tight here


def test_bucket_covering_the_whole_vocabulary_has_no_rest():
    """K = V (a tiny vocabulary): the teacher's leftover is rounding noise, not mass."""
    p, logits = rand_logp(4, 10, 24), torch.randn(4, 10, generator=torch.Generator().manual_seed(25))
    ids, probs = topk_teacher(p, 10)
    logits.requires_grad_(True)
    t, s = bucket(ids, probs.half(), logits)
    assert (t[:, -1] == -INF).all() and (s[:, -1] == -INF).all()
    torch.testing.assert_close(t.exp().sum(-1), torch.ones(4))
    loss = forward_kl(t, s)
    loss.sum().backward()
    assert loss.isfinite().all() and logits.grad.isfinite().all()


def test_bucket_accepts_float16_teacher():
    p, logits = rand_logp(8, 64, 26), torch.randn(8, 64, generator=torch.Generator().manual_seed(27))
    ids, probs = topk_teacher(p, 8)
    logits.requires_grad_(True)
    t16, s16 = bucket(ids, probs.half(), logits)
    t32, s32 = bucket(ids, probs.float(), logits)
    assert t16.dtype == s16.dtype == torch.float32
    torch.testing.assert_close(t16.exp(), t32.exp(), atol=2e-3, rtol=0)
    assert (t16.exp().sum(-1) <= 1 + 1e-6).all()
    for name in LOSSES:
        t16, s16 = bucket(ids, probs.half(), logits)  # a fresh graph per backward
        loss = distill_loss(name, t16, s16)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert loss.isfinite().all() and grad.isfinite().all(), name
        torch.testing.assert_close(loss, distill_loss(name, t32, s32), atol=5e-3, rtol=0, msg=name)


# -- dispatch and argument checks ---------------------------------------------------------------


def test_distill_loss_dispatches_by_name():
    p, q = rand_logp(4, 20, 28), rand_logp(4, 20, 29)
    assert set(LOSSES) == {"fkl", "rkl", "jsd", "tvd"}
    torch.testing.assert_close(distill_loss("fkl", p, q), forward_kl(p, q))
    torch.testing.assert_close(distill_loss("rkl", p, q), reverse_kl(p, q))
    torch.testing.assert_close(distill_loss("tvd", p, q), tvd(p, q))
    torch.testing.assert_close(distill_loss("jsd", p, q), jsd(p, q, 0.5))
    torch.testing.assert_close(distill_loss("jsd", p, q, beta=0.2), mixture_jsd(p, q, 0.2))


def test_distill_loss_rejects_bad_arguments():
    p, q = rand_logp(4, 20, 30), rand_logp(4, 20, 31)
    with pytest.raises(ValueError, match=r"unknown distillation loss 'kl'.*'fkl', 'jsd', 'rkl', 'tvd'"):
        distill_loss("kl", p, q)
    for beta in (-0.1, 1.5, float("nan")):
        for call in (lambda: distill_loss("jsd", p, q, beta=beta), lambda: distill_loss("fkl", p, q, beta=beta),
                     lambda: jsd(p, q, beta), lambda: mixture_jsd(p, q, beta)):
            with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
                call()
    with pytest.raises(ValueError, match="shapes differ"):
        distill_loss("fkl", p, q[:, :10])
