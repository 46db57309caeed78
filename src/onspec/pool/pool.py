"""A pool of drafts for one target: the general draft plus specialists opened per route key.

Every member is a drafter of the one engine (its rows verify in the same target passes as every
other member's) with its own KV cache, adaptive k, buffer, trainer schedule, version and
checkpoint directory; a specialist starts as a clone of the general draft
that shares its frozen embedding table, so an extra draft costs its layers (and, when learning,
its student copy and optimizer state), not another vocabulary-sized matrix.

Routing is checked by acceptance: a share of each route's queries still goes to the general
draft, and a specialist whose recent alpha falls below the general draft's on its own route
(by more than a margin) is marked degraded and its route served by the general draft again.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from onspec.config import option
from onspec.durable import replace_synced
from onspec.engine.drafter import DEFAULT
from onspec.pool.routers import ROUTERS
from onspec.models.draft import frozen_tables

if TYPE_CHECKING:  # types only: the pool never drives a trainer itself
    from onspec.engine.drafter import Drafter
    from onspec.engine.role import Engine
    from onspec.engine.sequence import Request
    from onspec.engine.records import RequestOutput
    from onspec.online.worker import TrainerWorker

GENERAL = DEFAULT
"""The general draft's name (the engine's default drafter)."""
log = logging.getLogger("onspec.pool")


@dataclass
class PoolConfig:
    """Draft pool and routing."""

    drafts: int = option(1, "drafts in the pool, the general one included (1: one shared draft, no routing)")
    router: str = option("cluster", "how a query picks its draft", choices=ROUTERS)
    general_share: float = option(0.1, "share of routed queries served by the general draft anyway, to check that "
                                  "each specialist still beats it on its own route")
    open_after: int = option(8, "queries a language/field route needs before it gets its own draft")
    cluster_threshold: float = option(0.5, "cosine similarity a query needs to join a cluster")
    cluster_min_size: int = option(16, "queries a cluster needs before it gets its own draft")
    language_confidence: float = option(0.9, "language-id probability needed to route by language")
    check_window: int = option(24, "recent requests per route compared, specialist vs general")
    degrade_margin: float = option(0.05, "a specialist this much below the general draft on its route is degraded")

    def __post_init__(self) -> None:
        if self.drafts < 1:
            raise ValueError(f"--drafts must be >= 1, got {self.drafts}")
        if not 0 <= self.general_share < 1:
            raise ValueError(f"--general-share must be in [0, 1), got {self.general_share}")
        if self.open_after < 1 or self.cluster_min_size < 1 or self.check_window < 2:
            raise ValueError("--open-after and --cluster-min-size must be >= 1, --check-window >= 2")
        if not 0 < self.language_confidence <= 1:
            raise ValueError(f"--language-confidence must be in (0, 1], got {self.language_confidence}")


@dataclass
class Member:
    name: str
    engine: Engine
    """The engine every member shares (onspec's or vLLM's)."""
    drafter: Drafter | None
    """This member's draft in the engine (None: a target-only pool of one)."""
    trainer: TrainerWorker | None = None
    queries: int = 0
    degraded: bool = False

    @property
    def version(self) -> int:
        return self.drafter.version if self.drafter is not None else 0

    @property
    def draft(self) -> torch.nn.Module | None:
        return self.drafter.draft if self.drafter is not None else None

    def add(self, requests: Request | list[Request]) -> None:
        """Requests join the engine's batch, drafted by this member."""
        self.engine.add(requests, drafter=self.drafter.name if self.drafter is not None else None)

    def generate(self, requests: list[Request], on_finish=None) -> list[RequestOutput]:
        """Offline: decode requests to completion with this member's draft."""
        return self.engine.generate(requests, on_finish=on_finish,
                                    drafter=self.drafter.name if self.drafter is not None else None)


MemberFactory = Callable[[str, torch.nn.Module], Member]


@dataclass
class _RouteHealth:
    specialist: deque = field(default_factory=deque)
    general: deque = field(default_factory=deque)


