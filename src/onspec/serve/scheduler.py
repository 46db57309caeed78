"""One thread owns the engine and its running batch. Between verify steps it admits queued
requests (they join the batch), drops cancelled ones (their slot is freed at once), and hands
every request's new text to its sink; the HTTP side only submits, cancels and listens."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from onspec.engine.engine import Request, RunningBatch, SpeculativeEngine
from onspec.engine.records import RequestOutput, StepRecord
from onspec.serve.metrics import ServerMetrics

log = logging.getLogger("onspec.serve")


@dataclass
class Event:
    """What a request's listener receives: new text, and on the last event the whole output."""

    delta: str = ""
    output: RequestOutput | None = None
    draft_versions: list[int] = field(default_factory=list)
    error: str | None = None
    status: int = 200
    """With an error: 400 when the request itself was refused, 503 when the server failed it."""

    @property
    def last(self) -> bool:
        return self.output is not None or self.error is not None


Sink = Callable[[Event], None]


@dataclass
class _Ticket:
    request: Request
    sink: Sink
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    sent: int = 0  # characters of text already handed out
    versions: set[int] = field(default_factory=set)


class Scheduler:
    def __init__(self, engine: SpeculativeEngine, metrics: ServerMetrics, distiller=None, max_batch: int = 8) -> None:
        self.engine = engine
        self.metrics = metrics
        self.distiller = distiller
        self.max_batch = max_batch
        self.batch = RunningBatch(engine)
        self._queue: list[_Ticket] = []
        self._cancelled: set[str] = set()
        self._tickets: dict[str, _Ticket] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="onspec-scheduler", daemon=True)

    # -- the HTTP side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, sink: Sink) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._queue.append(_Ticket(request, sink))
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        """The client went away: drop the request before the next step, wherever it is."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self.batch)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- the decoding thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self.batch and not self._cancelled:
                    self._cond.wait()
                if self._closing:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                self._queue = [t for t in self._queue if t.request.request_id not in cancelled]
                room = self.max_batch - len(self.batch)
                joining, self._queue = self._queue[:room], self._queue[room:]
            try:
                self._cancel(cancelled)
                self._admit(joining)
                self._step()
            except Exception as e:  # a bug must not hang the clients: fail the batch, keep serving
                log.exception("decoding step failed; failing the running batch")
                self._fail_all(f"internal error while decoding: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _cancel(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            if self.batch.cancel(rid) is not None:
                self._tickets.pop(rid, None)
                if self.distiller is not None:
                    self.distiller.builder.discard(rid)
                log.info("request %s cancelled by its client; slot freed", rid)

    def _admit(self, tickets: list[_Ticket]) -> None:
        if not tickets:
            return
        try:
            self.batch.add([t.request for t in tickets])
            ok = tickets
        except ValueError:  # one bad request must not keep the others out: admit one by one
            ok = []
            for t in tickets:
                try:
                    self.batch.add([t.request])
                    ok.append(t)
                except ValueError as e:
                    t.sink(Event(error=str(e), status=400))
        for t in ok:
            self._tickets[t.request.request_id] = t

    def _step(self) -> None:
        if not self.batch:
            return
        finished = self.batch.step(self._on_record)
        now = time.perf_counter()
        for seq in list(self.batch.rows) + finished:
            t = self._tickets.get(seq.request.request_id)
            if t is None:
                continue
            if t.first_token_at is None and seq.generated:
                t.first_token_at = now
            done = seq.finish_reason is not None
            delta = self._new_text(t, seq, done)
            if done:
                del self._tickets[seq.request.request_id]
                out = seq.output()
                if self.distiller is not None:
                    self.distiller.on_finish(out)
                ttft = t.first_token_at - t.arrived if t.first_token_at is not None else None
                self.metrics.observe_finish(out, now - t.arrived, ttft, self.engine.draft_version)
                t.sink(Event(delta=delta, output=out, draft_versions=sorted(t.versions)))
            elif delta:
                t.sink(Event(delta=delta))

    def _on_record(self, rec: StepRecord) -> None:
        t = self._tickets.get(rec.request_id)
        if t is not None:
            t.versions.add(rec.draft_version)
        self.metrics.observe_step(rec)
        if self.distiller is not None:
            self.distiller.on_record(rec)

    @staticmethod
    def _new_text(t: _Ticket, seq, done: bool) -> str:
        """Text not yet handed out. While running, hold back what could still turn out to be the
        start of a stop string, and an incomplete UTF-8 character at the end."""
        if done:
            text, end = seq.stop.final_text(seq.generated), None
        else:
            text = seq.stop.text(seq.generated)
            end = len(text) - max((len(s) - 1 for s in seq.params.stop), default=0)
            while end > t.sent and text[end - 1] == "\ufffd":
                end -= 1
        end = len(text) if end is None else end
        if end <= t.sent:
            return ""
        delta, t.sent = text[t.sent:end], end
        return delta

    def _fail_all(self, message: str) -> None:
        tickets = list(self._tickets.values())
        with self._cond:
            tickets += self._queue
            self._queue = []
        self._tickets.clear()
        for s in list(self.batch.rows):
            self.batch.cancel(s.request.request_id)
        for t in tickets:
            t.sink(Event(error=message, status=503))
