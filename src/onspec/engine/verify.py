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

Tree drafts (a model-free proposer's several continuations, `Draft.parents`: node j's parent among
the draft's nodes, -1 the row's last committed token) are verified by walking the tree from the
root (`tree_verify`, `tree_sample`): at the current node take the target's token there (its argmax;
a sampled row's draw from p, a seeded row's Gumbel-max at that output position), descend to the
child that has it, else emit it and stop. Every emitted token is the target's own choice given the
tokens before it, so the walk is lossless as a chain is. Their proposals are deterministic (no q).
Target logits of a tree are at columns [root, node 0, ..., node k-1]: column j + 1 is node j's.
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
    """k, the number of draft tokens offered (a tree's: its nodes)."""
    path: tuple[int, ...] | None = None
    """A tree draft's accepted nodes, root first (num_accepted of them); None: a chain, whose
    accepted tokens are its first num_accepted."""

    @property
    def rejected(self) -> bool:
        return self.num_accepted < self.proposed

    @property
    def evaluated(self) -> int:
        """Proposed positions actually tested: up to and including the first rejection (a tree:
        its accepted path, and one more unless every node was accepted)."""
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


def tree_verify(draft_tokens: torch.Tensor, parents: list[int], target_logits: torch.Tensor) -> Verdict:
    """Walk a tree draft from the root: while a child of the current node is the target's argmax
    there, accept it and descend; then append the target's argmax at the last node. A chain
    (parents j - 1) gives greedy_verify's verdict. With target_logits log p + G (a seeded row's
    Gumbel noise at each column's output position) this is the tree's gumbel_verify.

    draft_tokens: [k]; parents: [k] (-1: the root, the last committed token; a parent comes before
    its children); target_logits: [k+1, vocab], column j + 1 at node j.
    """
    return _walk(draft_tokens, parents, target_logits.argmax(-1).tolist())


def tree_sample(draft_tokens: torch.Tensor, parents: list[int], target_probs: torch.Tensor,
                generator: torch.Generator | None = None) -> Verdict:
    """Walk a tree draft from the root drawing the target's token at each node from p there: descend
    to the child that has it, else emit it and stop. Each emitted token is an exact draw from p given
    the tokens before it (a deterministic proposal is accepted with probability p(x), as
    rejection_sample with a one-hot q does).

    draft_tokens: [k]; parents: [k]; target_probs: [k+1, vocab] (processed, rows summing to 1).
    """
    return _walk(draft_tokens, parents, lambda column: int(torch.multinomial(target_probs[column], 1,
                                                                              generator=generator)))


def _walk(draft_tokens: torch.Tensor, parents: list[int], target) -> Verdict:
    """target: the target's token at each column (a list), or a function column -> token drawn
    only at the columns the walk reaches."""
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for j, (parent, token) in enumerate(zip(parents, draft_tokens.tolist())):
        children.setdefault((parent, token), j)
    pick = target.__getitem__ if isinstance(target, list) else target
    node, path, tokens = -1, [], []
    while True:
        token = pick(node + 1)
        tokens.append(token)
        node = children.get((node, token))
        if node is None:
            return Verdict(len(path), tokens, len(parents), tuple(path))
        path.append(node)
