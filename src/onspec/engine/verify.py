"""Verification: pure functions of tensors, no model inside.

Vocabulary (vLLM's rejection sampler): the draft q proposes k tokens; each is *accepted* or not;
at the first rejection a *recovered* token is sampled from norm(max(0, p - q)) and the step
stops; if all k are accepted, a *bonus* token is sampled from p at position k+1.
Either way a step emits num_accepted + 1 tokens.

Shapes: draft_tokens [k]; draft_probs q [k, vocab]; target_probs p [k+1, vocab].
Functions work on one row; the engine loops rows so each request keeps its own RNG stream
(same seed -> same output, whoever shares the batch).

Two lossless samplers:
- `rejection_sample` accepts x with probability min(1, p/q): the most acceptance any verifier
  can get (1 - TV(p, q)), but which tokens come out depends on what the draft proposed.
- `gumbel_verify` for seeded requests: position t of the output is argmax(log p_t + G_t) with
  Gumbel noise G_t fixed by (seed, t), and the draft proposes argmax(log q_t + G_t) with the same
  noise. The output is then a function of the seed and the target alone: the same seed gives the
  same text whatever the draft, its version after an online update, or the k chosen per step
  (Daliri et al. 2024, "drafter-invariant" speculative decoding). The price is acceptance:
  P(the two argmaxes agree) >= (1 - TV) / (1 + TV) instead of 1 - TV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    num_accepted: int
    """How many of the k proposed tokens were accepted (0..k)."""
    tokens: list[int]
    """The emitted tokens: the accepted prefix, then the recovered or bonus token."""

    proposed: int
    """k, the number of draft tokens offered."""

    @property
    def rejected(self) -> bool:
        return self.num_accepted < self.proposed

    @property
    def evaluated(self) -> int:
        """Proposed positions actually tested: up to and including the first rejection."""
        return self.num_accepted + int(self.rejected)


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Accept while the draft token equals the target's argmax, then append the target's argmax.

    draft_tokens: [k]; target_logits: [k+1, vocab] (raw logits or probabilities).
    """
    k = draft_tokens.shape[0]
    target_argmax = target_logits.argmax(-1)  # [k+1]
    matches = (draft_tokens == target_argmax[:k]).long()
    num_accepted = int(matches.cumprod(0).sum()) if k else 0
    tokens = draft_tokens[:num_accepted].tolist() + [int(target_argmax[num_accepted])]
    return Verdict(num_accepted, tokens, k)


def rejection_sample(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the emitted tokens are
    distributed exactly as sampling from target_probs one token at a time.

    draft_tokens: [k]; draft_probs: [k, vocab]; target_probs: [k+1, vocab] (already processed by
    the same temperature/top-k/top-p, rows summing to 1).
    """
    k = draft_tokens.shape[0]
    if k:
        idx = draft_tokens.unsqueeze(-1)
        p_x = target_probs[:k].gather(-1, idx).squeeze(-1)  # [k]
        q_x = draft_probs.gather(-1, idx).squeeze(-1)  # [k]
        u = torch.rand(k, generator=generator, device=target_probs.device)
        # accept x_i with probability min(1, p/q); u < p/q  <=>  u*q < p (q_x > 0: x was drawn from q)
        accepted = (u * q_x < p_x).long()
        num_accepted = int(accepted.cumprod(0).sum())
    else:
        num_accepted = 0
    if num_accepted < k:
        residual = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_min(0)
        total = residual.sum()
        # residual is all-zero only if p == q there, in which case rejection has probability 0;
        # guard against float round-off anyway by falling back to p.
        dist = residual / total if total > 0 else target_probs[num_accepted]
    else:
        dist = target_probs[k]
    last = int(torch.multinomial(dist, 1, generator=generator))
    return Verdict(num_accepted, draft_tokens[:num_accepted].tolist() + [last], k)


def gumbel_verify(draft_tokens: torch.Tensor, target_probs: torch.Tensor, gumbels: torch.Tensor) -> Verdict:
    """Seeded speculative sampling: accept while the draft token equals the target's Gumbel-max
    sample argmax(log p + G) at that position, then emit the target's sample there.
    Each emitted token is distributed as target_probs (Gumbel-max trick) and does not depend on
    the proposals.

    draft_tokens: [k]; target_probs: [k+1, vocab] (processed, rows summing to 1);
    gumbels: [k+1, vocab] standard Gumbel noise of these output positions.
    """
    return greedy_verify(draft_tokens, target_probs.log() + gumbels)
