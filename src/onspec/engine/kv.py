"""KV caches with explicit positions, so rejected tokens are a cheap rollback.

Two layouts, one interface (`forward`, `rollback`, `extend`, `select`, `lengths`); `ModelRunner`
picks one by the forward it runs.

`RaggedKVCache` (the engine's own forward, models/decode.py; every Llama/Qwen2 model on a CPU):
each row holds its own keys and values, one tensor per row `[layers, 2, kv_heads, capacity, dim]`
grown in blocks of `BLOCK` (64) positions (about 1/8 more once a row is long, so growing copies a row
a bounded number of times; a prefill reserves the whole prompt at its first chunk). A pass packs
the rows' new tokens into one sequence: the linear layers run batched over all of them, attention
runs per row over that row's own keys (a short loop over rows per layer; for one row it is the
single-sequence path; rows of alike lengths share one call, none over more than about twice its own
keys: models/decode.py). So a row's memory and its attention cost depend on its own length only: a
short request beside an 8k-token prompt attends over its own few hundred keys and holds a block or
two. Positions are each row's length. Rollback = shorten the row (nothing is copied or freed); a
row that leaves (`select`) frees its tensor; a joining row (`extend`) is appended, no copy.

Tree passes (both layouts): a row's new tokens may be a tree (`forward`'s `trees`: per token its
parent among them, -1 for the cached tokens), several candidate continuations verified at once.
A token's position is then the row's length + its depth, and it attends to the cached keys and its
own ancestors only (`tree_mask`). Rolling back keeps the accepted path: RaggedKVCache moves its
keys and values to contiguous places (a gather within the row's tensor); SlotKVCache marks the
other slots invalid, as it does for rejected tokens.

`SlotKVCache` (transformers' own forward: `--forward transformers`, and models decode.py does not
run): the batch is one rectangle of slots in an HF `DynamicCache`, where every forward pass appends
L slots to every row. Each slot is valid or not per row: rows of different prompt lengths are
left-padded with invalid slots, rows that accepted fewer tokens than others mark the rejected slots
invalid. The attention mask (4D, built here) lets a query see only valid earlier slots, and
`position_ids` count valid slots only, so a row behaves exactly as if its invalid slots did not
exist. Rollback = clear validity bits, then crop trailing slots that no row uses (for batch size 1
the cache is physically cropped after every step, nothing is wasted). NOTE: here every row costs
the longest row's length (memory and attention); only the fallback path pays it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


class SlotKVCache:
    def __init__(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        # a cache built without a model config holds full-attention layers only; models with
        # sliding-window attention are refused at load time (see models.loading)
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # [batch, slots]
        self.dtype = dtype

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per row (= the next token's position). [batch]"""
        return self.valid.sum(1)

    def forward(
        self, model, input_ids: torch.Tensor, chunk_valid: torch.Tensor, logits_to_keep: int = 0,
        trees: list[list[int] | None] | None = None,
    ) -> torch.Tensor:
        """Run `model` on a chunk of new tokens, appending them to the cache.

        input_ids: [batch, L]; chunk_valid: [batch, L] bool (False = padding, ignored by everyone);
        trees: per row, its valid tokens' parents (a tree pass, see the module docstring) or None
        (in order). Returns logits: [batch, L, vocab], or only the last `logits_to_keep` columns
        (0 = all); logits at invalid entries are meaningless.
        """
        position_ids, mask = self._prepare(chunk_valid)
        if trees is not None:
            self._plant(position_ids, mask, chunk_valid, trees)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.valid = torch.cat([self.valid, chunk_valid], dim=1)
        return out.logits

    def _prepare(self, chunk_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, L = chunk_valid.shape
        S = self.num_slots
        position_ids = self.lengths[:, None] + chunk_valid.long().cumsum(1) - 1  # [batch, L]
        position_ids = position_ids.clamp_min(0)
        keys_valid = torch.cat([self.valid, chunk_valid], dim=1)  # [batch, S+L]
        query_slot = torch.arange(S, S + L, device=chunk_valid.device)
        key_slot = torch.arange(S + L, device=chunk_valid.device)
        causal = key_slot[None, :] <= query_slot[:, None]  # [L, S+L]
        allowed = keys_valid[:, None, :] & causal[None]  # [batch, L, S+L]
        # a padding query attends to itself so no row of the mask is empty (avoids NaNs)
        allowed = allowed | (key_slot[None, :] == query_slot[:, None])[None]
        mask = torch.zeros(batch, 1, L, S + L, dtype=self.dtype, device=chunk_valid.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        return position_ids, mask

    def _plant(self, position_ids: torch.Tensor, mask: torch.Tensor, chunk_valid: torch.Tensor,
               trees: list[list[int] | None]) -> None:
        """Tree rows' positions (length + depth) and masks (the cached slots and ancestors only)."""
        S = self.num_slots
        for b, parents in enumerate(trees):
            if parents is None:
                continue
            cols = chunk_valid[b].nonzero().flatten()
            offsets, ancestors = (t.to(mask.device) for t in tree_mask(parents))
            position_ids[b, cols] = self.lengths[b] + offsets
            block = mask[b, 0, cols[:, None], S + cols[None, :]]
            mask[b, 0, cols[:, None], S + cols[None, :]] = block.masked_fill(~ancestors, torch.finfo(self.dtype).min)

    def rollback(self, keep: torch.Tensor) -> None:
        """Invalidate slots of the last chunk. keep: [batch, L] bool for the last L slots."""
        L = keep.shape[1]
        self.valid[:, self.num_slots - L :] &= keep
        self.trim()

    def trim(self) -> None:
        """Physically drop trailing slots that are invalid in every row."""
        used = self.valid.any(0)
        if used.all():
            return
        last_used = int(used.nonzero().max()) + 1 if used.any() else 0
        drop = self.num_slots - last_used
        if drop > 0:
            self.cache.crop(-drop)
            self.valid = self.valid[:, :last_used]

    def extend(self, other: "SlotKVCache") -> None:
        """Append the rows of `other` (a request joining a running batch). The cache with fewer
        slots is left-padded with invalid slots; positions are explicit, so nobody notices."""
        slots = max(self.num_slots, other.num_slots)
        if slots:
            ref = (self if self.num_slots else other).cache.layers
            merged = DynamicCache()
            for i, layer in enumerate(ref):
                k = torch.cat([c._padded(c.cache.layers[i].keys if c.num_slots else None, layer.keys, slots)
                               for c in (self, other)])
                v = torch.cat([c._padded(c.cache.layers[i].values if c.num_slots else None, layer.values, slots)
                               for c in (self, other)])
                merged.update(k, v, i)
            self.cache = merged
        pad = lambda c: torch.cat([c.valid.new_zeros(c.batch_size, slots - c.num_slots), c.valid], 1)
        self.valid = torch.cat([pad(self), pad(other)])

    def _padded(self, t: torch.Tensor | None, like: torch.Tensor, slots: int) -> torch.Tensor:
        """This cache's [batch, heads, n, dim] tensor left-padded with zeros to `slots` slots."""
        shape = (self.batch_size, *like.shape[1:-2], slots - self.num_slots, like.shape[-1])
        pad = like.new_zeros(shape)
        return pad if t is None else torch.cat([pad, t], -2)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a finished request leaves the batch)."""
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]
        self.trim()


BLOCK = 64
"""Positions a row's cache grows by (at least): the granularity of a row's memory."""


@dataclass(frozen=True)
class Segment:
    """One row's new tokens in a packed pass: tokens [offset, offset + count) of the packed
    sequence, stored at places [start, start + count) of row `row`: at those positions, or for a
    tree (`parents`) at start + each token's depth."""

    row: int
    offset: int
    start: int
    count: int
    parents: tuple[int, ...] | None = None
    """A tree pass: per token its parent among the segment's tokens (-1: the cached keys)."""

    def positions(self) -> torch.Tensor:
        """[count] the tokens' positions."""
        if self.parents is None:
            return torch.arange(self.start, self.start + self.count)
        return self.start + tree_mask(self.parents)[0]


def tree_mask(parents) -> tuple[torch.Tensor, torch.Tensor]:
    """A tree's positions after the root, offsets [n] (a root's child: 0), and which of its tokens
    each token attends to, ancestors [n, n] bool (itself and its ancestors). A chain (parents
    j - 1) gives 0..n-1 and the causal mask."""
    n = len(parents)
    offsets = [0] * n
    ancestors = torch.eye(n, dtype=torch.bool)
    for j, parent in enumerate(parents):
        if parent >= 0:
            offsets[j] = offsets[parent] + 1
            ancestors[j] |= ancestors[parent]
    return torch.tensor(offsets, dtype=torch.long), ancestors


class RaggedKVCache:
    """Per-row keys and values, each row as long as itself (see the module docstring).

    `forward` runs a `DecodeForward` (its `ragged` method): the forward calls `write` once per
    layer and row of `segments`, which stores the row's new keys and values and returns its keys
    and values so far."""

    def __init__(self, batch_size: int, device: torch.device | str, layers: int, block: int = BLOCK) -> None:
        self.device = torch.device(device)
        self.layers = layers
        self.block = block
        self.rows: list[torch.Tensor | None] = [None] * batch_size  # each [layers, 2, kv_heads, capacity, dim]
        self.lens = [0] * batch_size  # tokens held per row (= the next token's position)
        self.hint = [0] * batch_size  # positions to allocate at a row's first write (`reserve`)
        self.segments: list[Segment] = []  # the pass in progress
        self.tree_rows: set[int] = set()  # rows whose last pass was a tree (may keep a path, not a prefix)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per row (= the next token's position). [batch]"""
        return torch.tensor(self.lens, dtype=torch.long)

    def nbytes(self, row: int) -> int:
        """Bytes of keys and values `row` holds (its capacity: its length rounded up to blocks)."""
        t = self.rows[row]
        return 0 if t is None else t.numel() * t.element_size()

    def reserve(self, sizes: list[int]) -> None:
        """Allocate room for sizes[b] positions at row b's first write (a prompt being prefilled
        in chunks grows once, not once per chunk)."""
        self.hint = [max(h, n) for h, n in zip(self.hint, sizes)]

    def forward(self, model, input_ids: torch.Tensor, chunk_valid: torch.Tensor, logits_to_keep: int = 0,
                trees: list[list[int] | None] | None = None) -> torch.Tensor:
        """Run `model` (a DecodeForward) on a chunk of new tokens, appending them to their rows.

        input_ids: [batch, L]; chunk_valid: [batch, L] bool (False = padding, not a token: each
        row's valid entries are its new tokens, in order); trees: per row, its new tokens' parents
        (a tree pass, see the module docstring) or None (in order). Returns logits: [batch, L,
        vocab], or only the last `logits_to_keep` columns (0 = all); logits at invalid entries are
        zeros.
        """
        batch, L = input_ids.shape
        keep = L if logits_to_keep <= 0 else min(logits_to_keep, L)
        counts = chunk_valid.sum(1).tolist()
        self.segments, offset = [], 0
        for b, c in enumerate(counts):
            if c:
                tree = trees[b] if trees is not None else None
                self.segments.append(Segment(b, offset, self.lens[b], c, None if tree is None else tuple(tree)))
                offset += c
        self.tree_rows = {s.row for s in self.segments if s.parents is not None}
        ids = input_ids[chunk_valid][None]  # [1, tokens]: row after row
        positions = torch.cat([s.positions() for s in self.segments] or
                              [torch.zeros(0, dtype=torch.long)]).to(self.device)[None]  # [1, tokens]
        packed = chunk_valid.flatten().cumsum(0).view(batch, L) - 1  # packed index of each valid entry
        kept = chunk_valid[:, L - keep:]  # [batch, keep]
        index = packed[:, L - keep:][kept]  # packed tokens whose logits are returned
        try:
            logits = model.ragged(ids, positions, self, index)  # [len(index), vocab]
        finally:
            self.segments = []
        for b, c in enumerate(counts):
            self.lens[b] += c
        if len(index) == batch * keep:  # no padding among the kept columns
            return logits.view(batch, keep, -1)
        out = logits.new_zeros(batch, keep, logits.shape[-1])
        out[kept] = logits
        return out

    def write(self, layer: int, seg: Segment, kv: torch.Tensor) -> torch.Tensor:
        """Store row seg.row's new keys and values of `layer`, kv: [2, kv_heads, count, dim] (keys,
        values); returns the row's keys and values up to them: [2, kv_heads, start + count, dim] (a view)."""
        end = seg.start + seg.count
        store = self._room(seg.row, end, kv)
        store[layer, :, :, seg.start:end] = kv
        return store[layer, :, :, :end]

    def _room(self, row: int, end: int, like: torch.Tensor) -> torch.Tensor:
        """Row `row`'s store with room for `end` positions: allocated, or grown by copying (rare)."""
        store = self.rows[row]
        capacity = 0 if store is None else store.shape[3]
        if end <= capacity:
            return store
        want = max(end, self.hint[row], capacity + capacity // 8)
        want = -(-want // self.block) * self.block
        kv_heads, dim = like.shape[1], like.shape[3]  # like: [2, kv_heads, count, dim]
        grown = like.new_empty(self.layers, 2, kv_heads, want, dim)
        if store is not None:
            grown[:, :, :, : self.lens[row]] = store[:, :, :, : self.lens[row]]
        self.rows[row] = grown
        return grown

    def rollback(self, keep: torch.Tensor) -> None:
        """Drop rejected tokens. keep: [batch, L] bool for each row's last L tokens: a prefix of
        them (speculative tokens are rejected from the first refused one on), or where the last
        pass was a tree, its accepted path, whose keys and values move to the places after the
        row's earlier tokens."""
        L = keep.shape[1]
        kept = keep.sum(1)
        prefix = torch.arange(L, device=keep.device)[None, :] < kept[:, None]
        paths = [] if torch.equal(keep, prefix) else [b for b in range(len(kept)) if not torch.equal(keep[b], prefix[b])]
        if any(b not in self.tree_rows for b in paths):
            raise ValueError("a row can only roll back its last tokens")
        for b in paths:
            store, base = self.rows[b], self.lens[b] - L
            store[:, :, :, base:base + int(kept[b])] = store[:, :, :, base + keep[b].nonzero().flatten()]
        for b, n in enumerate(kept.tolist()):
            self.lens[b] -= L - n
        self.tree_rows = set()

    def extend(self, other: "RaggedKVCache") -> None:
        """Append the rows of `other` (a request joining a running batch); nothing is copied."""
        self.rows += other.rows
        self.lens += other.lens
        self.hint += other.hint

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a finished request leaves the batch: its memory is freed)."""
        rows = rows.tolist()
        self.rows = [self.rows[r] for r in rows]
        self.lens = [self.lens[r] for r in rows]
        self.hint = [self.hint[r] for r in rows]


def right_aligned(seqs: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack token lists into one chunk, each row right-aligned so its last token is in the last
    column; the left padding is marked invalid. Returns ids: [batch, width], valid: [batch, width]."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s) :] = torch.tensor(s)
            valid[b, width - len(s) :] = True
    return ids.to(device), valid.to(device)
