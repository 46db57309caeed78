"""Distillation losses between the target (teacher) p and the draft (student) q.

Pure functions on log-probabilities over one support: `teacher_logp` (log p) and `student_logp`
(log q), both [N, V] (N positions, V outcomes), each returning a per-position loss [N] in the
inputs' dtype. Exact zeros (-inf log-probs) are safe: 0 * log 0 = 0, and no NaN appears in a
value or a gradient (a value is +inf only where the divergence really is infinite, e.g. forward
KL where q = 0 < p). Gradients flow to `student_logp`; the teacher is a constant.

Why these losses: speculative sampling accepts a draft token with probability
alpha = sum_x min(p, q) = 1 - TV(p, q) (`expected_acceptance`), so `tvd` targets acceptance
directly (DistillSpec); the KLs and the generalised JSD are smoother surrogates (GKD).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _kl(logx: torch.Tensor, logy: torch.Tensor) -> torch.Tensor:
    """KL(x || y) = sum x (log x - log y) over the last dim, with 0 * anything = 0. [N, V] -> [N]"""
    # select before multiplying: where x = 0 the difference may be NaN (-inf - -inf); the where
    # drops it and its gradient is 0, so nothing NaN ever meets the multiplication
    diff = torch.where(logx > NEG_INF, logx - logy, 0.0)
    return (logx.exp() * diff).sum(-1)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q): mass-covering. [N, V], [N, V] -> [N]"""
    return _kl(teacher_logp, student_logp)


def reverse_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum q (log q - log p): mode-seeking. [N, V], [N, V] -> [N]"""
    return _kl(student_logp, teacher_logp)


def mixture_jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence beta * KL(p || m) + (1 - beta) * KL(q || m), with the
    mixture m = beta * p + (1 - beta) * q. [N, V], [N, V] -> [N]

    0 <= value <= H(beta) = -beta log beta - (1 - beta) log(1 - beta) <= log 2; it is 0 at beta = 0
    and beta = 1 (m is then q or p itself), and symmetric in (p, q) at beta = 0.5.
    """
    _check_beta(beta)
    a = teacher_logp + (math.log(beta) if beta > 0 else NEG_INF)  # log(beta p)        [N, V]
    b = student_logp + (math.log1p(-beta) if beta < 1 else NEG_INF)  # log((1-beta) q)  [N, V]
    # log m = logaddexp(a, b); where both are -inf its gradient would be NaN (even times 0), so
    # feed finite stand-ins there: m is never used at those outcomes (both KL terms mask them)
    dead = (a == NEG_INF) & (b == NEG_INF)
    log_m = torch.logaddexp(a.masked_fill(dead, 0.0), b.masked_fill(dead, 0.0))  # [N, V]
    loss = torch.zeros(teacher_logp.shape[:-1], dtype=teacher_logp.dtype, device=teacher_logp.device)
    if beta > 0:  # a zero-weight term is exactly 0: skip it
        loss = loss + beta * _kl(teacher_logp, log_m)
    if beta < 1:
        loss = loss + (1 - beta) * _kl(student_logp, log_m)
    return loss


def jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The generalised JSD as a training loss. [N, V], [N, V] -> [N]

    For 0 < beta < 1 this is `mixture_jsd`. The mixture form vanishes at the endpoints, so, like
    TRL's GKDTrainer, we map beta = 0 to forward KL and beta = 1 to reverse KL (beta slides from
    mass-covering to mode-seeking). Raises ValueError for beta outside [0, 1].
    """
    _check_beta(beta)
    if beta == 0:
        return forward_kl(teacher_logp, student_logp)
    if beta == 1:
        return reverse_kl(teacher_logp, student_logp)
    return mixture_jsd(teacher_logp, student_logp, beta)


def tvd(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Total variation 0.5 * sum |p - q| = 1 - alpha: minimising it maximises acceptance. [N, V] -> [N]"""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def expected_acceptance(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """alpha = sum min(p, q): the chance that speculative sampling accepts a token drafted from q
    when the target is p (= 1 - TV(p, q)). [N, V], [N, V] -> [N]"""
    return torch.minimum(teacher_logp.exp(), student_logp.exp()).sum(-1)


LOSSES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "tvd": tvd}


