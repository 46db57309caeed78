"""SlotKVCache on its own: every row must behave exactly as if its invalid slots (left padding,
rolled-back tokens) did not exist. The reference is always a plain forward pass over the row's
real tokens with no cache, no mask and default positions (`full_logits`)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, cached_model, full_logits

from onspec.engine.kv import SlotKVCache, right_aligned

ATOL = 1e-5
PROMPT = [72, 101, 108, 108, 111, 32, 119]  # 7 tokens
ROWS = [[10, 20, 30, 40, 50, 60, 70], [5], [200, 7, 33, 91]]  # lengths 7, 1, 4


def new_cache(model, batch: int) -> SlotKVCache:
    p = next(model.parameters())
    return SlotKVCache(batch, p.device, p.dtype)


def feed(cache, model, rows: list[list[int]], logits_to_keep: int = 0) -> torch.Tensor:
    """Feed one chunk, each row's tokens right-aligned (left padding = invalid slots)."""
    ids, valid = right_aligned(rows)
    with torch.no_grad():
        return cache.forward(model, ids, valid, logits_to_keep=logits_to_keep)


def assert_close(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= ATOL, f"max abs diff {err}"


@pytest.fixture(params=ARCHS)
def model(request):
    return cached_model(request.param)


def test_chunked_equals_token_by_token(model):
    """(a) A prompt fed in one chunk or one token at a time gives the same logits, and both
    equal the plain forward pass."""
    ref = full_logits(model, PROMPT)
    chunk = new_cache(model, 1)
    out = feed(chunk, model, [PROMPT])
    assert_close(out[0], ref)
    stepwise = new_cache(model, 1)
    for i, t in enumerate(PROMPT):
        last = feed(stepwise, model, [[t]])
        assert_close(last[0, -1], ref[i])
        assert stepwise.lengths.tolist() == [i + 1]
    assert chunk.num_slots == stepwise.num_slots == len(PROMPT)


def test_logits_to_keep(model):
    """logits_to_keep=n returns only the last n columns, unchanged."""
    ref = full_logits(model, PROMPT)
    out = feed(new_cache(model, 1), model, [PROMPT], logits_to_keep=2)
    assert out.shape[1] == 2
    assert_close(out[0], ref[-2:])


def test_rollback_then_continue(model):
    """(b) feed prompt, feed 3 speculative tokens, keep 1: the next token's logits equal those of
    prompt + kept token + next token from scratch, and for batch 1 the rejected slots are
    physically dropped (trim)."""
    extra, nxt = [3, 4, 5], 9
    cache = new_cache(model, 1)
    feed(cache, model, [PROMPT])
    feed(cache, model, [extra])
    assert cache.num_slots == len(PROMPT) + 3
    cache.rollback(torch.tensor([[True, False, False]]))
    assert cache.num_slots == len(PROMPT) + 1
    assert cache.cache.get_seq_length() == len(PROMPT) + 1
    assert cache.lengths.tolist() == [len(PROMPT) + 1]
    out = feed(cache, model, [[nxt]])
    assert_close(out[0, -1], full_logits(model, PROMPT + extra[:1] + [nxt])[-1])


def test_rollback_everything(model):
    """Rejecting all speculative tokens returns the cache to the prompt exactly."""
    cache = new_cache(model, 1)
    feed(cache, model, [PROMPT])
    feed(cache, model, [[1, 2]])
    cache.rollback(torch.tensor([[False, False]]))
    assert cache.num_slots == len(PROMPT)
    out = feed(cache, model, [[8]])
    assert_close(out[0, -1], full_logits(model, PROMPT + [8])[-1])


def test_left_padded_batch_equals_rows_alone(model):
    """(c) Rows of different lengths (7, 1, 4) in one left-padded chunk give, at every real
    token, the logits of that row alone; so does the next decoded token of every row."""
    cache = new_cache(model, len(ROWS))
    out = feed(cache, model, ROWS)
    width = out.shape[1]
    for b, r in enumerate(ROWS):
        assert_close(out[b, width - len(r) :], full_logits(model, r))
    assert cache.lengths.tolist() == [len(r) for r in ROWS]
    assert cache.num_slots == width
    nxt = [[11], [12], [13]]
    out = feed(cache, model, nxt)
    for b, r in enumerate(ROWS):
        assert_close(out[b, -1], full_logits(model, r + nxt[b])[-1])


def test_rows_keep_different_numbers_of_tokens(model):
    """(d) Two speculative rounds where rows keep different numbers of tokens (leaving holes of
    invalid slots in the middle of some rows): each row's next logits match its own tokens alone;
    lengths always equal each row's real token count."""
    cache = new_cache(model, len(ROWS))
    feed(cache, model, ROWS)
    seqs = [list(r) for r in ROWS]

    extras = [[21, 22, 23], [31, 32, 33], [41, 42, 43]]
    feed(cache, model, extras)
    keep = [3, 1, 0]
    cache.rollback(torch.tensor([[j < n for j in range(3)] for n in keep]))
    for s, e, n in zip(seqs, extras, keep):
        s.extend(e[:n])
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    assert cache.num_slots == 7 + 3  # row 0 kept all three: nothing to trim

    # second round: pending token + 2 proposals, keep (0, 2, 1) of the proposals
    pending = [[51], [52], [53]]
    proposals = [[61, 62], [71, 72], [81, 82]]
    out = feed(cache, model, [p + q for p, q in zip(pending, proposals)])
    for b, s in enumerate(seqs):  # the pending token's logits see exactly the row's real tokens
        assert_close(out[b, 0], full_logits(model, s + pending[b])[-1])
    keep = [0, 2, 1]
    cache.rollback(torch.tensor([[True] + [j < n for j in range(2)] for n in keep]))
    for s, p, q, n in zip(seqs, pending, proposals, keep):
        s.extend(p + q[:n])
    assert cache.lengths.tolist() == [len(s) for s in seqs]

    out = feed(cache, model, [[90], [91], [92]])
    for b, s in enumerate(seqs):
        assert_close(out[b, -1], full_logits(model, s + [90 + b])[-1])


def test_batch_trim_when_every_row_rejects(model):
    """Trailing slots that no row uses are dropped; slots some row still uses are kept."""
    cache = new_cache(model, 2)
    feed(cache, model, ROWS[:2])
    base = cache.num_slots
    feed(cache, model, [[1, 2, 3], [4, 5, 6]])
    cache.rollback(torch.tensor([[True, False, False], [False, False, False]]))
    assert cache.num_slots == base + 1  # row 0 still uses the first extra slot
    assert cache.cache.get_seq_length() == base + 1
    feed(cache, model, [[7, 8], [9, 10]])
    cache.rollback(torch.tensor([[False, False], [False, False]]))
    assert cache.num_slots == base + 1
    assert cache.lengths.tolist() == [len(ROWS[0]) + 1, len(ROWS[1])]
    out = feed(cache, model, [[100], [101]])
    assert_close(out[0, -1], full_logits(model, ROWS[0] + [1, 100])[-1])
    assert_close(out[1, -1], full_logits(model, ROWS[1] + [101])[-1])


def test_select_keeps_the_right_rows(model):
    """(e) select(rows) keeps (and reorders) exactly those rows, and trims trailing slots that
    only the dropped rows used."""
    cache = new_cache(model, len(ROWS))
    feed(cache, model, ROWS)
    feed(cache, model, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    cache.rollback(torch.tensor([[False] * 3, [True] * 3, [False] * 3]))  # only row 1 keeps them
    before = cache.num_slots
    cache.select(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    assert cache.num_slots == before - 3  # nobody left uses the 3 trailing slots
    assert cache.lengths.tolist() == [len(ROWS[2]), len(ROWS[0])]
    out = feed(cache, model, [[17], [18]])
    assert_close(out[0, -1], full_logits(model, ROWS[2] + [17])[-1])
    assert_close(out[1, -1], full_logits(model, ROWS[0] + [18])[-1])


def test_positions_count_valid_slots_only(model):
    """(f) lengths (= the next token's position) count valid slots only, never padding or
    rolled-back slots, and a row with no tokens yet starts at position 0."""
    cache = new_cache(model, 2)
    assert cache.num_slots == 0 and cache.lengths.tolist() == [0, 0]
    feed(cache, model, [[1, 2, 3, 4], []])  # row 1: all padding
    assert cache.lengths.tolist() == [4, 0]
    out = feed(cache, model, [[5], [6]])
    assert_close(out[1, -1], full_logits(model, [6])[-1])  # row 1's first token sits at position 0
    assert cache.lengths.tolist() == [5, 1]
    assert torch.equal(cache.lengths, cache.valid.sum(1))
