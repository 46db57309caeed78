"""The two extremes of draft quality: a perfect draft and a useless one."""

from __future__ import annotations

import copy
import math

import pytest
from conftest import ARCHS, cached_draft, cached_model, reference_greedy

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams

TEXTS = ("hello world", "a", "the quick brown fox jumps", "def f(x):\n    return")
K = 4
N_NEW = 37  # 37 = 7 * (K + 1) + 2: the last step is limited by the budget


def expected_hist(n_new: int, k: int) -> list[int]:
    """accepted_hist when every proposal is accepted: full steps emit k+1 tokens; a last step
    with only m < k+1 tokens of budget left proposes m-1 tokens (and accepts them all)."""
    hist = [0] * (k + 1)
    hist[k] = n_new // (k + 1)
    m = n_new % (k + 1)
    if m:
        hist[m - 1] += 1
    return hist


@pytest.mark.parametrize("same_object", [True, False], ids=["same-object", "deepcopy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_identical_draft_accepts_everything(arch, same_object, tokenizer):
    """A draft identical to the target accepts every proposal (alpha == 1, every step accepts
    k except the budget-limited last one) and the output is still plain greedy."""
    target = cached_model(arch)
    draft = target if same_object else copy.deepcopy(target)
    ids = [tokenizer.encode(t) for t in TEXTS]
    engine = SpeculativeEngine(target, tokenizer, draft, k=K)
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)) for p in ids])
    for p, o in zip(ids, outs):
        assert o.token_ids == reference_greedy(arch, p, N_NEW)
        assert o.stats.alpha == 1.0
        assert o.stats.accepted_hist == expected_hist(N_NEW, K)
        assert o.stats.steps == math.ceil(N_NEW / (K + 1))
        assert o.stats.mean_accepted_length == N_NEW / o.stats.steps


@pytest.mark.parametrize("top_k", [0, 20])
def test_identical_draft_accepts_everything_when_sampling(top_k, tokenizer):
    """With p == q, rejection sampling accepts with probability min(1, p/q) = 1: alpha == 1."""
    target = cached_model("llama")
    ids = [tokenizer.encode(t) for t in TEXTS]
    engine = SpeculativeEngine(target, tokenizer, copy.deepcopy(target), k=K)
    params = [SamplingParams(temperature=0.9, top_k=top_k, max_new_tokens=N_NEW, seed=s, ignore_eos=True) for s in range(4)]
    outs = engine.generate([Request(p, sp) for p, sp in zip(ids, params)])
    for o in outs:
        assert len(o.token_ids) == N_NEW
        assert o.stats.alpha == 1.0
        assert o.stats.accepted_hist == expected_hist(N_NEW, K)


@pytest.mark.parametrize("arch", ARCHS)
def test_unrelated_draft_accepts_almost_nothing(arch, tokenizer):
    """An unrelated random draft (vocab 260) almost never guesses the target's argmax:
    alpha < 0.2, most steps accept nothing, and the output is still plain greedy."""
    target, draft = cached_model(arch), cached_draft(arch, "random")
    ids = [tokenizer.encode(t) for t in TEXTS]
    engine = SpeculativeEngine(target, tokenizer, draft, k=K)
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)) for p in ids])
    for p, o in zip(ids, outs):
        assert o.token_ids == reference_greedy(arch, p, N_NEW)
        assert o.stats.alpha < 0.2
        assert o.stats.accepted_hist[0] >= 0.8 * o.stats.steps
        # nearly one target pass per token: speculation bought (almost) nothing
        assert o.stats.steps >= 0.8 * N_NEW