def distill_loss(name: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The loss `name` (a key of LOSSES) per position; `beta` is used by "jsd" only but is checked
    for every name, so a bad setting fails at once. [N, V], [N, V] -> [N]"""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; choose from {sorted(LOSSES)}")
    _check_beta(beta)
    if teacher_logp.shape != student_logp.shape:
        shapes = f"{tuple(teacher_logp.shape)} vs {tuple(student_logp.shape)}"
        raise ValueError(f"teacher and student shapes differ: {shapes}")
    if name == "jsd":
        return jsd(teacher_logp, student_logp, beta)
    return LOSSES[name](teacher_logp, student_logp)


TEACHER_FLOOR = 1e-7
"""Smallest teacher probability per bucket: about float16's underflow, where stored top-K values
become 0 (see `bucket`)."""


def bucket(
    teacher_top_ids: torch.Tensor, teacher_top_probs: torch.Tensor, student_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a compact teacher and the full student onto K + 1 buckets: the teacher's K top tokens
    (distinct ids) and one "rest" bucket holding all other tokens.

    teacher_top_ids [N, K] long, teacher_top_probs [N, K] (float16 is fine), student_logits [N, V]
    -> (teacher_logp [N, K+1], student_logp [N, K+1]), in float32 (float64 if the logits are).

    Teacher rest = max(0, 1 - sum top_probs); the top probs are scaled down if rounding made them
    sum past 1. Student: log_softmax gathered at the K ids; its rest is the logsumexp of its
    log-probs over the other tokens (not log1p(-sum q_topK), which cancels catastrophically when
    the top-K holds nearly all of q). If the K ids cover the whole vocabulary there is no rest:
    the teacher's leftover is rounding noise, so it is dropped and the top probs renormalised
    (otherwise forward KL would be infinite against the student's empty rest bucket).

    A loss on these buckets is the divergence of the coarsened distributions. By the
    data-processing inequality it is a lower bound of the full-vocabulary divergence, with equality
    exactly when the coarsening loses nothing. The chain rule makes this precise, with p|rest and
    q|rest the distributions inside the rest bucket:
      fkl: KL(p||q) = KL_bucketed + p(rest) * KL(p|rest || q|rest): equal iff p(rest) = 0 or
           p|rest = q|rest;
      rkl: the same with p and q swapped: equal iff q(rest) = 0 or p|rest = q|rest;
      jsd (0 < beta < 1): equal iff p(rest) = 0, q(rest) = 0 or p|rest = q|rest;
      tvd: equal iff p - q has one sign on all rest tokens (implied by each condition above).
    So a top-K holding all of p's mass makes fkl, jsd and tvd exact; K = V - 1 makes all exact.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_all = torch.log_softmax(student_logits.to(dtype), dim=-1)  # [N, V]
    in_top = torch.zeros_like(student_all, dtype=torch.bool).scatter_(-1, teacher_top_ids, True)  # [N, V]
    covered = in_top.all(-1, keepdim=True)  # [N, 1] the top-K is the whole vocabulary
    # masked_fill zeroes the gradient of masked entries, so an all -inf row cannot leak NaN
    student_rest = torch.logsumexp(student_all.masked_fill(in_top, NEG_INF), -1, keepdim=True)  # [N, 1]
    student_logp = torch.cat([student_all.gather(-1, teacher_top_ids), student_rest], -1)  # [N, K+1]

    top = teacher_top_probs.to(dtype)  # [N, K]
    total = top.sum(-1, keepdim=True)  # [N, 1]
    teacher_rest = (1 - total).clamp(min=0).masked_fill(covered, 0.0)  # [N, 1]
    top = top / torch.where(covered, total, total.clamp(min=1))
    teacher = torch.cat([top, teacher_rest], -1)  # [N, K+1]
    # The stored teacher is a softmax, never exactly 0; zeros here are float16 underflow or the
    # clamped rest. Against them reverse KL (and any q-weighted term) is infinite, so floor every
    # bucket at TEACHER_FLOOR and renormalise; a covered vocabulary keeps its empty rest at 0.
    floor = torch.full_like(teacher, TEACHER_FLOOR)
    floor[:, -1:] = floor[:, -1:].masked_fill(covered, 0.0)
    teacher = teacher.clamp(min=floor)
    teacher_logp = (teacher / teacher.sum(-1, keepdim=True)).log()  # [N, K+1]
    return teacher_logp, student_logp
