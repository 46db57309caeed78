"""One model, its KV cache, and the committed tokens it has not seen yet.

The cache is a RaggedKVCache (each row as long as itself) where the engine's own forward runs the
model (models/decode.py), else a SlotKVCache (one padded rectangle) for transformers' forward.

Both roles use it. The target is fed [last committed token, x_1..x_k] and scores k+1 positions;
the draft is fed its pending tokens, then one proposal at a time. After verification,
`accept` keeps the accepted extras in the cache, rolls back the rest, and queues the emitted
tokens the model has not seen as its new pending tokens. The target's proposals may be a tree
(several continuations in one pass, `feed(trees=...)`); then it keeps the accepted path.
"""

from __future__ import annotations

import torch

from onspec.engine.kv import RaggedKVCache, SlotKVCache, right_aligned


class ModelRunner:
    def __init__(self, model, batch_size: int, forward=None) -> None:
        """forward: what runs a pass (models/decode.py's DecodeForward: a ragged cache); None:
        `model` itself (a padded cache)."""
        self.model = model if forward is None else forward
        self.device = next(model.parameters()).device
        self.kv = (SlotKVCache(batch_size, self.device, next(model.parameters()).dtype) if forward is None
                   else RaggedKVCache(batch_size, self.device, model.config.num_hidden_layers))
        self.pending: list[list[int]] = [[] for _ in range(batch_size)]
        self.extras = 0
        """Tokens fed with `feed(extra=...)` since the last `accept` (speculative, may be rolled back)."""

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], start: int = 0, size: int = 0) -> int:
        """Cache all prompt tokens but the last, which then stays pending (its logits start
        decoding). Chunked: cache only tokens [start, start + size) of each row's head (size 0: all
        from `start`), one call per chunk; the last token is pending once the whole head is cached.
        Returns where the next chunk starts (the longest head's length when all are cached)."""
        heads = [p[:-1] for p in prompts]
        width = max(len(h) for h in heads)
        stop = width if size <= 0 else min(width, start + size)
        chunk = [h[start:stop] for h in heads]
        if start == 0 and isinstance(self.kv, RaggedKVCache):
            self.kv.reserve([len(p) + 16 for p in prompts])  # the prompt and a first few tokens
        if any(chunk):
            ids, valid = right_aligned(chunk, self.device)
            self.kv.forward(self.model, ids, valid, logits_to_keep=1)
        if stop >= width:
            self.pending = [[p[-1]] for p in prompts]
        return stop

    @torch.no_grad()
    def feed(self, extra: torch.Tensor | None = None, trees: list[list[int] | None] | None = None) -> torch.Tensor:
        """Feed pending tokens (if any) and `extra` [batch, n] proposals; trees: per row, the
        parents of its n proposals (-1: the last pending token; a tree pass, engine/kv.py) or None
        (a chain).

        Returns logits: [batch, n + 1, vocab] if there were pending tokens (the first column is
        at the last pending token), else [batch, n, vocab].
        """
        n = 0 if extra is None else extra.shape[1]
        width = max(len(p) for p in self.pending)
        if trees is not None:  # the pending tokens are a chain, the proposals hang from the last
            trees = [None if t is None else [*range(-1, len(p) - 1), *(len(p) + j if j >= 0 else len(p) - 1 for j in t)]
                     for p, t in zip(self.pending, trees)]
        parts, valids = [], []
        if width:
            ids, valid = right_aligned(self.pending, self.device)
            parts.append(ids)
            valids.append(valid)
            self.pending = [[] for _ in self.pending]
        if n:
            parts.append(extra.to(self.device))
            valids.append(torch.ones_like(extra, dtype=torch.bool, device=self.device))
            self.extras += n
        ids, valid = torch.cat(parts, 1), torch.cat(valids, 1)
        keep = n + (1 if width else 0)
        return self.kv.forward(self.model, ids, valid, logits_to_keep=keep, trees=trees)

    @torch.no_grad()
    def catch_up(self, keep: int = 2) -> None:
        """Cache every pending token but the last `keep` of each row. In steady state a proposal
        pass starts from 1 or 2 unseen tokens (the recovered token; or the last accepted proposal
        and the bonus token), which cost one memory-bound pass like a single token; after steps
        that did not speculate the draft has a backlog (one token per such step), and caching it in
        its own pass keeps the proposal passes at their steady size, so their measured time is the
        cost of proposing. (keep=1 would add a draft pass after every fully accepted step.)"""
        if max(len(p) for p in self.pending) <= keep:
            return
        backlog = [p[:-keep] for p in self.pending]
        ids, valid = right_aligned(backlog, self.device)
        self.kv.forward(self.model, ids, valid, logits_to_keep=1)
        self.pending = [p[-keep:] for p in self.pending]

    def accept(self, num_accepted: list[int], emitted: list[list[int]],
               paths: list[tuple[int, ...] | None] | None = None) -> None:
        """Keep the first num_accepted[b] extras of row b (a tree row: its accepted nodes paths[b]),
        drop the rest, queue unseen tokens."""
        if self.extras:
            cols = torch.arange(self.extras, device=self.device)
            n = torch.tensor(num_accepted, device=self.device)
            keep = cols[None, :] < n[:, None]  # [batch, extras]
            for b, path in enumerate(paths or ()):
                if path is not None:
                    keep[b] = False
                    keep[b, list(path)] = True
            self.kv.rollback(keep)
        for b, (n_b, tokens) in enumerate(zip(num_accepted, emitted)):
            self.pending[b].extend(tokens[min(n_b, self.extras) :])
        self.extras = 0

    def extend(self, other: "ModelRunner") -> None:
        """Append `other`'s rows (freshly prefilled requests) between steps."""
        if self.extras or other.extras:
            raise RuntimeError("requests can only join between steps")
        self.kv.extend(other.kv)
        self.pending += other.pending

    def select(self, rows: list[int]) -> None:
        """Keep only these batch rows."""
        self.kv.select(torch.tensor(rows, device=self.device))
        self.pending = [self.pending[r] for r in rows]
