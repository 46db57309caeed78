"""The replay buffer: served requests as training data, bounded, with a held-back probe.

The engine turns each finished request into an `Example` (engine/records.py): per generated
position, the target's top-K probabilities as the verify step computed them. `ReplayBuffer` holds
examples up to a capacity in tokens (generated positions); when full it evicts the oldest examples
first (FIFO). Every `probe_every`-th request is held back as a probe (never trained on) so the
distiller's guard can measure a new draft on data it has not seen.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from pathlib import Path

import torch

from onspec.durable import replace_synced
from onspec.engine.records import Example

__all__ = ["Example", "ReplayBuffer", "save_traffic"]
log = logging.getLogger("onspec.trainer")


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
        replace_synced(Path(path), lambda f: torch.save(rows, f), private=True)  # owner only, durable
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

    def held(self) -> list[Example]:
        """Every example the buffer holds now, training and probe."""
        with self._lock:
            return [*self.examples, *self.probe]

    def probe_examples(self) -> list[Example]:
        with self._lock:
            return list(self.probe)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.examples) + sum(e.nbytes for e in self.probe)

    def __len__(self) -> int:
        return len(self.examples)


def save_traffic(buffer: ReplayBuffer, path: Path) -> None:
    """The shutdown's write of the buffered traffic (`--persist-traffic`), durable and owner-only.
    Never raises for a write that fails (a full or read-only state directory): one log line, and
    the file of the previous shutdown stays as it was."""
    try:
        written = buffer.save(path)
    except OSError as e:
        log.error("could not write the buffered traffic to %s: %s; the previous file is kept", path, e)
        return
    log.info("wrote %d buffered requests to %s", written, path)
