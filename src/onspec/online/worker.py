"""The trainer worker: takes served requests in, runs the distiller's updates in the background
within a time budget, publishes each accepted draft, writes checkpoints and resumes from them.

Wiring: hand it every finished request's `StepOutput` (`on_output`; the engine built the
request's `Example` when its `teacher_top_k` is set). Every `update_interval` requests an update
is due; a background thread runs it (decoding never waits), and an accepted version goes out
through `publish(version, weights, alpha_hint)`: to a drafter of an engine (`Drafter.offer`,
swapped in between two verify steps) here, to serving replicas elsewhere. Checkpoints
(safetensors + optimizer state) every `checkpoint_every` accepted updates; a worker with the same
checkpoint directory resumes the newest version that verifies and publishes it first.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from onspec.engine.records import Example, StepOutput
from onspec.online.buffer import ReplayBuffer
from onspec.online.checkpoint import CheckpointStore
from onspec.online.distiller import Distiller, TrainerConfig, UpdateLog

log = logging.getLogger("onspec.trainer")

Publish = Callable[[int, dict, "float | None"], None]
"""publish(version, weights, alpha_hint): a new draft for whoever serves."""


class TrainerWorker:
    def __init__(self, distiller: Distiller, config: TrainerConfig, publish: Publish, *,
                 weights_dtype: torch.dtype = torch.float32, store: CheckpointStore | None = None,
                 tokenizer=None) -> None:
        self.distiller = distiller
        self.cfg = config
        self.publish = publish
        self.weights_dtype = weights_dtype
        self.store = store
        self.tokenizer = tokenizer
        self.buffer = ReplayBuffer(config.buffer_tokens, config.probe_every, config.probe_size, seed=config.seed,
                                   capacity_requests=config.max_buffer_records)
        self.requests = 0
        self.published: list[int] = []
        """Every version handed to `publish`, in order (a resumed one first)."""
        self._due = 0
        self._cond = threading.Condition()
        self._closing = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._adopting: tuple[dict, int, int] | None = None
        self._saved_version: int | None = None  # the draft version the store holds (saved or resumed)
        self._resume()
        if config.background:
            self._thread = threading.Thread(target=self._loop, name="onspec-trainer", daemon=True)
            self._thread.start()

    @property
    def version(self) -> int:
        return self.distiller.version

    @property
    def history(self) -> list[UpdateLog]:
        """Every update's outcome, oldest first."""
        return self.distiller.history

    # -- intake --------------------------------------------------------------------------------

    def on_output(self, out: StepOutput) -> None:
        """A request finished (its last StepOutput): buffer its example, count it, maybe update."""
        self.on_example(out.example)

    def on_example(self, example: Example | None) -> None:
        """A served request's example (None: it left none), from this process or a replica:
        buffer it, count the request, maybe update."""
        if example is not None:
            self.buffer.add(example)
        self.requests += 1
        if self.requests % self.cfg.update_interval == 0:
            if self._thread is None:
                self.update()
            else:
                with self._cond:
                    self._due += 1
                    self._cond.notify()

    def add_example(self, example: Example) -> None:
        """Buffer an example from elsewhere (a file, another replica) without counting a request."""
        self.buffer.add(example)

    # -- one update ------------------------------------------------------------------------------

    def adopt(self, weights: dict, version: int, floor: int = 0) -> None:
        """From any thread: the student returns to published weights (a global rollback) before the
        next update; an update running meanwhile is not published (it grew from the weights left)."""
        with self._cond:
            self._adopting = (weights, version, floor)

    def _apply_adopt(self) -> bool:
        with self._cond:
            adopting, self._adopting = self._adopting, None
        if adopting is not None:
            self.distiller.adopt(*adopting)
            log.info("trainer returned to draft v%d (next version above v%d)", adopting[1], adopting[2])
        return adopting is not None

    def update(self) -> UpdateLog | None:
        """One distiller update; publish it if accepted, checkpoint on schedule."""
        self._apply_adopt()
        entry = self.distiller.update(self.buffer)
        if self._apply_adopt():
            return None
        if entry is None or entry.outcome != "accepted":
            return entry
        self._publish(entry.probe_after)
        if self.store is not None and self.cfg.checkpoint_every and self.distiller.updates % self.cfg.checkpoint_every == 0:
            self._checkpoint_or_log("scheduled")
        return entry

    def _publish(self, alpha_hint: float | None) -> None:
        self.publish(self.distiller.version, self.distiller.weights(self.weights_dtype), alpha_hint)
        self.published.append(self.distiller.version)

    def _loop(self) -> None:
        if self.cfg.trainer_threads:
            torch.set_num_threads(self.cfg.trainer_threads)  # thread-local: decoding keeps its own count
        while True:
            with self._cond:
                while not self._due and not self._closing:
                    self._cond.wait()
                if self._closing and not self._due:
                    return
                self._due = 0
            t0 = time.perf_counter()
            self._running = True
            try:
                self.update()
            except Exception:  # the trainer must never take serving down
                log.exception("trainer update failed; serving continues with draft v%d", self.version)
            finally:
                self._running = False
            busy = time.perf_counter() - t0
            if self.cfg.train_budget < 1.0:
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, timeout=busy * (1 / self.cfg.train_budget - 1))

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until no update is due or running (for tests and end-of-stream reporting)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and (self._due or self._running):
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(0.01)

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        if self.store is None:
            return
        d = self.distiller
        # with adapters the directory holds the merged (served) draft; the adapters and their
        # optimizer moments start over on resume, so the moments are not kept
        self.store.save(d.student, self.tokenizer, None if d.adapted else d.optimizer, d.version,
                        {"updates": d.updates, "rollbacks": d.rollbacks, "discarded": d.discarded,
                         "requests": self.requests, "lora_rank": self.cfg.lora_rank},
                        state_dict=d.served_state_dict() if d.adapted else None)
        self._saved_version = d.version

    def _checkpoint_or_log(self, which: str) -> None:
        """A checkpoint that never raises: a full or read-only state directory costs the unsaved
        versions (logged with the directory), never serving nor the rest of shutdown."""
        try:
            self.checkpoint()
        except OSError as e:
            log.error("%s checkpoint of draft v%d into %s failed: %s; %s, the version is not saved",
                      which, self.version, self.store.root, e,
                      "shutdown goes on" if which == "final" else "serving is unaffected")
        except Exception:
            log.exception("%s checkpoint of draft v%d into %s failed; the version is not saved", which, self.version,
                          self.store.root)

    def close(self) -> None:
        """Finish pending work, stop the thread, write a final checkpoint (unless the store already
        holds this version). Never raises for a checkpoint that cannot be written: it logs it."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()
            self._thread = None
        if self.store is not None and self.distiller.updates and self.distiller.version != self._saved_version:
            self._checkpoint_or_log("final")

    def _resume(self) -> None:
        if self.store is None:
            return
        d = self.distiller
        if d.adapted:  # the checkpoint is the merged draft: adopted, its adapters starting at zero
            got = self.store.load_fitting(d.served_state_dict(), required=d.published_names)
            if got is None:
                return
            meta = got.meta
            d.adopt(got.weights, int(meta["version"]))
        else:
            meta = self.store.load_into(d.student, d.optimizer)
            if meta is None:
                return
        d.version = int(meta["version"])
        d.updates = int(meta.get("updates", 0))
        d.rollbacks = int(meta.get("rollbacks", 0))
        self._saved_version = d.version
        self._publish(None)
        log.info("resumed draft v%d from %s", d.version, self.store.loaded_from)

    def stats(self) -> dict:
        d = self.distiller
        return {
            "draft_version": d.version, "updates": d.updates, "rollbacks": d.rollbacks,
            "discarded_nan": d.discarded, "requests": self.requests, "buffer_requests": len(self.buffer),
            "buffer_tokens": self.buffer.tokens, "buffer_bytes": self.buffer.nbytes, "evicted": self.buffer.evicted,
            "trainer_time_s": d.trainer_time_s, "trained_tokens": d.trained_tokens,
            "trained_parameters": sum(p.numel() for p in d.trainable.values()),
            "train_layers": self.cfg.train_layers, "freeze_head": self.cfg.freeze_head, "lora_rank": self.cfg.lora_rank,
            "boundary_bytes": d.boundary_bytes, "updating": self._running,
        }
