"""The suffix learner: a model-free speculator that learns from every served output at once.

SuffixDecoding (Oliaro et al., NeurIPS 2025) in its simplest form. Two indexes of next-token
counts after every context of 1..`max_depth` tokens:
- the request's own (its prompt and its output so far), built when it is admitted and extended
  with every committed token;
- the stream's (`SuffixLearner.history`): the outputs of earlier requests (each with the tail of
  its prompt as leading context), added when a request finishes. This is the part that learns:
  the longer a server runs, the more of its traffic repeats something it has already served.

Two ways of scoring a proposal (`scoring`):
- "frequency" (the default): follow the deepest context that either index has seen (at least `min_match`
  tokens), take its most frequent next token (the two indexes' counts merged), and go on from the
  extended context, up to `max_tokens` tokens;
- "probability", SuffixDecoding's: for each index apart and each context length n it matches,
  follow the most frequent next tokens from those n tokens; a path's probability is the product
  of count / total along it, and it stops where that falls below `min_prob`, or at
  min(max_tokens, spec_factor * n + spec_offset) tokens. Its score is the sum of its tokens'
  probabilities (the expected accepted length under the counts); the best path wins (ties: the
  longer match, then the request's own index). It drafts fewer tokens, more of them accepted.
Either costs dictionary look-ups (tens to hundreds of microseconds), no model pass. The stream's
index is bounded by outputs (`history`) and by tokens (`history_tokens`), the oldest leaving first.

With `tree_width` W > 1 the learner offers a tree (tree speculation, `Draft.parents`): its
proposal as above is the main line, and where the counts read along it (or at the root) saw other
next tokens, up to W - 1 more branches, each the likeliest alternative left (its path's count-ratio
probability, >= `min_prob`) followed by its most frequent next tokens while that probability stays
>= `min_prob` (`_grow`). The target verifies every node in one pass under a tree attention mask.
A node's chance of acceptance is estimated from the live acceptance a(d) of the depth its row
matched: a(d) for the most frequent next token, and the rest, 1 - a(d), shared among the others
by their counts; the nodes come in decreasing order of it (times their ancestors'), so the
controller's cut to m nodes keeps the best m-node subtree. A tree with no branch is the chain.

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

import itertools
import threading
from array import array
from collections import deque

import torch

from onspec.engine.proposer import Draft, Step
from onspec.engine.sequence import Sequence
from onspec.engine.verify import Verdict


SCORINGS = ("frequency", "probability")
_BITS = 32
_MASK = (1 << _BITS) - 1


class SuffixIndex:
    """Next-token counts after every context of 1..max_depth tokens of the sequences added.

    Kept compact: a context is keyed by the hash of its token tuple (deterministic for ints; a
    collision could only make a proposal wrong, which verification rejects), and a context followed
    by one token so far stores it and its count packed in one int (token << 32 | count), by two or
    more a dict token -> count. The form is canonical: removing what was added leaves the index as
    if it had never been added."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.counts: dict[int, int | dict[int, int]] = {}

    @staticmethod
    def key(context) -> int:
        return hash(tuple(context))

    def add(self, tokens, start: int = 0, sign: int = 1) -> None:
        """Count tokens[i] after each of its contexts, for every i >= start (earlier tokens are
        context only). sign -1 removes a sequence added before."""
        counts, depth = self.counts, self.max_depth
        tokens = tokens if type(tokens) is list else list(tokens)
        for i in range(max(start, 1), len(tokens)):
            nxt = tokens[i]
            for n in range(1, min(depth, i) + 1):
                key = hash(tuple(tokens[i - n: i]))
                row = counts.get(key)
                if row is None:
                    if sign > 0:
                        counts[key] = nxt << _BITS | 1
                elif type(row) is int:
                    if row >> _BITS == nxt:
                        if (row & _MASK) + sign > 0:
                            counts[key] = row + sign
                        else:
                            del counts[key]
                    elif sign > 0:
                        counts[key] = {row >> _BITS: row & _MASK, nxt: 1}
                else:
                    c = row.get(nxt, 0) + sign
                    if c > 0:
                        row[nxt] = c
                    elif nxt in row:
                        del row[nxt]
                        if len(row) == 1:
                            ((t, c),) = row.items()
                            counts[key] = t << _BITS | c

    def row(self, context) -> dict[int, int]:
        """The counts of the tokens seen after `context` ({} if none)."""
        return self.unpack(self.counts.get(hash(tuple(context))))

    @staticmethod
    def unpack(row: int | dict[int, int] | None) -> dict[int, int]:
        """A stored row as a new dict token -> count."""
        if row is None:
            return {}
        return {row >> _BITS: row & _MASK} if type(row) is int else dict(row)

    def top(self, context) -> tuple[int, int, int] | None:
        """The most frequent token after `context` (the first seen among equals), its count and the
        count of all tokens after it; None if `context` was never followed by a token."""
        row = self.counts.get(hash(tuple(context)))
        if row is None:
            return None
        if type(row) is int:
            return row >> _BITS, row & _MASK, row & _MASK
        token = max(row, key=row.__getitem__)
        return token, row[token], sum(row.values())

    def __len__(self) -> int:
        return len(self.counts)


