"""An engine replica: `onspec serve`'s whole stack (target, drafter, scheduler, the FastAPI app
with its guard) in one Ray Serve replica, with the trainer and the draft's versions remote.

- Verify records go to the trainer actor fire-and-forget (`RemoteTrainer`): the decoding thread
  only appends to a bounded queue; a sender thread ships batches with at most `max_pending` calls
  unanswered, and drops (and counts) what does not fit, so a slow or dead trainer never stalls
  decoding.
- Draft versions come from the hub (`_follow`): a long poll returns as soon as a version is
  published (push) and at once for a replica that starts late (pull); the weights are read from
  the object store and offered to the drafter, which swaps them in whole between two verify
  steps (on the decoding thread, also while idle). An update not newer than the version served is
  ignored; a rollback is applied whatever its number.
- Every `REPORT_S` the replica reports its version, its Prometheus text and its acceptance per
  draft version to the hub: /health and /metrics on any replica show the whole cluster, and the
  hub judges new versions on live traffic (global rollback).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import ray
import torch
from ray import serve

from onspec.apps.serve import build_state
from onspec.cluster.config import ClusterConfig
from onspec.cluster.metrics import merge_expositions
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.engine.records import Example, StepOutput
from onspec.models.pair import ModelConfig
from onspec.online.distiller import TrainerConfig
from onspec.serve.app import create_app, refresh_metrics
from onspec.serve.config import ServerConfig

log = logging.getLogger("onspec.cluster.replica")

REPORT_S = 0.5
"""Seconds between two reports to the hub (and the longest a publication waits unseen)."""


@dataclass
class ReplicaSpec:
    """What every replica is built from (pickled to each replica by Ray)."""

    model: ModelConfig
    engine: EngineConfig
    policy: PolicyConfig
    trainer: TrainerConfig | None
    """None: --no-online (versions still follow the hub, e.g. a rollback; none are made)."""
    server: ServerConfig
    cluster: ClusterConfig
    namespace: str
    """The Ray namespace of the hub and the trainer (replicas live in Serve's own)."""
    hub_name: str
    trainer_name: str
    threads: int


def _local(server: ServerConfig) -> ServerConfig:
    """This replica's own learning: its suffix learner takes in what it serves (unless --no-online or
    --learn draft); the draft's trainer is the cluster's one actor, never a local one."""
    if server.learn == "draft":
        return replace(server, no_online=True)
    return replace(server, learn="suffix")


class EngineReplica:
    def __init__(self, spec: ReplicaSpec) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.name = serve.get_replica_context().replica_id.unique_id
        self.hub = ray.get_actor(spec.hub_name, namespace=spec.namespace)
        # this process holds no trainer: the drafter loads the newest checkpoint, the hub brings the rest
        self.state = build_state(spec.model, spec.engine, spec.policy, spec.trainer or TrainerConfig(),
                                 _local(spec.server))
        self.state.cluster = self
        member = self.state.pool.general
        self.drafter = member.drafter
        self.trainer: RemoteTrainer | None = None
        if spec.trainer is not None and self.drafter is not None:
            member.engine.teacher_top_k = spec.trainer.teacher_top_k
            self.trainer = member.trainer = RemoteTrainer(ray.get_actor(spec.trainer_name, namespace=spec.namespace),
                                                          spec.cluster.max_pending_sends)
        self.epoch: str | None = None
        self.generation = 0
        self._swaps: list[tuple[int, float]] = []
        self._swaps_lock = threading.Lock()
        self._closing = threading.Event()
        self.state.scheduler.start()
        # known to the hub (and so listed by /health) before Serve counts this replica as ready
        ray.get(self.hub.report.remote(self.name, self._status()))
        self._follower = threading.Thread(target=self._follow, name="onspec-follow-hub", daemon=True)
        self._follower.start()

    def __serve_build_asgi_app__(self):
        return create_app(self.state)

    # -- draft versions -------------------------------------------------------------------------

    def _follow(self) -> None:
        last_report = 0.0
        while not self._closing.is_set():
            try:
                pub = ray.get(self.hub.wait.remote(self.epoch, self.generation, REPORT_S))
                if pub is not None:
                    self._apply(pub)
                if time.monotonic() - last_report >= REPORT_S:
                    last_report = time.monotonic()
                    self.hub.report.remote(self.name, self._status())
            except Exception as e:  # the hub restarting, or a weight fetch failing: serve on, try again
                if self._closing.is_set():
                    return
                log.warning("replica %s: following the hub failed (%s: %s); serving draft v%s, retrying in 1 s",
                            self.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "", self._version)
                self._closing.wait(1.0)

    def _apply(self, pub: dict) -> None:
        self.epoch, self.generation = pub["epoch"], pub["generation"]
        if self.drafter is None or (pub["kind"] != "rollback" and pub["version"] <= self.drafter.version):
            return  # an update not newer than what serves
        self.drafter.offer(ray.get(pub["weights"][0]), pub["version"], pub["alpha_hint"])
        generation, received_at = pub["generation"], time.time()

        def live() -> None:  # on the decoding thread; a step may have swapped it in already
            self.drafter.apply_pending_swap()
            with self._swaps_lock:
                self._swaps.append((generation, received_at, self.drafter.swapped_at or time.time()))

        self.state.scheduler.call_soon(live)
        log.info("replica %s: draft v%d (%s, generation %d) offered", self.name, pub["version"], pub["kind"],
                 generation)

    @property
    def _version(self) -> int:
        return self.drafter.version if self.drafter is not None else 0

    def _status(self) -> dict:
        with self._swaps_lock:
            swaps, self._swaps = self._swaps, []
        return {"draft_version": self._version, "generation": self.generation, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "metrics": self._exposition().decode(),
                "counts": self.state.metrics.version_counts(), "swaps": swaps,
                "dropped_records": self.trainer.dropped if self.trainer is not None else 0}

    def _exposition(self) -> bytes:
        refresh_metrics(self.state)
        return self.state.metrics.exposition()

    # -- what the app asks (ServerState.cluster) ------------------------------------------------

    async def health(self) -> dict:
        hub = await self.hub.state.remote()
        return {"replica": self.name, "latest_draft_version": hub["version"] if hub["version"] is not None
                else self._version, "replicas": hub["replicas"],
                "cluster": {k: hub[k] for k in ("generation", "version", "good_version", "rollbacks", "swap_latency_s",
                                                "delivery_latency_s")}}

    async def exposition(self, own: bytes) -> bytes:
        texts = await self.hub.metrics.remote()
        texts[self.name] = own.decode()  # this replica's own, fresh
        return merge_expositions(texts)

    def __del__(self) -> None:
        """Serve's graceful shutdown (after the running requests had their time)."""
        if getattr(self, "_closing", None) is None or self._closing.is_set():
            return
        self._closing.set()
        self.state.scheduler.close()
        if self.trainer is not None:
            self.trainer.close()
        try:
            ray.get(self.hub.forget.remote(self.name), timeout=5)
        except Exception:
            pass


class RemoteTrainer:
    """The trainer as the scheduler sees it (`on_output`, `version`, `stats`, `history`), with
    the records sent to the trainer actor in the background."""

    def __init__(self, actor, max_pending: int, max_queued: int = 4096) -> None:
        self.actor = actor
        self.max_pending = max_pending
        self.queue: deque[Example | None] = deque()
        self.max_queued = max_queued
        self.dropped = 0
        """Records dropped because the trainer could not keep up (or was down)."""
        self._pending: list = []
        self._stats: dict = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._send, name="onspec-send-records", daemon=True)
        self._thread.start()

    def on_output(self, out: StepOutput) -> None:
        """On the decoding thread: never waits."""
        with self._cond:
            if len(self.queue) >= self.max_queued:
                self.dropped += 1
                return
            self.queue.append(out.example)
            self._cond.notify()

    def _send(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.queue or self._closing, timeout=1.0)
                if self._closing and not self.queue:
                    return
                batch = list(self.queue)
                self.queue.clear()
            if self._pending:
                _, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
            if not batch:
                self._refresh_stats()
                continue
            if len(self._pending) >= self.max_pending:
                self.dropped += len(batch)
                continue
            self._pending.append(self.actor.add.remote(batch))
            self._refresh_stats()

    def _refresh_stats(self) -> None:
        if not self._pending or len(self._pending) < self.max_pending:
            ref = self.actor.stats.remote()
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                try:
                    self._stats = ray.get(ref)
                except Exception:  # the trainer is down or restarting: keep the last stats
                    pass

    @property
    def version(self) -> int:
        return int(self._stats.get("draft_version", 0))

    def stats(self) -> dict:
        """The trainer's last stats ({} until the first answer) and the records dropped here."""
        if not self._stats:
            return {}
        return {k: v for k, v in self._stats.items() if k != "history"} | {"dropped_records": self.dropped}

    @property
    def history(self) -> list:
        from onspec.online.distiller import UpdateLog

        return [UpdateLog(**h) for h in self._stats.get("history", [])]

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=5)
