"""Served requests turned into training data, without running the target again.

Every generated token was predicted by the target exactly once, in the verify step that emitted
it; the engine's `StepRecord`s carry those logits. `ExampleBuilder` keeps, per generated
position, the target's top-K probabilities (float16) and their token ids (int32); the leftover
mass is 1 - sum(top-K). Memory per buffered token: K * (2 + 4) bytes + 4 bytes for the token id
(196 B at the default K = 32), against 98 KB for a full fp16 distribution over SmolLM2's
49,152-token vocabulary.

`ReplayBuffer` holds examples up to a capacity in tokens (generated positions); when full it
evicts the oldest examples first (FIFO). Every `probe_every`-th request is held back as a probe
(never trained on) so the trainer's guard can measure a new draft on data it has not seen.
"""

from __future__ import annotations

import os
import random
import threading
from collections import deque
from dataclasses import dataclass

import torch

from onspec.engine.records import RequestOutput, StepRecord


@dataclass(eq=False)  # compared by identity: it holds tensors
class Example:
    """One served request as training data."""

    request_id: str
    tokens: torch.Tensor
    """int32 [T]: prompt + generated tokens."""
    start: int
    """Index of the first generated token (the prompt length)."""
    top_ids: torch.Tensor
    """int32 [G, K]: the target's top-K token ids at generated positions start .. start+G-1."""
    top_probs: torch.Tensor
    """float16 [G, K]: their probabilities (temperature 1); 1 - row sum is the leftover mass."""
    draft_version: int = 0
    source: str = ""

    @property
    def num_positions(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.top_ids, self.top_probs))


class ExampleBuilder:
    """Collects the compact teacher distributions of in-flight requests from step records."""

    def __init__(self, top_k: int = 32) -> None:
        if top_k < 1:
            raise ValueError(f"teacher top-k must be >= 1, got {top_k}")
        self.top_k = top_k
        self._rows: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def on_record(self, rec: StepRecord) -> None:
        probs = rec.target_logits.float().softmax(-1)  # [n+1, vocab]
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        with self._lock:
            self._rows.setdefault(rec.request_id, []).append(
                (rec.position, top.indices.to(torch.int32).cpu(), top.values.to(torch.float16).cpu())
            )

    def finish(self, out: RequestOutput, draft_version: int = 0, source: str = "") -> Example | None:
        """Assemble the example of a finished request (None if it generated nothing)."""
        with self._lock:
            rows = self._rows.pop(out.request_id, [])
        if not out.token_ids or not rows:
            return None
        start = len(out.prompt_ids)
        end = start + len(out.token_ids)  # rows past the kept output (stop-trimmed) are dropped
        ids, probs = [], []
        for position, top_ids, top_probs in sorted(rows, key=lambda r: r[0]):
            keep = max(0, min(top_ids.shape[0], end - position))
            ids.append(top_ids[:keep])
            probs.append(top_probs[:keep])
        top_ids, top_probs = torch.cat(ids), torch.cat(probs)
        assert top_ids.shape[0] == len(out.token_ids), "one target distribution per generated token"
        return Example(
            request_id=out.request_id,
            tokens=torch.tensor(out.prompt_ids + out.token_ids, dtype=torch.int32),
            start=start,
            top_ids=top_ids,
            top_probs=top_probs,
            draft_version=draft_version,
            source=source,
        )

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._rows.pop(request_id, None)


class ReplayBuffer:
    """Bounded training examples (FIFO eviction by token count, and by request count when
    `capacity_requests` is set) plus a held-back probe set."""

    def __init__(self, capacity_tokens: int = 200_000, probe_every: int = 8, probe_size: int = 16,
                 seed: int = 0, capacity_requests: int = 0) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"buffer capacity must be >= 1 token, got {capacity_tokens}")
        if probe_every < 0 or probe_size < 0:
            raise ValueError("probe_every and probe_size must be >= 0")
        if capacity_requests < 0:
            raise ValueError(f"buffer capacity in requests must be >= 0 (0 = no bound), got {capacity_requests}")
        self.capacity_tokens = capacity_tokens
        self.capacity_requests = capacity_requests
        self.probe_every = probe_every
        self.examples: deque[Example] = deque()
        self.probe: deque[Example] = deque(maxlen=probe_size or None) if probe_size else deque(maxlen=0)
        self.tokens = 0
        self.added = 0
        self.evicted = 0
        self._fresh: list[Example] = []  # added since the last `take_batch`
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def add(self, example: Example) -> str:
        """Store an example; returns 'probe' or 'train'."""
        with self._lock:
            self.added += 1
            if self.probe_every and self.probe.maxlen and self.added % self.probe_every == 0:
                self.probe.append(example)
                return "probe"
            self._store(example)
            return "train"

    def _store(self, example: Example) -> None:
        """Append a training example and evict the oldest beyond the bounds (lock held)."""
        self.examples.append(example)
        self._fresh.append(example)
        self.tokens += example.num_positions
        while len(self.examples) > 1 and (self.tokens > self.capacity_tokens or (
                self.capacity_requests and len(self.examples) > self.capacity_requests)):
            old = self.examples.popleft()
            self.tokens -= old.num_positions
            self.evicted += 1
            if old in self._fresh:
                self._fresh.remove(old)

    def save(self, path) -> int:
        """Write the training examples and the probe (user traffic!) to `path` atomically; only
        called when the operator asked for it (`--persist-traffic`). Returns examples written."""
        with self._lock:
            rows = [dict(vars(e), probe=False) for e in self.examples] + [dict(vars(e), probe=True) for e in self.probe]
        tmp = f"{path}.tmp"
        torch.save(rows, tmp)
        os.replace(tmp, path)
        return len(rows)

    def load(self, path) -> int:
        """Add the examples `save` wrote (oldest first, bounds applied). Returns examples read."""
        rows = torch.load(path, weights_only=True)
        with self._lock:
            for row in rows:
                probe = row.pop("probe")
                e = Example(**row)
                if probe:
                    self.probe.append(e)
                else:
                    self._store(e)
        return len(rows)

    def take_batch(self, size: int, replay_share: float = 0.25) -> list[Example]:
        """Up to `size` examples: the newest since the last call first, topped up (and mixed, by
        `replay_share`) with older examples drawn uniformly, against forgetting."""
        with self._lock:
            fresh, self._fresh = self._fresh, []
            n_old = round(size * replay_share) if len(self.examples) > len(fresh) else 0
            batch = fresh[-(size - n_old):] if size - n_old > 0 else []
            older = [e for e in self.examples if e not in batch]
            want = size - len(batch)
            batch += self._rng.sample(older, min(want, len(older)))
            return batch

    def probe_examples(self) -> list[Example]:
        with self._lock:
            return list(self.probe)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.examples) + sum(e.nbytes for e in self.probe)

    def __len__(self) -> int:
        return len(self.examples)
