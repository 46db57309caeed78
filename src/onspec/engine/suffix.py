"""The suffix learner: a model-free speculator that learns from every served output at once.

SuffixDecoding (Oliaro et al., NeurIPS 2025) in its simplest form. Two indexes of next-token
counts after every context of 1..`max_depth` tokens:
- the request's own (its prompt and its output so far), built when it is admitted and extended
  with every committed token;
- the stream's (`SuffixLearner.history`): the outputs of earlier requests (each with the tail of
  its prompt as leading context), added when a request finishes. This is the part that learns:
  the longer a server runs, the more of its traffic repeats something it has already served.
A proposal follows the deepest context that either index has seen (at least `min_match` tokens),
takes its most frequent next token, and goes on from the extended context, up to `max_tokens`
tokens. It costs dictionary look-ups (tens of microseconds), no model pass.

The learner is a proposer (engine/proposer.py). Whether its offer is worth a wider target pass is
not decided here: each proposed token carries the depth of the context it matched (`Draft.match`)
and the offer its expected accepted length (`Draft.expected`) from the live acceptance of tokens
proposed at each depth (`acceptance(depth)`), which the controller (engine/controller.py) prices
against the draft model. That acceptance is measured on every step the learner had an offer for:
verified when it was taken, read against the emitted tokens when the draft proposed
(`observe_shadow`). Proposals are deterministic (q is one-hot), so verification stays lossless for
greedy, sampled and seeded rows alike.
"""

from __future__ import annotations

import threading
from collections import deque

import torch

from onspec.engine.proposer import Draft, Step
from onspec.engine.sequence import Sequence


