"""The trainer actor: one distiller for every replica's traffic.

Replicas send their verify records (the compact teacher examples: tokens plus the target's top-K
per emitted token, never full logits) with `add`, fire-and-forget. The worker trains in its own
thread exactly as in one process and publishes each accepted version to the hub, which puts it in
Ray's object store once for every replica. Ray restarts this actor after a crash (`max_restarts`):
the new one resumes the newest checkpoint that verifies, and if the hub serves another version (a
newer one not yet checkpointed, or a rollback) it adopts those weights, so serving never goes back
and version numbers are never reused. Serving continues on the current draft meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import ray
import torch

from onspec.engine.records import Example
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.buffer import save_traffic
from onspec.online.checkpoint import CheckpointStore
from onspec.online.distiller import Distiller, TrainerConfig
from onspec.online.worker import TrainerWorker

log = logging.getLogger("onspec.cluster.trainer")


class TrainerActor:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainerConfig, state_dir: str, hub: tuple[str, str],
                 persist_traffic: bool = False, threads: int = 0) -> None:
        """`hub`: (namespace, name) of the hub actor."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if threads:
            torch.set_num_threads(threads)
        self.hub = ray.get_actor(hub[1], namespace=hub[0])
        self.state_dir = Path(state_dir)
        self.persist_traffic = persist_traffic
        target, draft = load_pair(model_cfg)
        teacher = None
        if cfg.data_source != "teacher":  # student-sampled data needs the target in this process
            teacher = lambda ids: target.model(ids).logits  # noqa: E731
        else:
            del target
        self.worker = TrainerWorker(Distiller(draft.model, cfg, teacher=teacher), cfg, self._publish,
                                    weights_dtype=next(draft.model.parameters()).dtype,
                                    store=CheckpointStore(self.state_dir / "checkpoints"), tokenizer=draft.tokenizer)
        traffic = self.state_dir / "traffic.pt"
        if persist_traffic and traffic.is_file():
            log.info("reloaded %d buffered requests from %s", self.worker.buffer.load(traffic), traffic)
        current = ray.get(self.hub.current_publication.remote())
        if current is None:  # the first trainer of this hub: the starting draft is the first good version
            self._publish(self.worker.version, self.worker.distiller.weights(self.worker.weights_dtype), None)
        else:
            self._follow(ray.get(self.hub.state.remote()), current)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="onspec-trainer-hub", daemon=True)
        self._thread.start()

    def _publish(self, version: int, weights: dict, alpha_hint: float | None) -> None:
        ray.get(self.hub.publish.remote(version, weights, alpha_hint))

    def _follow(self, state: dict, current: dict) -> None:
        """At a restart: the hub serves another version than the resumed checkpoint's (newer and
        not checkpointed, or a rollback): train on from the weights that serve."""
        if state["version"] == self.worker.version:
            return
        resumed = self.worker.version
        self.worker.distiller.adopt(ray.get(current["weights"][0]), current["version"], floor=state["max_version"])
        log.info("trainer follows the served draft v%d (its checkpoint had v%d)", current["version"], resumed)

    def _watch(self) -> None:
        """Follow the hub: a rollback publication sends the student back to the good version; the
        trainer's stats go to the hub for /health and /metrics."""
        epoch, generation = None, 0
        while not self._closing.is_set():
            try:
                self.hub.set_trainer.remote(self.stats())
                pub = ray.get(self.hub.wait.remote(epoch, generation, 1.0))
            except Exception:  # the hub restarting: try again
                log.exception("cannot reach the hub")
                self._closing.wait(1.0)
                continue
            if pub is None:
                continue
            epoch, generation = pub["epoch"], pub["generation"]
            if pub["kind"] == "rollback":
                state = ray.get(self.hub.state.remote())
                self.worker.adopt(ray.get(pub["weights"][0]), pub["version"], floor=state["max_version"])

    # -- what replicas and the launcher call -------------------------------------------------------

    def ready(self) -> int:
        return self.worker.version

    def add(self, examples: list[Example | None]) -> None:
        """Verify records of finished requests (None: a request that left none) from one replica."""
        for e in examples:
            self.worker.on_example(e)

    def stats(self) -> dict:
        return {**self.worker.stats(), "pid": os.getpid(),
                "history": [vars(h) for h in list(self.worker.history)[-20:]]}

    def inject_bad_update(self, scale: float = 1.0, seed: int = 0) -> int | None:
        """Fault injection (tests, drills): publish the student plus Gaussian noise of `scale`
        times each tensor's std as a new version, past the trainer's own guard, so that only the
        global rollback on live traffic can catch it. Returns the hub's generation."""
        d = self.worker.distiller
        g = torch.Generator().manual_seed(seed)
        dtype = self.worker.weights_dtype
        noisy = {n: (p + scale * p.std() * torch.randn(p.shape, generator=g)).to(dtype)
                 for n, p in d.weights(torch.float32).items()}
        version = max(d.version, d.version_floor) + 1
        d.version_floor = version  # the bad number is never reused
        return ray.get(self.hub.publish.remote(version, noisy, None))

    def close(self) -> dict:
        """Final checkpoint (and buffered traffic with --persist-traffic); returns the last stats."""
        self._closing.set()
        self.worker.close()
        if self.persist_traffic:
            save_traffic(self.worker.buffer, self.state_dir / "traffic.pt")  # never raises
        return self.stats()
