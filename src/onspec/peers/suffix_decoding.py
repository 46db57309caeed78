"""The SuffixDecoding reference as a proposer in onspec's engine (engine/proposer.py): the same
target, verify and controller as onspec's own suffix learner, so the two compare on proposals alone.

Its trees (peers/arctic.py: arctic-inference's C++ suffix tree, built from the sdist) are driven as
its vLLM integration drives them: a request's prompt starts its own tree and a slot in the global
tree, every committed token is added to both, a finished request's tree goes while its output stays
in the global tree (FIFO eviction past `max_cached_requests`). A draft is the better-scoring of the
two trees' continuations; its per-token probabilities are the tree's cumulative estimates, so
`Draft.expected` (E[accepted of the first m]) is their running sum, which the controller prices
against the draft model like any offer.
"""

from __future__ import annotations

import torch

from onspec.engine.proposer import Draft, Step
from onspec.engine.sequence import Sequence
from onspec.peers.arctic import ArcticConfig, ArcticSuffixCache


class ArcticProposer:
    kind = "arctic"

    def __init__(self, config: ArcticConfig | None = None) -> None:
        self.cache = ArcticSuffixCache(config)
        self.steps = self.proposed = self.accepted = 0

    def admit(self, row: Sequence) -> None:
        key = row.request.request_id
        if key in self.cache.active:  # an id served again while the first is running: a fresh key
            key = f"{key}/{id(row)}"
        self.cache.start(key, row.request.prompt_ids)
        row.state[self.kind] = key

    def propose(self, rows: list[Sequence], ks: list[int]) -> list[Draft | None]:
        drafts: list[Draft | None] = []
        for row, k in zip(rows, ks):
            key = row.state.get(self.kind)
            k = min(k, self.cache.config.max_spec_tokens)  # the row's budget, within the reference's own cap
            spec = self.cache.speculate(key, row.tail(self.cache.config.max_tree_depth), k) if k and key else None
            if spec is None or not spec.token_ids:
                drafts.append(None)
                continue
            n = min(k, len(spec.token_ids))
            expected = [0.0]
            for p in spec.probs[:n]:
                expected.append(expected[-1] + p)
            drafts.append(Draft(torch.tensor(spec.token_ids[:n], dtype=torch.long), self,
                                match=[spec.match_len] * n, expected=expected))
        return drafts

    def observe(self, step: Step) -> None:
        for r, row in enumerate(step.rows):
            key = row.state.get(self.kind)
            if key is not None and step.committed[r]:
                self.cache.add(key, step.committed[r])
            draft = step.drafts[r]
            if draft is not None and draft.by is self:
                self.steps += 1
                self.proposed += len(draft)
                self.accepted += step.verdicts[r].num_accepted

    def release(self, row: Sequence) -> None:
        key = row.state.pop(self.kind, None)
        if key is not None:
            self.cache.stop(key)

    def stats(self) -> dict:
        return {"steps": self.steps, "proposed": self.proposed, "accepted": self.accepted,
                "cached_requests": len(self.cache.cached), "memory_bytes": self.cache.memory_bytes()}