class SuffixLearner:
    """The stream's index, the live acceptance per matched depth, and proposals for a row."""

    kind = "suffix"

    def __init__(self, max_depth: int = 8, min_match: int | None = None, max_tokens: int = 16, history: int = 4096,
                 history_tokens: int = 1 << 20, prompt_context: int = 8, scoring: str = "frequency",
                 spec_factor: float = 2.0, spec_offset: float = 0.0, min_prob: float = 0.1,
                 prior: float = 0.5, decay: float = 0.995, tree_width: int = 1) -> None:
        if min_match is None:  # the scoring's own: SuffixDecoding matches from one token on
            min_match = 1 if scoring == "probability" else 2
        if not 1 <= min_match <= max_depth:
            raise ValueError(f"suffix min_match must be in [1, max_depth={max_depth}], got {min_match}")
        if scoring not in SCORINGS:
            raise ValueError(f"suffix scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        if spec_factor < 0 or not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"suffix spec_factor must be >= 0 and min_prob in [0, 1], got {spec_factor}, {min_prob}")
        if tree_width < 1:
            raise ValueError(f"suffix tree_width must be >= 1, got {tree_width}")
        if history < 0 or history_tokens < 0:
            raise ValueError(f"suffix history and history_tokens must be >= 0, got {history}, {history_tokens}")
        self.max_depth, self.min_match, self.max_tokens = max_depth, min_match, max_tokens
        self.scoring, self.spec_factor, self.spec_offset, self.min_prob = scoring, spec_factor, spec_offset, min_prob
        self.history_size, self.history_tokens, self.prompt_context = history, history_tokens, prompt_context
        self.tree_width = tree_width
        """Most continuations offered at once (1: a chain, > 1: a tree, `tree`)."""
        self.index = SuffixIndex(max_depth)
        self.history: deque[tuple[array, int]] = deque()
        """(tokens, start) of each earlier output in the index, oldest first: what a checkpoint keeps."""
        self.tokens = 0
        """Tokens in `history` (outputs and their leading prompt context)."""
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
        """A finished request's output joins the stream's index; the oldest leave past `history`
        outputs or `history_tokens` tokens (an output longer than that joins cut to its last ones)."""
        if self.frozen or self.history_size <= 0 or self.history_tokens <= 0 or not output_ids:
            return
        head = list(prompt_ids[-self.prompt_context:]) if self.prompt_context else []
        seq = array("i", head + list(output_ids))
        start = len(head)
        if len(seq) > self.history_tokens:
            cut = len(seq) - self.history_tokens
            seq, start = seq[cut:], max(start - cut, 0)
        with self._lock:
            self._append(seq, start)
            self.version += 1

    def _append(self, seq: array, start: int) -> None:
        """Index an output, then evict the oldest past either bound (the caller holds the lock)."""
        self.index.add(seq, start=start)
        self.history.append((seq, start))
        self.tokens += len(seq)
        while len(self.history) > self.history_size or self.tokens > self.history_tokens:
            old, old_start = self.history.popleft()
            self.index.add(old, start=old_start, sign=-1)
            self.tokens -= len(old)

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
            if self.tree_width > 1:
                drafts.append(self.tree(row.tail(self.max_depth), local, k) if k and local is not None else None)
                continue
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
            if draft is not None and draft.by is self and draft.parents is not None:
                self.observe_tree(draft, verdict)
            elif draft is not None and draft.by is self:
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
        token the length of the context it was proposed from."""
        ctx = list(context[-self.max_depth:])
        budget = min(max_tokens, self.max_tokens)
        with self._lock:
            if self.scoring == "probability":
                return self._probable(ctx, local, budget)
            return self._frequent(ctx, local, budget)

    def _frequent(self, ctx: list[int], local: SuffixIndex | None, budget: int) -> tuple[list[int], list[int]]:
        """The deepest context either index has seen, its most frequent next token (counts merged),
        again from the extended context."""
        tokens: list[int] = []
        depths: list[int] = []
        indexes = [i.counts for i in (local, self.index) if i is not None]
        while len(tokens) < budget:
            found = self._merged(ctx, indexes)
            if found is None:
                break
            merged, n = found
            token = max(merged, key=merged.__getitem__)
            tokens.append(token)
            depths.append(n)
            ctx = (ctx + [token])[-self.max_depth:]
        return tokens, depths

    def _merged(self, ctx: list[int], indexes: list[dict]) -> tuple[dict[int, int], int] | None:
        """The counts after the deepest context (>= min_match tokens) of `ctx` that an index has
        seen, the indexes' counts merged, and its length; None if none was seen."""
        for n in range(min(self.max_depth, len(ctx)), self.min_match - 1, -1):
            key = SuffixIndex.key(ctx[-n:])
            rows = [row for counts in indexes if (row := counts.get(key)) is not None]
            if rows:
                merged = SuffixIndex.unpack(rows[0])
                for row in rows[1:]:
                    for t, c in SuffixIndex.unpack(row).items():
                        merged[t] = merged.get(t, 0) + c
                return merged, n
        return None

    def _probable(self, ctx: list[int], local: SuffixIndex | None, budget: int) -> tuple[list[int], list[int]]:
        """SuffixDecoding's choice: the highest-scoring path over both indexes and every matched
        context length (ties: the longer match, then the request's own index)."""
        best = self._best(ctx, local, budget)
        return best[1], best[2]

    def _best(self, ctx: list[int], local: SuffixIndex | None, budget: int
              ) -> tuple[float, list[int], list[int], SuffixIndex | None, int]:
        """`_probable`'s path (score, tokens, depths), the index it is in and its matched length."""
        best: tuple[float, list[int], list[int], SuffixIndex | None, int] = (0.0, [], [], None, 0)
        for index in (local, self.index):
            if index is None:
                continue
            for n in range(self.min_match, min(self.max_depth, len(ctx)) + 1):
                if index.top(ctx[-n:]) is None:
                    break  # a longer context is never seen where its own suffix was not
                limit = min(budget, int(n * self.spec_factor + self.spec_offset + 1e-6))
                path = self._path(index, ctx[-n:], limit)
                if path[1] and (path[0] > best[0] or (path[0] == best[0] and index is best[3])):
                    best = (*path, index, n)
        return best

    def _path(self, index: SuffixIndex, path: list[int], limit: int) -> tuple[float, list[int], list[int]]:
        """The most frequent next tokens after `path` in one index, while the product of their
        count / total stays >= min_prob, up to `limit`: (sum of those products, tokens, depths)."""
        prob, score = 1.0, 0.0
        tokens: list[int] = []
        depths: list[int] = []
        path = list(path)
        while len(tokens) < limit:
            key = path[-self.max_depth:]
            top = index.top(key)
            if top is None:
                break
            token, count, total = top
            prob *= count / total
            if prob < self.min_prob:
                break
            score += prob
            tokens.append(token)
            depths.append(len(key))
            path.append(token)
        return score, tokens, depths

    # -- trees ---------------------------------------------------------------------------------

    def tree(self, context: list[int], local: SuffixIndex | None, max_tokens: int) -> Draft | None:
        """Up to `tree_width` continuations of `context` as one draft of at most max_tokens nodes
        (see the module docstring); the chain `continuation` proposes where nothing branches; None
        where nothing matches."""
        ctx = list(context[-self.max_depth:])
        budget = min(max_tokens, self.max_tokens)
        with self._lock:
            if self.scoring == "probability":
                _, line, _, index, n = self._best(ctx, local, budget)
                if not line:
                    return None
                start = ctx[-n:]

                def counts(path: list[int]) -> tuple[dict[int, int], int] | None:
                    key = (start + path)[-self.max_depth:]
                    return (row, len(key)) if (row := index.row(key)) else None

                nodes = self._grow(counts, min(budget, int(n * self.spec_factor + self.spec_offset + 1e-6)), True)
            else:
                indexes = [i.counts for i in (local, self.index) if i is not None]
                nodes = self._grow(lambda path: self._merged(ctx + path, indexes), budget, False)
        if not nodes:
            return None
        nodes = sorted(nodes, key=lambda node: -node.chance)[:budget]  # stable: a parent stays before its children
        place = {id(node): j for j, node in enumerate(nodes)}
        parents = [place[id(node.parent)] if node.parent is not None else -1 for node in nodes]
        return Draft(torch.tensor([node.token for node in nodes], dtype=torch.long), self,
                     match=[node.matched for node in nodes],
                     expected=[0.0, *itertools.accumulate(node.chance for node in nodes)],
                     parents=parents if any(p != j - 1 for j, p in enumerate(parents)) else None)

    def _grow(self, counts, limit: int, line_stops: bool) -> list["_Node"]:
        """The tree's nodes in the order grown: the main line (each most frequent next token;
        stopped below `min_prob` where `line_stops`), then up to tree_width - 1 branches, each at
        the likeliest next token not yet taken after a node (path probability >= min_prob) and on
        along its most frequent ones while that stays >= min_prob. counts(path) -> (token -> count,
        matched depth) after the tokens `path`, or None; no node deeper than `limit`."""
        root = _Node(token=-1, parent=None, matched=0, chance=1.0, prob=1.0, depth=0, path=[])
        nodes: list[_Node] = []

        def options(node: _Node) -> tuple[int, int, float] | None:
            """The next token after `node` not yet taken: (token, count, path probability)."""
            if node.row is None:
                found = counts(node.path)
                node.row = ((sorted(found[0].items(), key=lambda tc: tc[1], reverse=True), found[1],
                             sum(found[0].values())) if found else ())
            if not node.row or node.taken >= len(node.row[0]) or node.depth >= limit:
                return None
            token, count = node.row[0][node.taken]
            return token, count, node.prob * (count / node.row[2])  # as `_path` multiplies

        def grow(node: _Node, stops: bool) -> _Node | None:
            """Its next token not yet taken as a new node (None: none, or below min_prob where `stops`)."""
            option = options(node)
            if option is None or stops and option[2] < self.min_prob:
                return None
            token, count, prob = option
            ranked, matched, total = node.row
            a = self.acceptance(matched)
            chance = a if node.taken == 0 else (1.0 - a) * count / (total - ranked[0][1])
            node.taken += 1
            child = _Node(token, None if node is root else node, matched, node.chance * chance, prob, node.depth + 1,
                          node.path + [token])
            nodes.append(child)
            return child

        def follow(node: _Node | None, stops: bool) -> None:
            while node is not None:
                node = grow(node, stops)

        follow(root, line_stops)
        for _ in range(self.tree_width - 1):
            scored = [(option[2], node) for node in [root, *nodes] if (option := options(node)) is not None]
            prob, node = max(scored, key=lambda x: x[0], default=(0.0, None))
            if node is None or prob < self.min_prob:
                break
            follow(grow(node, True), True)
        return nodes

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
        matched, evaluated = self._judge(proposal.chain(), emitted)
        if evaluated:
            with self._lock:
                self._estimate(proposal.chain().match, matched, evaluated)
                self.shadow_evaluated += evaluated

    def observe_tree(self, tree: Draft, verdict: Verdict) -> None:
        """A verified tree draft. The per-depth estimates are of a most frequent next token's
        acceptance: they learn from the tree's main line read against the emitted tokens (as
        `observe_shadow`); the step counts are the tree's (proposed: its nodes, accepted: its path)."""
        line = tree.chain()
        matched, evaluated = self._judge(line, verdict.tokens)
        with self._lock:
            if evaluated:
                self._estimate(line.match, matched, evaluated)
            self.steps += 1
            self.proposed += len(tree)
            self.accepted += verdict.num_accepted
            self.evaluated += verdict.evaluated

    @staticmethod
    def _judge(proposal: Draft, emitted: list[int]) -> tuple[int, int]:
        """A chain proposal against emitted tokens: (tokens it would have had accepted, tokens judged)."""
        tokens = proposal.tokens.tolist()
        n = min(len(tokens), len(emitted))
        matched = next((i for i in range(n) if tokens[i] != emitted[i]), n)
        return matched, matched + 1 if matched < n else matched

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
        """Rebuild exactly the learner that `state_dict` saved (within this learner's bounds: the
        oldest outputs past `history` or `history_tokens` leave, as if learned here)."""
        tokens = state["tokens"].tolist()
        if state["accepted"].numel() != self.max_depth:
            raise ValueError(f"a suffix checkpoint for max_depth {state['accepted'].numel()} does not fit "
                             f"max_depth {self.max_depth}")
        with self._lock:
            self.index = SuffixIndex(self.max_depth)
            self.history.clear()
            self.tokens = 0
            offset = 0
            for n, start in zip(state["lengths"].tolist(), state["starts"].tolist()):
                seq = array("i", tokens[offset: offset + n])
                offset += n
                self._append(seq, start)
            for d, (a, e) in enumerate(zip(state["accepted"].tolist(), state["evaluated"].tolist()), start=1):
                self._accepted[d], self._evaluated[d] = a, e
            self.version = int(state["version"])

    def stats(self) -> dict:
        return {"version": self.version, "history": len(self.history), "history_tokens": self.tokens,
                "contexts": len(self.index),
                "steps": self.steps, "proposed": self.proposed, "accepted": self.accepted,
                "evaluated": self.evaluated, "shadow_evaluated": self.shadow_evaluated,
                "alpha": self.accepted / self.evaluated if self.evaluated else None,
                "acceptance_by_depth": {d: round(self.acceptance(d), 3) for d in sorted(self._accepted)}}


class _Node:
    """A node of a tree being grown (`SuffixLearner._grow`)."""

    __slots__ = ("token", "parent", "matched", "chance", "prob", "depth", "path", "row", "taken")

    def __init__(self, token: int, parent: "_Node | None", matched: int, chance: float, prob: float, depth: int,
                 path: list[int]) -> None:
        self.token, self.parent, self.matched = token, parent, matched
        self.chance = chance
        """Its estimated chance of acceptance (its parent's times its own given the parent)."""
        self.prob = prob
        """Its path's count-ratio probability."""
        self.depth, self.path = depth, path
        self.row: tuple | None = None
        """The next tokens after it by count, the depth they matched and their total count (() where
        none; None: not read yet)."""
        self.taken = 0
        """How many of those are its children so far."""
