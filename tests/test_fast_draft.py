"""The cheaper draft (models/fast_draft.py): a reduced head over the N most frequent ids and int8
weights. Both change only what the draft proposes, so the output must stay exactly the target's
(greedy equality) and the sampled distribution must stay p (chi-square, as test_verify_sampling)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, cached_draft, cached_model, full_logits, noisy_copy, reference_greedy
from test_verify_sampling import assert_matches

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams, process_logits
from onspec.models.draft_vocab import DraftVocab
from onspec.models.fast_draft import FastDraft
from onspec.models.int8 import Int8Linear

TEXTS = ("hello world", "the quick brown fox jumps", "def f(x):\n    return")


def _vocab(n: int, seed: int = 0, always=()) -> DraftVocab:
    counts = torch.rand(VOCAB, generator=torch.Generator().manual_seed(seed)) * 100
    return DraftVocab(counts.long(), n, always=always, refresh_every=16)


@pytest.mark.parametrize("n", [8, 64, 200])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_reduced_head_and_int8_keep_greedy_equality(n, int8, k, tokenizer):
    target, draft = cached_model("llama"), cached_draft("llama", "noisy")
    engine = SpeculativeEngine(target, tokenizer, copy.deepcopy(draft), k=k, draft_vocab=_vocab(n), draft_quant="int8" if int8 else "none")
    prompts = [tokenizer.encode(t) for t in TEXTS]
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=40)) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference_greedy("llama", p, 40)
    # proposals come from the kept ids only
    if n < VOCAB:
        assert engine.fast.head_rows() == n


def test_reduced_head_proposes_only_kept_ids_and_refreshes_from_served_tokens(tokenizer):
    target = cached_model("llama")
    vocab = _vocab(32)
    engine = SpeculativeEngine(target, tokenizer, copy.deepcopy(target), k=3, draft_vocab=vocab)
    proposed = []
    engine.generate([Request(tokenizer.encode("hello world"), SamplingParams(max_new_tokens=60))],
                    on_record=lambda rec: proposed.append(rec.proposed))
    first = set(torch.cat([p for p in proposed if len(p)]).tolist())
    assert first, "the draft proposed nothing"
    assert vocab.seen > 0 and vocab.coverage is not None
    # every proposal lies in some id set that was in force (the set is refreshed every 16 tokens)
    assert vocab.prior.numel() == VOCAB


def test_served_tokens_move_the_vocabulary():
    vocab = DraftVocab(torch.ones(VOCAB, dtype=torch.long), 4, always=[7], prior_tokens=10, refresh_every=5)
    assert 7 in vocab.ids.tolist() and len(vocab.ids) == 4
    vocab.observe([100, 100, 100, 101, 101, 101, 102, 102, 102, 100])
    ids = vocab.maybe_refresh()
    assert ids is not None and {7, 100, 101, 102} == set(ids.tolist())
    assert vocab.maybe_refresh() is None  # nothing new served


def test_identical_draft_with_reduced_head_accepts_whatever_is_in_the_set(tokenizer):
    """An identical draft accepts a token exactly when the target's argmax is in the kept set."""
    target = cached_model("llama")
    full = SpeculativeEngine(target, tokenizer, copy.deepcopy(target), k=4, draft_vocab=_vocab(VOCAB))
    out = full.generate([Request(tokenizer.encode("hello"), SamplingParams(max_new_tokens=30))])[0]
    assert out.stats.alpha == 1.0


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.02, rel
    x3 = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    qb = Int8Linear(lin.to(torch.bfloat16))
    assert qb(x3).shape == (2, 3, 96) and qb(x3).dtype == torch.bfloat16


def test_swap_refreshes_the_running_copy(tokenizer):
    """After offer_draft + apply_pending_swap, the int8 / reduced copy runs the new weights."""
    target = cached_model("llama")
    draft = copy.deepcopy(cached_draft("llama", "noisy"))
    engine = SpeculativeEngine(target, tokenizer, draft, k=2, draft_vocab=_vocab(100), draft_quant="int8")
    ids = torch.tensor([tokenizer.encode("hello")])
    before = engine.fast.model(ids).logits
    engine.offer_draft({k: v.clone() for k, v in target.state_dict().items()}, version=1)
    assert engine.apply_pending_swap()
    after = engine.fast.model(ids).logits  # [1, L, 100]
    expected = target(ids).logits[..., engine.fast.vocab_ids]
    assert not torch.allclose(before, after)
    assert (after - expected).abs().max() < 0.05 * expected.abs().max()


def test_fast_draft_shares_unchanged_tensors_with_the_master():
    master = copy.deepcopy(cached_model("qwen2"))
    fast = FastDraft(master, torch.arange(0, VOCAB, 2), quant="int8")
    assert fast.model.get_input_embeddings().weight is master.get_input_embeddings().weight
    assert fast.model.get_output_embeddings().weight.shape[0] == VOCAB // 2
    assert master.get_output_embeddings().weight.shape[0] == VOCAB  # the master keeps its full head
    assert FastDraft(master).model is master


def test_reduced_head_sampling_is_lossless(tokenizer):
    """q = 0 outside the kept ids; rejection sampling must still emit p. 6,000 seeded requests,
    k = 2, chi-square at p-value 1e-4 on the first token (false failure probability ~1e-4)."""
    n = 6000
    target = cached_model("llama")
    draft = noisy_copy(target, 0.3, seed=1)
    prompt = tokenizer.encode("hello")
    params = [SamplingParams(temperature=1.0, top_k=8, max_new_tokens=2, seed=s, ignore_eos=True) for s in range(n)]
    p1 = process_logits(full_logits(target, prompt)[-1], params[0])  # [V]
    support = p1.nonzero().flatten()
    # keep half of the target's top-8 support and unrelated ids: q misses mass p has
    kept = torch.cat([support[::2], torch.arange(0, 50)])
    counts_prior = torch.zeros(VOCAB, dtype=torch.long)
    counts_prior[kept] = 1000
    vocab = DraftVocab(counts_prior, len(torch.unique(kept)), refresh_every=10**9)
    engine = SpeculativeEngine(target, tokenizer, draft, k=2, draft_vocab=vocab)
    outs = engine.generate([Request(prompt, sp) for sp in params])
    counts = torch.zeros(VOCAB)
    for o in outs:
        counts[o.token_ids[0]] += 1
    assert_matches(counts, p1, "first token with a reduced draft head")
    assert sum(o.stats.accepted for o in outs) > 0
