"""The hub: where draft versions are published, where replicas report, and where a version that
made serving worse is rolled back everywhere.

A publication is (generation, version, weights, kind). `generation` counts publications and only
goes up; `version` is the draft's own number (a rollback republishes an older version under a new
generation). The weights are put once into Ray's object store by the hub itself, so they outlive
the trainer that made them (an object belongs to the process that put it). Replicas long-poll
`wait` (push: it returns as soon as something is published; pull: a replica that starts late gets
the current publication at once) and apply a publication whole, between two verify steps.

Global rollback: every replica reports, per draft version, the draft tokens it proposed and the
ones accepted. Once a new version has `min_tokens` proposals across replicas it is judged against
the last good version's live alpha: below it by more than `tolerance`, the good version is
republished (kind "rollback") and every replica and the trainer return to it; otherwise it becomes
the good version. The trainer's own guard (a probe before publishing) stays the first line; this is
the second, on live traffic.

A plain class: `launch.py` makes it a Ray actor; tests drive it directly as well.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import deque

STALE_S = 10.0
"""A replica that has not reported for this long is listed as stale (and left out of /metrics)."""
GONE_S = 120.0
"""... and after this long it is no longer listed (a replica killed and replaced has a new name)."""


class Hub:
    def __init__(self, tolerance: float = 0.05, min_tokens: int = 512, put=None) -> None:
        self.tolerance = tolerance
        self.min_tokens = min_tokens
        self.epoch = uuid.uuid4().hex[:12]
        """Changes when the hub restarts: replicas then forget the generation they had."""
        self._put = put or _ray_put
        self.generation = 0
        self.current: dict | None = None
        self.good: dict | None = None
        """The last publication judged good on live traffic (or the first one)."""
        self.max_version = 0
        self.rollbacks: list[dict] = []
        self.published_at: dict[int, float] = {}
        self.replicas: dict[str, dict] = {}
        self.trainer: dict = {}
        self.swap_latency_s: deque[float] = deque(maxlen=4096)
        """Publication -> live on a replica (between two of its steps), one per replica and version."""
        self.delivery_latency_s: deque[float] = deque(maxlen=4096)
        """Publication -> the weights in the replica's hands (before waiting for its step to end)."""
        self._counts: dict[str, dict[int, tuple[int, int]]] = {}
        """replica -> version -> (accepted, proposed), cumulative as each replica reports it."""
        self._changed: asyncio.Condition | None = None

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, version: int, weights: dict, alpha_hint: float | None = None,
                      kind: str = "update") -> int | None:
        """A new draft from the trainer. Returns its generation, or None when ignored: a version
        not newer than every version published before (a trainer resumed from an older checkpoint)."""
        if kind == "update" and self.current is not None and version <= self.max_version:
            return None
        return await self._publish(version, [self._put(weights)], alpha_hint, kind)

    async def _publish(self, version: int, ref: list, alpha_hint: float | None, kind: str) -> int:
        self.generation += 1
        self.max_version = max(self.max_version, version)
        now = time.time()
        self.current = {"epoch": self.epoch, "generation": self.generation, "version": version, "weights": ref,
                        "alpha_hint": alpha_hint, "kind": kind, "published_at": now}
        self.published_at[self.generation] = now
        if self.good is None:
            self.good = self.current
        async with self._cond():
            self._changed.notify_all()
        return self.generation

    async def wait(self, epoch: str | None, generation: int, timeout: float) -> dict | None:
        """The current publication once it is newer than `generation` (at once for a replica of
        another epoch or a late one); None after `timeout` seconds with nothing new."""
        if epoch != self.epoch:
            generation = 0
        async with self._cond():
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.generation > generation), timeout)
            except asyncio.TimeoutError:
                return None
        return self.current

    async def current_publication(self) -> dict | None:
        return self.current

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    # -- replicas' reports and the global rollback -----------------------------------------------

    async def report(self, replica: str, status: dict) -> None:
        """A replica's state: draft_version, generation, pid, metrics (exposition text),
        counts {version: (accepted, proposed)} cumulative, swaps [(generation, received_at, live_at)]."""
        status = dict(status, seen=time.time())
        for generation, received_at, live_at in status.pop("swaps", ()):
            if generation in self.published_at:
                self.delivery_latency_s.append(max(0.0, received_at - self.published_at[generation]))
                self.swap_latency_s.append(max(0.0, live_at - self.published_at[generation]))
        self._counts[replica] = {int(v): tuple(c) for v, c in status.pop("counts", {}).items()}
        self.replicas[replica] = status
        for name in [n for n, r in self.replicas.items() if status["seen"] - r["seen"] > GONE_S]:
            del self.replicas[name]  # its acceptance counts stay: they still weigh in the rollback
        await self._judge()

    def alpha(self, version: int) -> tuple[float | None, int]:
        """Live alpha of a version over every replica, and its proposed tokens."""
        accepted = sum(c.get(version, (0, 0))[0] for c in self._counts.values())
        proposed = sum(c.get(version, (0, 0))[1] for c in self._counts.values())
        return (accepted / proposed if proposed else None), proposed

    async def _judge(self) -> None:
        cur, good = self.current, self.good
        if cur is None or good is None or cur["kind"] == "rollback" or cur is good:
            return
        new_alpha, new_n = self.alpha(cur["version"])
        good_alpha, good_n = self.alpha(good["version"])
        if new_n < self.min_tokens or good_n < self.min_tokens:
            return
        if new_alpha < good_alpha - self.tolerance:
            self.rollbacks.append({"from_version": cur["version"], "to_version": good["version"], "at": time.time(),
                                   "alpha": new_alpha, "good_alpha": good_alpha})
            await self._publish(good["version"], good["weights"], None, "rollback")
            self.good = self.current
        else:
            self.good = cur

    # -- what the HTTP side reads ----------------------------------------------------------------

    async def set_trainer(self, stats: dict) -> None:
        self.trainer = stats

    async def state(self) -> dict:
        now = time.time()
        lat, delivery = sorted(self.swap_latency_s), sorted(self.delivery_latency_s)
        return {
            "epoch": self.epoch, "generation": self.generation, "max_version": self.max_version,
            "version": self.current["version"] if self.current else None,
            "good_version": self.good["version"] if self.good else None,
            "kind": self.current["kind"] if self.current else None,
            "rollbacks": list(self.rollbacks),
            "replicas": {name: {"draft_version": r.get("draft_version"), "generation": r.get("generation"),
                                "pid": r.get("pid"), "node": r.get("node"), "age_s": round(now - r["seen"], 3),
                                "stale": now - r["seen"] > STALE_S}
                         for name, r in sorted(self.replicas.items())},
            "trainer": self.trainer,
            "swap_latency_s": {"n": len(lat), "p50": _quantile(lat, 0.5), "p95": _quantile(lat, 0.95),
                               "max": lat[-1] if lat else None},
            "delivery_latency_s": {"n": len(delivery), "p50": _quantile(delivery, 0.5),
                                   "p95": _quantile(delivery, 0.95), "max": delivery[-1] if delivery else None},
        }

    async def metrics(self) -> dict[str, str]:
        """Each live replica's last exposition text."""
        now = time.time()
        return {name: r["metrics"] for name, r in sorted(self.replicas.items())
                if "metrics" in r and now - r["seen"] <= STALE_S}

    async def forget(self, replica: str) -> None:
        """A replica shut down cleanly: drop it from the listing."""
        self.replicas.pop(replica, None)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _ray_put(value) -> object:
    import ray

    return ray.put(value)
