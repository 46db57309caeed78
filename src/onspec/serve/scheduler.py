"""One thread owns the engine (one for the whole draft pool; a single draft is a pool of one).
Between verify steps it routes and admits queued requests (`Member.add`: their prompts are cached a
chunk per step, then they join the running batch with their draft), drops cancelled ones, whether
decoding or still prefilling (`engine.cancel`: the slot is freed at once), runs one engine step
(`engine.step`: a chunk of each prefill, then the rows of every draft verify in one target pass), and hands
each request's new text (the engine's `StepOutput`) to its sink; a finished request's output goes
to its draft's trainer, and a request that failed alone gets its own error. The HTTP
side only submits, cancels and listens. Routers and the pool are touched by this thread only."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from onspec.data.streams import Query
from onspec.engine.engine import Request
from onspec.engine.records import RequestOutput
from onspec.pool.pool import DraftPool, Member
from onspec.pool.routers import Router
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
    """With an error: 400 when the request itself was refused, 500 when it failed alone while
    decoding (the rest of the batch went on), 503 when the server failed it."""
    draft: str | None = None
    """The pool member that served the request, and the route key the router gave it."""
    route: str | None = None

    @property
    def last(self) -> bool:
        return self.output is not None or self.error is not None


Sink = Callable[[Event], None]


@dataclass
class _Ticket:
    request: Request
    sink: Sink
    query: Query | None = None
    """What the router sees (the request's words and its `domain` field)."""
    arrived: float = field(default_factory=time.perf_counter)
    member: Member | None = None
    route: str | None = None
    delivered_at: float | None = None
    """When the last step that gave this request tokens ended (None: none yet)."""
    versions: set[int] = field(default_factory=set)


class QueueFull(Exception):
    """`Scheduler.submit` refused a request: the wait queue is at `max_queue` (the HTTP side answers 429)."""


class Scheduler:
    def __init__(self, pool: DraftPool, metrics: ServerMetrics, router: Router | None = None,
                 max_batch: int = 8, max_queue: int | None = None) -> None:
        self.pool = pool
        self.router = router
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        """Most requests waiting beyond the free decoding slots (None: no limit); `submit` refuses more."""
        self._queue: list[_Ticket] = []
        self._parked: list[_Ticket] = []
        """Routed to a specialist that is still being built (off this thread); they join once it is."""
        self._cancelled: dict[str, str] = {}
        """Request id -> what ended it (for the log), to be dropped before the next step."""
        self._chores: list[Callable[[], None]] = []
        self._tickets: dict[str, _Ticket] = {}
        self._drafts = {m.name for m in pool.all_members}
        self._cond = threading.Condition()
        self._closing = False
        self._opened = False
        pool.open_in_background, pool.on_opened = True, self._wake  # never build a draft on the decoding thread
        self._thread = threading.Thread(target=self._run, name="onspec-scheduler", daemon=True)

    # -- the HTTP side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, sink: Sink, query: Query | None = None) -> None:
        """Queue a request; QueueFull when `max_queue` requests already wait beyond the free slots."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            if self.max_queue is not None:
                free = max(0, self.max_batch - self.running)  # queued requests that join at the next step
                waiting = len(self._queue) + len(self._parked)
                if waiting >= self.max_queue + free:
                    raise QueueFull(f"the queue is full: {waiting} requests are waiting, {free} for the decoding slots "
                                    f"free now (of --max-batch {self.max_batch}) and {waiting - free} beyond them, the "
                                    f"most that --max-queue {self.max_queue} allows; retry later")
            self._queue.append(_Ticket(request, sink, query))
            self._cond.notify()

    def cancel(self, request_id: str, why: str = "cancelled by its client") -> None:
        """The client went away (or the server ended the request: `why` says which, for the log):
        drop the request before the next step, wherever it is (queued, prefilling or decoding)."""
        with self._cond:
            self._cancelled[request_id] = why
            self._cond.notify()

    def call_soon(self, chore: Callable[[], None]) -> None:
        """Run `chore` on the decoding thread between two steps (e.g. make an offered draft live
        while no request is running); an exception in it is logged."""
        with self._cond:
            self._chores.append(chore)
            self._cond.notify()

    @property
    def waiting(self) -> int:
        """Requests waiting: queued here, and long prompts waiting in the engine for their turn to prefill."""
        return len(self._queue) + len(self._parked) + self.pool.engine.num_waiting

    @property
    def running(self) -> int:
        """Requests holding a decoding slot (of `max_batch`): the engine's, but for the long prompts
        waiting inside it for their turn to prefill."""
        return self.pool.engine.num_running - self.pool.engine.num_waiting

    def close(self) -> None:
        """Stop the decoding thread once its current step ends, however long that takes: a thread
        still inside torch when the interpreter exits aborts the process ("terminate called
        without an active exception", exit code 134) after the state was saved."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        waited = 0
        while self._thread.is_alive():
            self._thread.join(timeout=30)
            waited += 30
            if self._thread.is_alive():
                log.warning("waiting for the decoding step in progress to end (%d s so far)", waited)

    def _wake(self) -> None:
        """A specialist finished building (called on its builder thread)."""
        with self._cond:
            self._opened = True
            self._cond.notify()

    # -- the decoding thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._closing and not self._queue and not self.pool.engine.num_running and not self._cancelled
                       and not self._opened and not self._chores):
                    self._cond.wait()
                if self._closing:
                    break
                self._opened = False
                chores, self._chores = self._chores, []
                cancelled, self._cancelled = self._cancelled, {}
                self._queue = [t for t in self._queue if t.request.request_id not in cancelled]
                self._parked = [t for t in self._parked if t.request.request_id not in cancelled]
                self._queue = self._unpark() + self._queue
                room = self.max_batch - self.running
                joining, self._queue = self._queue[:room], self._queue[room:]
            for chore in chores:
                try:
                    chore()
                except Exception:
                    log.exception("a chore on the decoding thread failed")
            try:
                self._cancel(cancelled)
                self._admit(joining)
                self._step()
            except Exception as e:  # a bug must not hang the clients: fail the batch, keep serving
                log.exception("decoding step failed; failing the running batch")
                self._fail_all(f"internal error while decoding: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _cancel(self, cancelled: dict[str, str]) -> None:
        for rid, why in cancelled.items():
            t = self._tickets.pop(rid, None)
            if t is None:
                continue
            t.member.engine.cancel(rid)
            log.info("request %s %s; slot freed", rid, why)

    def _unpark(self) -> list[_Ticket]:
        """Parked tickets whose draft is built now (or failed: the general draft), in order."""
        ready, parked = [], []
        for t in self._parked:
            t.member = self.pool.ready(t.route)
            (parked if t.member is None else ready).append(t)
        self._parked = parked
        return ready

    def _admit(self, tickets: list[_Ticket]) -> None:
        groups: dict[str, list[_Ticket]] = {}
        for t in tickets:
            if t.member is None:
                self._route(t)
            if t.member is None:
                self._parked.append(t)
                continue
            self._note_draft(t.member, t.route)
            groups.setdefault(t.member.name, []).append(t)
        for group in groups.values():
            member = group[0].member
            try:
                member.add([t.request for t in group])
                ok = group
            except ValueError:  # one bad request must not keep the others out: admit one by one
                ok = []
                for t in group:
                    try:
                        member.add(t.request)
                        ok.append(t)
                    except ValueError as e:
                        t.sink(Event(error=str(e), status=400))
            for t in ok:
                self._tickets[t.request.request_id] = t

    def _route(self, t: _Ticket) -> None:
        if self.router is None or t.query is None:
            t.member = self.pool.general
            return
        t.route = self.router.route(t.query, t.request.prompt_ids)
        t.member = self.pool.pick(t.route, self.router.opens_at_once)  # None: being built, parked

    def _note_draft(self, member: Member, route: str | None) -> None:
        if member.name not in self._drafts:  # a specialist just opened
            self._drafts.add(member.name)
            self.metrics.add_draft(member.name)
            log.info("opened draft %r for route %r", member.name, route)

    def _step(self) -> None:
        if not self.pool.engine.num_running:
            return
        outputs = self.pool.engine.step()
        now = time.perf_counter()
        for o in outputs:
            t = self._tickets.get(o.request_id)
            if t is None:
                continue
            member = t.member
            self.metrics.observe_step(o, member.name)
            t.versions.add(o.draft_version)
            if o.token_ids:
                self.metrics.observe_delivery(len(o.token_ids), now - (t.delivered_at or t.arrived),
                                              first=t.delivered_at is None)
                t.delivered_at = now
            if not o.finished:
                if o.text:
                    t.sink(Event(delta=o.text))
                continue
            del self._tickets[o.request_id]
            if o.error is not None:  # this request failed alone; the batch went on without it
                t.sink(Event(error=f"internal error while decoding this request: {o.error}", status=500))
                continue
            out = o.output
            if member.trainer is not None:
                member.trainer.on_output(o)
            self.pool.observe(t.route, member, out.stats.alpha)
            self.metrics.observe_finish(out, now - t.arrived, member.version, member.name, t.route)
            t.sink(Event(delta=o.text, output=out, draft_versions=sorted(t.versions), draft=member.name, route=t.route))

    def _fail_all(self, message: str) -> None:
        tickets = list(self._tickets.values())
        with self._cond:
            tickets += self._queue + self._parked
            self._queue, self._parked = [], []
        for t in self._tickets.values():
            t.member.engine.cancel(t.request.request_id)
        self._tickets.clear()
        for t in tickets:
            t.sink(Event(error=message, status=503))
