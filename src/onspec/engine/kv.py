"""A KV cache in slots, with explicit positions, so rejected tokens are a cheap rollback.

Every forward pass appends L slots to every row of the batch (the HF `DynamicCache` holds the
keys/values). Each slot is valid or not per row: rows of different prompt lengths are left-padded
with invalid slots, rows that accepted fewer tokens than others mark the rejected slots invalid.
The attention mask (4D, built here) lets a query see only valid earlier slots, and `position_ids`
count valid slots only, so a row behaves exactly as if its invalid slots did not exist.
Rollback = clear validity bits, then crop trailing slots that no row uses (for batch size 1 the
cache is physically cropped after every step, nothing is wasted).
"""

from __future__ import annotations

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
        self, model, input_ids: torch.Tensor, chunk_valid: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Run `model` on a chunk of new tokens, appending them to the cache.

        input_ids: [batch, L]; chunk_valid: [batch, L] bool (False = padding, ignored by everyone).
        Returns logits: [batch, L, vocab], or only the last `logits_to_keep` columns (0 = all);
        logits at invalid entries are meaningless.
        """
        position_ids, mask = self._prepare(chunk_valid)
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