class SuffixIndex:
    """Next-token counts after every context of 1..max_depth tokens of the sequences added."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}

    def add(self, tokens: list[int], start: int = 0, sign: int = 1) -> None:
        """Count tokens[i] after each of its contexts, for every i >= start (earlier tokens are
        context only). sign -1 removes a sequence added before."""
        counts, depth = self.counts, self.max_depth
        for i in range(max(start, 1), len(tokens)):
            nxt = tokens[i]
            for n in range(1, min(depth, i) + 1):
                key = tuple(tokens[i - n: i])
                row = counts.get(key)
                if row is None:
                    if sign < 0:
                        continue
                    row = counts[key] = {}
                c = row.get(nxt, 0) + sign
                if c > 0:
                    row[nxt] = c
                else:
                    row.pop(nxt, None)
                    if not row:
                        del counts[key]

    def __len__(self) -> int:
        return len(self.counts)


class SuffixLearner:
    """The stream's index, the live acceptance per matched depth, and proposals for a row."""

    kind = "suffix"

    def __init__(self, max_depth: int = 8, min_match: int = 2, max_tokens: int = 16, history: int = 4096,
                 prompt_context: int = 8, prior: float = 0.5, decay: float = 0.995) -> None:
        if not 1 <= min_match <= max_depth:
            raise ValueError(f"suffix min_match must be in [1, max_depth={max_depth}], got {min_match}")
        self.max_depth, self.min_match, self.max_tokens = max_depth, min_match, max_tokens
        self.history_size, self.prompt_context = history, prompt_context
        self.index = SuffixIndex(max_depth)
        self.history: deque[tuple[list[int], int]] = deque()
        """(tokens, start) of each earlier output in the index, oldest first: what a checkpoint keeps."""
        self.version = 0
        """Outputs learned so far (the learner's version: it changes with every finished request)."""
        self.frozen = False
        """True: proposes from what it has learned, learns nothing more (`serve --no-online`)."""
        self._lock = threading.Lock()
        # decayed accepted / evaluated counts per matched depth, from a prior of 4 pseudo-observations
        self._accepted = {d: prior * 4.0 for d in range(1, max_depth + 1)}
        self._evaluated = {d: 4.0 for d in range(1, max_depth + 1)}
        self.decay = decay
        self.steps = self.proposed = self.accepted = self.evaluated = 0
        self.shadow_evaluated = 0
        """Proposed tokens judged against a draft step's output (observe_shadow)."""

    # -- learning ------------------------------------------------------------------------------

    def learn(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """A finished request's output joins the stream's index (the oldest leaves past `history`)."""
        if self.frozen or self.history_size <= 0 or not output_ids:
            return
        head = list(prompt_ids[-self.prompt_context:]) if self.prompt_context else []
        seq = head + list(output_ids)
        with self._lock:
            self.index.add(seq, start=len(head))
            self.history.append((seq, len(head)))
            while len(self.history) > self.history_size:
                old, start = self.history.popleft()
                self.index.add(old, start=start, sign=-1)
            self.version += 1

    def local_index(self, prompt_ids: list[int]) -> SuffixIndex:
        """A request's own index, over its prompt (extend it with `extend` as tokens commit)."""
        index = SuffixIndex(self.max_depth)
        index.add(list(prompt_ids))
        return index

    @staticmethod
    def extend(index: SuffixIndex, context: list[int], new: list[int]) -> None:
        """Add committed tokens `new` that follow `context` (the sequence before them)."""
        if new:
            tail = context[-index.max_depth:]
            index.add(tail + list(new), start=len(tail))

    # -- the proposer --------------------------------------------------------------------------

    def admit(self, row: Sequence) -> None:
        row.state[self.kind] = self.local_index(row.request.prompt_ids)

    def propose(self, rows: list[Sequence], ks: list[int]) -> list[Draft | None]:
        """Each row's continuation (up to ks[r] tokens), as an offer for the controller."""
        drafts: list[Draft | None] = []
        for row, k in zip(rows, ks):
            local = row.state.get(self.kind)
            tokens, depths = (self.continuation(row.tail(self.max_depth), local, k) if k and local is not None
                              else ([], []))
            drafts.append(Draft(torch.tensor(tokens, dtype=torch.long), self, match=depths,
                                expected=self.expected_accepted(depths)) if tokens else None)
        return drafts

    def observe(self, step: Step) -> None:
        """The row's own index takes its committed tokens; the acceptance per depth learns from the
        offers verified and from those declined, against what was emitted instead."""
        for r, row in enumerate(step.rows):
            local, new = row.state.get(self.kind), step.committed[r]
            if local is not None and new:
                seq = row.tail(self.max_depth + len(new))
                local.add(seq, start=len(seq) - len(new))
            draft, verdict = step.drafts[r], step.verdicts[r]
            if draft is not None and draft.by is self:
                self.observe_verified(draft.match, verdict.num_accepted)
            elif row.error is None:
                for offer in step.declined[r] if step.declined else ():
                    if offer.by is self:
                        self.observe_shadow(offer, verdict.tokens)

    def release(self, row: Sequence) -> None:
        """A served output joins the stream's index at once."""
        if row.finish_reason in ("stop", "length"):
            self.learn(row.request.prompt_ids, row.generated)

    # -- proposing -----------------------------------------------------------------------------

    def continuation(self, context: list[int], local: SuffixIndex | None, max_tokens: int
                     ) -> tuple[list[int], list[int]]:
        """Up to max_tokens tokens continuing `context` (the row's prompt + output so far), and per
        token the length of the context it matched."""
        ctx = list(context[-self.max_depth:])
        tokens: list[int] = []
        depths: list[int] = []
        indexes = [i for i in (local, self.index) if i is not None]
        with self._lock:
            while len(tokens) < min(max_tokens, self.max_tokens):
                found = None
                for n in range(min(self.max_depth, len(ctx)), self.min_match - 1, -1):
                    key = tuple(ctx[-n:])
                    rows = [row for i in indexes if (row := i.counts.get(key))]
                    if rows:
                        found = n, rows
                        break
                if found is None:
                    break
                n, rows = found
                merged: dict[int, int] = {}
                for row in rows:
                    for t, c in row.items():
                        merged[t] = merged.get(t, 0) + c
                token = max(merged, key=merged.__getitem__)
                tokens.append(token)
                depths.append(n)
                ctx = (ctx + [token])[-self.max_depth:]
        return tokens, depths

    # -- what proposals are worth --------------------------------------------------------------

    def acceptance(self, depth: int) -> float:
        d = min(depth, self.max_depth)
        return self._accepted[d] / self._evaluated[d]

    def expected_accepted(self, depths: list[int]) -> list[float]:
        """E[accepted tokens] if the first m of a proposal are verified, for m = 0..len(depths)
        (acceptance stops at the first rejection: a running product of per-depth acceptances)."""
        out, survive, total = [0.0], 1.0, 0.0
        for d in depths:
            survive *= self.acceptance(d)
            total += survive
            out.append(total)
        return out

    def observe_verified(self, depths: list[int], num_accepted: int) -> None:
        """A verified proposal of len(depths) tokens of which the first num_accepted were accepted."""
        evaluated = min(len(depths), num_accepted + 1)
        with self._lock:
            self._estimate(depths, num_accepted, evaluated)
            self.steps += 1
            self.proposed += len(depths)
            self.accepted += num_accepted
            self.evaluated += evaluated

    def observe_shadow(self, proposal: Draft, emitted: list[int]) -> None:
        """A proposal that was not verified, read against the tokens the step emitted instead (the
        draft proposed). Proposed token i would have been accepted iff it equals emitted[i], given
        the ones before it matched: exact for greedy rows; for sampled rows emitted[i] is a draw from
        the target, so a match has the probability p(token) that verifying a one-hot proposal accepts
        it with. Past the emitted tokens nothing is known (censored, not counted). Only the per-depth
        estimates learn from it; the learner's own step counts stay those of its verified steps."""
        tokens = proposal.tokens.tolist()
        n = min(len(tokens), len(emitted))
        matched = next((i for i in range(n) if tokens[i] != emitted[i]), n)
        evaluated = matched + 1 if matched < n else matched
        if evaluated:
            with self._lock:
                self._estimate(proposal.match, matched, evaluated)
                self.shadow_evaluated += evaluated

    def _estimate(self, depths: list[int], num_accepted: int, evaluated: int) -> None:
        factor = self.decay ** evaluated  # the estimates forget per evaluated token, not per step
        for d in self._accepted:
            self._accepted[d] *= factor
            self._evaluated[d] *= factor
        for i in range(evaluated):
            d = min(depths[i], self.max_depth)
            self._evaluated[d] += 1.0
            self._accepted[d] += 1.0 if i < num_accepted else 0.0

    # -- checkpoint ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stream's outputs (all that the index is built from) and the acceptance estimates."""
        with self._lock:
            seqs = list(self.history)
            depths = sorted(self._accepted)
            return {
                "tokens": torch.tensor([t for s, _ in seqs for t in s], dtype=torch.int64),
                "lengths": torch.tensor([len(s) for s, _ in seqs], dtype=torch.int64),
                "starts": torch.tensor([start for _, start in seqs], dtype=torch.int64),
                "accepted": torch.tensor([self._accepted[d] for d in depths], dtype=torch.float64),
                "evaluated": torch.tensor([self._evaluated[d] for d in depths], dtype=torch.float64),
                "version": torch.tensor(self.version, dtype=torch.int64),
            }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild exactly the learner that `state_dict` saved."""
        tokens = state["tokens"].tolist()
        with self._lock:
            self.index = SuffixIndex(self.max_depth)
            self.history.clear()
            offset = 0
            for n, start in zip(state["lengths"].tolist(), state["starts"].tolist()):
                seq = tokens[offset: offset + n]
                offset += n
                self.index.add(seq, start=start)
                self.history.append((seq, start))
            if state["accepted"].numel() != self.max_depth:
                raise ValueError(f"a suffix checkpoint for max_depth {state['accepted'].numel()} does not fit "
                                 f"max_depth {self.max_depth}")
            for d, (a, e) in enumerate(zip(state["accepted"].tolist(), state["evaluated"].tolist()), start=1):
                self._accepted[d], self._evaluated[d] = a, e
            self.version = int(state["version"])

    def stats(self) -> dict:
        return {"version": self.version, "history": len(self.history), "contexts": len(self.index),
                "steps": self.steps, "proposed": self.proposed, "accepted": self.accepted,
                "evaluated": self.evaluated, "shadow_evaluated": self.shadow_evaluated,
                "alpha": self.accepted / self.evaluated if self.evaluated else None,
                "acceptance_by_depth": {d: round(self.acceptance(d), 3) for d in sorted(self._accepted)}}
