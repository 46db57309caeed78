"""Which N token ids a reduced-head draft proposes from (FR-Spec / EAGLE-3 style).

Counts start from a calibration stream and are kept current from the tokens the engine emits
(the target's own outputs, since verification is lossless). Calibration: the assistant turns of
the first ShareGPT conversations (ChatGPT's answers, much of them code), tokenized with the
target's tokenizer and cached per vocabulary. The served counts weigh in as they accumulate:
calibration counts are scaled to `prior_tokens` pseudo-tokens, so after about that many served
tokens the served stream dominates.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Iterable

import torch

from onspec.models.registry import cache_dir


class DraftVocab:
    def __init__(self, counts: torch.Tensor, n: int, always: Iterable[int] = (), *, prior_tokens: float = 100_000.0,
                 refresh_every: int = 4096) -> None:
        if not 1 <= n <= counts.numel():
            raise ValueError(f"--draft-vocab must be in [1, {counts.numel()}] for this vocabulary, got {n}")
        total = float(counts.sum())
        self.prior = counts.double() * (prior_tokens / total if total > 0 else 0.0)
        self.served = torch.zeros_like(self.prior)
        self.n = n
        self.always = sorted(set(int(i) for i in always))
        self.refresh_every = refresh_every
        self._since = 0
        self.seen = 0
        self.covered = 0
        """Served tokens in total, and those inside the id set in force when they were emitted."""
        self.ids = self._top()

    def _top(self) -> torch.Tensor:
        score = self.prior + self.served
        score[self.always] = float("inf")
        return torch.sort(torch.topk(score, self.n).indices).values

    def observe(self, tokens: list[int]) -> None:
        """Tokens the engine emitted (the target's tokens)."""
        if not tokens:
            return
        t = torch.tensor(tokens)
        self.served.index_add_(0, t, torch.ones(len(tokens), dtype=torch.float64))
        self.seen += len(tokens)
        self.covered += int(torch.isin(t, self.ids).sum())
        self._since += len(tokens)

    def maybe_refresh(self) -> torch.Tensor | None:
        """New ids when `refresh_every` tokens have been served since the last choice and the set
        changed; else None."""
        if self._since < self.refresh_every:
            return None
        self._since = 0
        ids = self._top()
        if torch.equal(ids, self.ids):
            return None
        self.ids = ids
        return ids

    @property
    def coverage(self) -> float | None:
        """Share of served target tokens the draft could have proposed."""
        return self.covered / self.seen if self.seen else None


def calibration_counts(tokenizer, vocab_size: int, conversations: int = 3000) -> torch.Tensor:
    """Token counts over the assistant turns of the first `conversations` ShareGPT conversations,
    cached per tokenizer vocabulary in the onspec cache. [vocab_size] int64"""
    key = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
    path = cache_dir() / "vocab" / f"sharegpt{conversations}-{key}.pt"
    if path.is_file():
        counts = torch.load(path)
        if counts.numel() == vocab_size:
            return counts
    from onspec.data.streams import iter_sharegpt_answers

    counts = torch.zeros(vocab_size, dtype=torch.int64)
    answers = list(itertools.islice(iter_sharegpt_answers(), conversations))
    for start in range(0, len(answers), 256):
        for ids in tokenizer(answers[start:start + 256], add_special_tokens=False)["input_ids"]:
            if ids:
                counts += torch.bincount(torch.tensor(ids), minlength=vocab_size)[:vocab_size]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(counts, tmp)
    tmp.replace(path)
    return counts
