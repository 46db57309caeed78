"""What proposes tokens for the target to verify: one interface, one file per proposer.

A proposer offers, for rows of the running batch, a `Draft` each: up to k tokens, with the draft's
probabilities q where the row samples (None: the tokens are deterministic and q is one-hot on
them), and where they came from. The engine's step is the same whoever proposed:
propose -> stack -> score -> verify -> observe. `verify` (engine/verify.py) knows no proposer.

- `Drafter` (engine/drafter.py): a draft model, for the rows it serves (a pool holds several),
  with its own KV cache; it runs a model pass per proposed token, so its k is chosen by its policy.
- `SuffixLearner` (engine/suffix.py): model-free; it continues the row's text from what the
  request and the stream have shown, at no model pass.
A model-free proposer's draft is an offer: the controller (engine/controller.py) takes it, cut to
the length that pays, when it beats the row's draft model, from the `expected` acceptance the offer
carries and the draft's live costs; an offer not taken is still observed, against what the step
emitted instead. A new proposer is a file with a class of this shape and one line in
`engine.PROPOSERS` (the names `--proposers` takes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from onspec.engine.sequence import Sequence
    from onspec.engine.verify import Verdict


@dataclass
class Draft:
    """One row's proposal for one verify step."""

    tokens: torch.Tensor  # [k] token ids
    by: "Proposer"
    q: torch.Tensor | None = None
    """[k, vocab] the draft's processed probabilities where the row samples; None: the tokens are
    deterministic (q is one-hot on them), or the row is greedy."""
    logits: torch.Tensor | None = None
    """[k, draft vocab] raw draft-model logits (for StepRecords only)."""
    match: list[int] | None = None
    """A model-free proposer's: per token, the length of the context it matched."""
    expected: list[float] | None = None
    """A model-free proposer's: E[accepted tokens] if the first m are verified, m = 0..k. A tree's
    is the sum of its first m nodes' probabilities of being accepted (a node is accepted iff it and
    its ancestors are); its nodes come in decreasing order of that probability, so its first m
    nodes are the best m-node subtree."""
    parents: list[int] | None = None
    """A tree (model-free proposers only, deterministic tokens): per token, the index of its parent
    among these tokens, -1 for the row's last committed token; a parent comes before its children.
    None: a chain (token j follows token j - 1)."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def cut(self, m: int) -> "Draft":
        """The first m tokens (a tree's first m nodes: a subtree)."""
        return Draft(self.tokens[:m], self.by, None if self.q is None else self.q[:m],
                     None if self.logits is None else self.logits[:m],
                     None if self.match is None else self.match[:m],
                     None if self.expected is None else self.expected[: m + 1],
                     None if self.parents is None else self.parents[:m])

    def depths(self) -> list[int]:
        """Per token, how many tokens after the row's last committed one it stands (1 = the next)."""
        if self.parents is None:
            return list(range(1, len(self) + 1))
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 + (depths[parent] if parent >= 0 else 0))
        return depths

    def chain(self) -> "Draft":
        """A tree's main line: from the root, each node's first child (its most likely one); a
        chain is its own."""
        if self.parents is None:
            return self
        line, node = [], -1
        for j, parent in enumerate(self.parents):
            if parent == node:
                line.append(j)
                node = j
        pick = lambda xs: None if xs is None else [xs[j] for j in line]
        expected = None if self.expected is None else [0.0] + list(itertools.accumulate(
            self.expected[j + 1] - self.expected[j] for j in line))
        return Draft(self.tokens[line], self.by, match=pick(self.match), expected=expected)


@dataclass
class Step:
    """One verify step, as the proposers learn from it (`Proposer.observe`); lists are per row."""

    rows: list["Sequence"]
    drafts: list[Draft | None]
    """What was verified for each row (None: nothing)."""
    verdicts: list["Verdict"]
    committed: list[list[int]]
    """The tokens each row kept (after stop strings and limits)."""
    declined: list[list[Draft]] = field(default_factory=list)
    """Per row, the model-free offers the controller did not take (judged against what was emitted)."""
    target_seconds: float = 0.0
    """The target's pass over every row."""
    seconds: float = 0.0
    """The whole step by the engine's clock."""
    width: int = 0
    """Proposals per row in the target's pass (its positions are width + 1)."""


class Proposer(Protocol):
    kind: str
    """What it is, in outputs and metrics: 'draft' (a draft model), 'suffix', ..."""

    def admit(self, row: "Sequence") -> None:
        """A request joins (its prompt is known): per-row state goes in `row.state[self.kind]`."""

    def propose(self, rows: list["Sequence"], ks: list[int]) -> list[Draft | None]:
        """Up to ks[r] tokens for each row (0: none for that row)."""

    def observe(self, step: Step) -> None:
        """What the target accepted of every row's draft, its own and the others'."""

    def release(self, row: "Sequence") -> None:
        """A request left the batch (finished, aborted or failed)."""

    def stats(self) -> dict:
        """Its own counters, for /metrics and reports."""


def sync(device: torch.device) -> None:
    """Wait for the device, so the clock times what ran (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