class DraftPool:
    """Touched by one thread (the decoding thread), except that with `open_in_background` a new
    specialist is built on a thread of its own: its clone of the general draft is taken on the
    calling thread (so it never sees a half-applied swap), the rest (its drafter, the int8 copy, its
    trainer, its checkpoint) off it; `pick` returns None for a route whose draft is still being
    built, `ready` hands it over once built, and `on_opened` is called when one is."""

    def __init__(self, cfg: PoolConfig, general: Member, make_member: MemberFactory, seed: int = 0) -> None:
        self.cfg = cfg
        self.general = general
        self.members: dict[str, Member] = {}  # route key -> specialist
        self.make_member = make_member
        # the embedding table is shared between drafts only when no trainer ever changes it
        self.train_embeddings = general.trainer is not None and general.trainer.cfg.train_embeddings
        self.seen: dict[str, int] = defaultdict(int)
        self.health: dict[str, _RouteHealth] = defaultdict(_RouteHealth)
        self.checks = 0
        self.open_in_background = False
        self.on_opened: Callable[[], None] | None = None
        self._opening: set[str] = set()
        self._builders: list[threading.Thread] = []
        self._built: dict[str, Member | Exception] = {}  # written by the builder threads, under _lock
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    @property
    def engine(self) -> Engine:
        """The one engine whose target passes every member's rows share."""
        return self.general.engine

    @property
    def all_members(self) -> list[Member]:
        return [self.general, *self.members.values()]

    def pick(self, key: str | None, opens_at_once: bool = False) -> Member | None:
        """The member that serves a query with this route key (None key: the general draft; the
        key "general" is reserved for it too, whatever a client sends as its domain). None (only
        with `open_in_background`): the route's draft is being built; ask `ready`."""
        if key is None or key == GENERAL:
            return self.general
        self.seen[key] += 1
        member = self.members.get(key)
        if member is None:
            if key in self._opening:
                return None
            room = len(self.members) + len(self._opening) < self.cfg.drafts - 1
            if not room or not (opens_at_once or self.seen[key] >= self.cfg.open_after):
                return self.general
            if self.open_in_background:
                self._build(key, self._clone())
                return None
            member = self.open(key)
        return self._serve(member)

    def ready(self, key: str) -> Member | None:
        """For a query that `pick` answered None: its member once built (the general draft if the
        build failed), None while it is still being built."""
        with self._lock:
            built = self._built.pop(key, None)
        if built is None:
            return None if key in self._opening else self._serve(self.members.get(key, self.general))
        self._opening.discard(key)
        if isinstance(built, Exception):
            log.error("opening the draft for route %r failed (%s); the general draft serves it", key, built)
            return self.general
        self._adopt(key, built)
        return self._serve(built)

    def open(self, key: str) -> Member:
        """A specialist for `key`, cloned from the general draft as it is now (on this thread)."""
        member = self.make_member(key, self._clone())  # a fresh drafter (version 0) or one resumed from its checkpoint
        self._adopt(key, member)
        return member

    def _adopt(self, key: str, member: Member) -> None:
        """The member's drafter joins the engine (on the decoding thread, between steps)."""
        member.engine.add_drafter(member.drafter)
        self.members[key] = member

    def _clone(self) -> torch.nn.Module:
        draft = self.general.draft
        return copy.deepcopy(draft, memo=frozen_tables(draft, self.train_embeddings))

    def _build(self, key: str, clone: torch.nn.Module) -> None:
        def build() -> None:
            try:
                built: Member | Exception = self.make_member(key, clone)
            except Exception as e:  # reported by `ready`; the query falls back to the general draft
                built = e
            with self._lock:
                self._built[key] = built
            if self.on_opened is not None:
                self.on_opened()

        self._opening.add(key)
        builder = threading.Thread(target=build, name=f"onspec-open-{key}", daemon=True)
        self._builders = [t for t in self._builders if t.is_alive()] + [builder]
        builder.start()

    def wait_built(self) -> None:
        """Wait for the drafts being built on their threads (at shutdown: a thread still inside
        torch when the interpreter exits aborts the process, "terminate called without an active
        exception"). What they built is left unadopted."""
        for builder in self._builders:
            builder.join()
        self._builders = []

    def _serve(self, member: Member) -> Member:
        """A specialist, unless it is degraded or this query is one of the general draft's checks."""
        if member is self.general or member.degraded:
            return self.general
        if self.cfg.general_share and self._rng.random() < self.cfg.general_share:
            self.checks += 1
            return self.general
        return member

    def observe(self, key: str | None, member: Member, alpha: float | None) -> None:
        """After a request: keep the recent alpha per route of the specialist and of the general
        draft, and degrade a specialist that the general draft beats on its own route."""
        member.queries += 1
        if key is None or alpha is None or key not in self.members:
            return
        h = self.health[key]
        side = h.general if member is self.general else h.specialist
        side.append(alpha)
        while len(side) > self.cfg.check_window:
            side.popleft()
        spec = self.members[key]
        enough = min(len(h.specialist), len(h.general)) >= max(2, self.cfg.check_window // 4)
        if not spec.degraded and enough and _mean(h.general) > _mean(h.specialist) + self.cfg.degrade_margin:
            spec.degraded = True

    def stats(self) -> dict:
        out = {}
        for m in self.all_members:
            h = self.health.get(m.name)
            out[m.name] = {"version": m.version, "queries": m.queries, "degraded": m.degraded,
                           "updates": m.trainer.distiller.updates if m.trainer else 0,
                           "rollbacks": m.trainer.distiller.rollbacks if m.trainer else 0,
                           "recent_alpha": _mean(h.specialist) if h else None,
                           "general_alpha_on_route": _mean(h.general) if h else None}
        return {"drafts": len(self.all_members), "general_checks": self.checks, "members": out,
                "memory_bytes": self.memory_bytes(), "memory_bytes_per_extra_draft": self.memory_per_extra_draft()}

    def memory_bytes(self, members: list[Member] | None = None) -> int:
        """Bytes of distinct tensor storages held by these members' drafts, students and optimizer
        state (shared tables counted once)."""
        seen, total = set(), 0
        for m in members if members is not None else self.all_members:
            for t in _tensors(m):
                storage = t.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def memory_per_extra_draft(self) -> float | None:
        extra = len(self.members)
        if not extra:
            return None
        return (self.memory_bytes() - self.memory_bytes([self.general])) / extra

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_manifest(self, root: Path, router_state: dict | None = None) -> None:
        """Which routes have specialists (each member checkpoints into its own directory), written
        durably: a temporary file, fsynced, renamed over the old one, the directory fsynced. Never
        raises for a write that fails (a full or read-only state directory, at shutdown too): one
        log line, and the previous files stay as they were."""
        manifest = {"members": {k: {"degraded": m.degraded, "queries": m.queries} for k, m in self.members.items()},
                    "seen": dict(self.seen)}
        try:
            root.mkdir(parents=True, exist_ok=True)
            replace_synced(root / "pool.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
            if router_state is not None:
                replace_synced(root / "router.pt", lambda f: torch.save(router_state, f))
        except OSError as e:
            log.error("could not write the pool's manifest into %s: %s; the previous one is kept", root, e)

    def restore(self, root: Path) -> dict | None:
        """Re-open the specialists a previous run had (their trainers resume their own
        checkpoints). Returns the router state saved with them, if any. An unreadable manifest or
        router state is logged and skipped: the general draft serves every route until they reopen."""
        path = root / "pool.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            members = dict(manifest["members"])
            self.seen.update({str(k): int(v) for k, v in manifest.get("seen", {}).items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s is unreadable (%s); the pool starts with the general draft only", path, e)
            return None
        for key, info in members.items():
            if key == GENERAL:  # reserved (a manifest written before it was)
                continue
            member = self.members.get(key) or self.open(key)
            member.degraded = bool(info.get("degraded", False))
            member.queries = int(info.get("queries", 0))
        router = root / "router.pt"
        if not router.is_file():
            return {}
        try:
            return torch.load(router, weights_only=True)
        except Exception as e:  # a torn or foreign file: the router starts afresh
            log.warning("%s is unreadable (%s); the router starts afresh", router, e)
            return {}


def _tensors(m: Member):
    yield from m.draft.parameters()
    if m.trainer is not None:
        yield from m.trainer.distiller.student.parameters()
        for state in m.trainer.distiller.optimizer.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v) and v.numel() > 1)


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
