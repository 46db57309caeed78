"""The feature head (online/feature_head.py): its attention is causal and cached consistently, its
chain is what its steps compute, its losses are zero where they should be, and its training
gradients from features gathered pass by pass (as serving would) equal those from one full forward."""

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from onspec.online.feature_head import FeatureHead, HeadShape, head_loss, training_pairs


def _target(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).double().eval()


def _head(target, ids=None) -> FeatureHead:
    torch.manual_seed(1)
    return FeatureHead(HeadShape.of(target.config, 48), target.lm_head.weight, target.model.embed_tokens.weight,
                       ids, dtype=torch.float64)


def test_shape_of_config():
    s = HeadShape.of(_target().config, 48)
    assert (s.hidden, s.heads, s.kv_heads, s.intermediate) == (64, 4, 2, 48)


def test_parallel_steps_equal_cached_steps():
    target = _target()
    head = _head(target)
    f = torch.randn(1, 9, 64, dtype=torch.float64)
    tokens = torch.randint(0, 97, (1, 9))
    pos = torch.arange(1, 10)[None]
    whole, _ = head.step(f, tokens, pos)
    past, parts = None, []
    for lo, hi in ((0, 4), (4, 5), (5, 9)):  # a prefill, one position, a verify-width pass
        g, past = head.step(f[:, lo:hi], tokens[:, lo:hi], pos[:, lo:hi], past)
        parts.append(g)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-12)
    assert past[0].shape[2] == 9


def test_propose_is_the_chain_of_its_steps():
    target = _target()
    head = _head(target, torch.tensor([0, 3, 5, 7, 11, 13, 50, 96]))
    f = torch.randn(1, 5, 64, dtype=torch.float64)
    tokens = torch.randint(0, 97, (1, 5))
    pos = torch.arange(1, 6)[None]
    out, probs = head.propose(f, tokens, pos, k=3)
    assert out.shape == (1, 3) and bool((probs > 0).all()) and bool((probs <= 1).all())
    assert set(out.flatten().tolist()) <= {0, 3, 5, 7, 11, 13, 50, 96}
    g, past = head.step(f, tokens, pos)
    g = g[:, -1:]
    expected = []
    for i in range(3):
        tok = head.vocab_ids[head.logits(g).argmax(-1)]
        expected.append(int(tok))
        g, past = head.step(g, tok, torch.tensor([[6 + i]]), past)
    assert out[0].tolist() == expected


def test_losses_vanish_where_they_should():
    target = _target()
    head = _head(target)
    g = torch.randn(6, 64, dtype=torch.float64)
    labels = head.logits(g).argmax(-1)
    loss, parts = head_loss(head, g, g.clone(), torch.full((6,), -100), feature_weight=1.0)
    assert float(loss) == 0.0 and parts["feature"] == 0.0
    sharp = g * 1e6  # the head's argmax with all its mass: cross-entropy ~0
    loss, parts = head_loss(head, sharp, sharp.clone(), labels)
    assert parts["ce"] < 1e-6 and parts["feature"] == 0.0


def test_training_pairs_align_positions():
    T, H = 7, 4
    f = torch.arange(T * H, dtype=torch.float32).view(T, H)
    greedy = torch.arange(10, 10 + T)
    tokens = torch.arange(20, 20 + T)
    index_of = torch.full((100,), -1)
    index_of[torch.tensor([11, 12, 14])] = torch.tensor([0, 1, 2])
    p = training_pairs(f, greedy, tokens, index_of)
    assert torch.equal(p["features"], f[:5]) and torch.equal(p["next_features"], f[1:6])
    assert p["tokens"].tolist() == [21, 22, 23, 24, 25] and p["positions"].tolist() == [1, 2, 3, 4, 5]
    # example t's label is the target's greedy choice at position t + 1 (for token t + 2)
    assert p["labels"].tolist() == [0, 1, -100, 2, -100]


def test_gradients_from_served_features_equal_a_full_forward():
    """Features gathered pass by pass from the target's KV cache (a prefill, then verify-width
    passes, as serving produces them) train the head to the same gradients as features from one
    forward over the whole sequence."""
    target = _target()
    seq = torch.randint(0, 97, (1, 14))
    with torch.no_grad():
        full = target.model(input_ids=seq).last_hidden_state[0]
        cache, parts = DynamicCache(), []
        for lo, hi in ((0, 6), (6, 9), (9, 10), (10, 14)):
            out = target.model(input_ids=seq[:, lo:hi], past_key_values=cache, use_cache=True,
                                position_ids=torch.arange(lo, hi)[None])
            parts.append(out.last_hidden_state[0])
        served = torch.cat(parts)
        greedy = target.lm_head(full).argmax(-1)
    index_of = torch.arange(97)

    def grads(features):
        head = _head(target)
        p = training_pairs(features, greedy, seq[0], index_of)
        g, _ = head.step(p["features"][None], p["tokens"][None], p["positions"][None])
        loss, _ = head_loss(head, g[0], p["next_features"], p["labels"])
        loss.backward()
        return {n: q.grad for n, q in head.named_parameters()}

    a, b = grads(full), grads(served)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12)
