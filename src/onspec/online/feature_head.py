"""A speculator on the target's own features (EAGLE style): a learner with room to grow.

The pretrained 0.5B draft already agrees with the target on 0.92-0.95 of code positions and has
nothing left to learn from the stream (docs/results.md, section 3). This head starts from nothing
and reads what the target has already computed: at position t, the target's final hidden state
f_t (after its final norm, the vector its LM head reads) and the embedding of the token t+1 the
target chose there. One decoder layer of the target's width turns them into a guess of f_{t+1};
the target's own LM head (frozen, shared, optionally restricted to the draft vocabulary's ids)
reads that guess as the distribution of token t+2:

    x = fc([norm(e(x_{t+1})); f_t])            # [.., 2H] -> [.., H]
    g = layer(x)                                # one decoder layer with its own KV cache
    p(x_{t+2}) = softmax(lm_head(g))            # g ~ f_{t+1}

Proposing k tokens chains it (EAGLE-1): the next step reads g in place of the target's f_{t+1},
which is what the feature loss teaches. The inputs of a training example come free with every
verify pass (the features of the positions the target just scored), so training needs no extra
target forward. EAGLE-3's refinements (low/mid/high features fused, training-time test over the
chain) are not here: this is the smallest head that can be measured for cost and learning speed
(experiments/feature_head.py).

Losses (`head_loss`): cross-entropy against the target's greedy token at t+2 (what greedy
acceptance counts), plus `feature_weight` x smooth-L1 between g and f_{t+1} (what makes the chain
work), both over the positions given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onspec.models.decode import _rotate_half


@dataclass
class HeadShape:
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @classmethod
    def of(cls, config, intermediate: int | None = None) -> "HeadShape":
        """The target's width, heads and rotary base; the MLP's width `intermediate` (default the
        target's)."""
        return cls(hidden=config.hidden_size, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   intermediate=intermediate or config.intermediate_size,
                   rope_theta=float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                   eps=float(getattr(config, "rms_norm_eps", 1e-6)))


def _rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv  # [B, L, head_dim / 2]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class FeatureHead(nn.Module):
    """fc + one pre-norm decoder layer (GQA attention with rotary positions, SwiGLU MLP) + the
    target's LM head rows `vocab_ids` (a frozen buffer, not a parameter)."""

    def __init__(self, shape: HeadShape, head_weight: torch.Tensor, embed_weight: torch.Tensor,
                 vocab_ids: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        h, self.shape = shape.hidden, shape
        self.head_dim = h // shape.heads
        kv = shape.kv_heads * self.head_dim
        self.embed_norm = nn.RMSNorm(h, eps=shape.eps, dtype=dtype)
        self.fc = nn.Linear(2 * h, h, bias=False, dtype=dtype)
        self.input_norm = nn.RMSNorm(h, eps=shape.eps, dtype=dtype)
        self.q_proj = nn.Linear(h, h, bias=True, dtype=dtype)
        self.k_proj = nn.Linear(h, kv, bias=True, dtype=dtype)
        self.v_proj = nn.Linear(h, kv, bias=True, dtype=dtype)
        self.o_proj = nn.Linear(h, h, bias=False, dtype=dtype)
        self.post_norm = nn.RMSNorm(h, eps=shape.eps, dtype=dtype)
        self.gate_proj = nn.Linear(h, shape.intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(h, shape.intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(shape.intermediate, h, bias=False, dtype=dtype)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        ids = torch.arange(head_weight.shape[0]) if vocab_ids is None else vocab_ids.long()
        self.register_buffer("vocab_ids", ids, persistent=True)
        self.register_buffer("lm_head", head_weight.detach()[ids].to(dtype).clone(), persistent=False)
        self.register_buffer("embed", embed_weight.detach(), persistent=False)

    def step(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             past: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """features: [B, L, H] (f_t, or the previous step's output), tokens: [B, L] (x_{t+1}),
        positions: [B, L] (t + 1, the position of x_{t+1}); past: keys and values of earlier
        positions, [B, kv_heads, S, head_dim] each. Returns g: [B, L, H] and the keys and values
        of past + these positions. The L new positions attend causally among themselves."""
        b, n, _ = features.shape
        dtype = self.input_norm.weight.dtype
        e = self.embed_norm(self.embed[tokens].to(dtype))
        x = self.fc(torch.cat((e, features.to(dtype)), dim=-1))
        y = self.input_norm(x)
        q = self.q_proj(y).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(y).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(y).view(b, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = _rotary(positions, self.head_dim, self.shape.rope_theta)
        cos, sin = cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        s = k.shape[2]
        mask = None
        if n > 1:  # new position i sees all of past and new positions <= i
            mask = torch.ones(n, s, dtype=torch.bool).tril(s - n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + self.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        y = self.post_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, (k, v)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """g: [.., H] -> [.., len(vocab_ids)] over the head's ids (index into vocab_ids)."""
        return g @ self.lm_head.T

    @torch.no_grad()
    def propose(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, k: int,
                past=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy chain of k tokens after each row's last position. features, tokens, positions as
        in `step` (every position the target has scored since `past`); returns token ids [B, k]
        (target ids) and their probabilities under the head [B, k]."""
        g, past = self.step(features, tokens, positions, past)
        g = g[:, -1:]
        pos = positions[:, -1:]
        out, probs = [], []
        for i in range(k):
            p = torch.softmax(self.logits(g).float(), dim=-1)
            conf, idx = p.max(dim=-1)  # [B, 1]
            tok = self.vocab_ids[idx]
            out.append(tok)
            probs.append(conf)
            if i + 1 < k:
                pos = pos + 1
                g, past = self.step(g, tok, pos, past)
        return torch.cat(out, dim=1), torch.cat(probs, dim=1)


def head_loss(head: FeatureHead, g: torch.Tensor, next_features: torch.Tensor, labels: torch.Tensor,
              feature_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """g: [N, H] the head's outputs; next_features: [N, H] the target's f_{t+1}; labels: [N] the
    target's greedy token at t+2 as an index into head.vocab_ids, -100 where it is outside them
    (those positions count for the feature loss only)."""
    ce = F.cross_entropy(head.logits(g).float(), labels, ignore_index=-100)
    if bool((labels == -100).all()):
        ce = g.sum() * 0.0
    fl = F.smooth_l1_loss(g.float(), next_features.float())
    return ce + feature_weight * fl, {"ce": float(ce.detach()), "feature": float(fl.detach())}


def training_pairs(features: torch.Tensor, greedy: torch.Tensor, tokens: torch.Tensor, index_of: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """One sequence's examples. features: [T, H] the target's f_t; greedy: [T] the target's argmax at
    each position (its choice for token t+1); tokens: [T]; index_of: [vocab] a target id's index in
    the head's ids, -1 outside. Example t (0 <= t <= T-3): inputs f_t and x_{t+1} at position t+1;
    targets f_{t+1} and the target's greedy token at t+2."""
    t = features.shape[0] - 2
    labels = index_of[greedy[1: t + 1].long()]
    return {"features": features[:t], "tokens": tokens[1: t + 1], "positions": torch.arange(1, t + 1),
            "next_features": features[1: t + 1], "labels": torch.where(labels < 0, -100, labels)}
