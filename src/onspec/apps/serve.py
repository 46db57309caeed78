"""`onspec serve`: load the pair, resume the draft from the state directory, start the scheduler
and (unless --no-online) the online trainer, and run uvicorn until SIGINT/SIGTERM; then drain
(new requests get 503, running ones get --shutdown-timeout seconds, the rest an error of their
own), write the final checkpoint and the suffix learner's state (and, only with --persist-traffic, the
buffered traffic) and exit 0.
The state directory is created 0700 and the traffic file written 0600: both hold user traffic."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import uvicorn

from onspec.models import kernels
from onspec.durable import replace_synced
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.engine.suffix import SuffixLearner
from onspec.engine.role import BackendConfig
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.buffer import save_traffic
from onspec.online.distiller import TrainerConfig
from onspec.pool.pool import GENERAL, Member, PoolConfig
from onspec.wiring import build_pool, member_dir
from onspec.serve.app import ServerState, create_app, learning
from onspec.serve.config import ServerConfig
from onspec.serve.guard import Gate, is_loopback
from onspec.serve.metrics import ServerMetrics
from onspec.serve.scheduler import Scheduler

log = logging.getLogger("onspec.serve")


def build_state(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
                trainer_cfg: TrainerConfig, cfg: ServerConfig, pool_cfg: PoolConfig | None = None) -> ServerState:
    pool_cfg = pool_cfg or PoolConfig()
    cfg = cfg.resolved("onspec")
    if pool_cfg.drafts > 1 and cfg.learn == "suffix":
        raise ValueError("--drafts > 1 trains a draft per kind of traffic: add --learn draft (or both)")
    if cfg.learn == "draft":
        engine_cfg = replace(engine_cfg, no_suffix=True)  # the draft model alone, as before the suffix learner
    target, draft = load_pair(model_cfg)
    state_dir = Path(cfg.state_dir)
    _private_dir(state_dir)

    def reload_traffic(member: Member) -> None:
        _reload_traffic(state_dir, cfg, member)

    pool, router = build_pool(target.model, target.tokenizer, draft.model if draft else None, engine_cfg, policy_cfg,
                              pool_cfg, trainer_cfg=trainer_cfg if cfg.learns_draft else None,
                              checkpoints=state_dir / "checkpoints", on_member=reload_traffic)
    suffix = pool.general.engine.suffix
    if suffix is not None:
        load_suffix(suffix, state_dir / SUFFIX_FILE)
        suffix.frozen = not cfg.learns_suffix  # served as it was saved, learning nothing more
    metrics = ServerMetrics(pool.general.engine.k)
    for m in pool.all_members:
        metrics.add_draft(m.name)
    host = kernels.describe(target.quant)
    metrics.set_host(host)
    scheduler = Scheduler(pool, metrics, router, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    name = cfg.served_model_name or model_cfg.target_name
    return ServerState(engine=pool.general.engine, scheduler=scheduler, metrics=metrics, cfg=cfg, model_name=name,
                       pool=pool, router=router, kernels=host)


def build_vllm_state(model_cfg: ModelConfig, engine_cfg: EngineConfig, trainer_cfg: TrainerConfig, cfg: ServerConfig,
                     backend: BackendConfig, rollback_tolerance: float = 0.05,
                     rollback_min_tokens: int = 512) -> ServerState:
    """`--engine vllm`: vLLM decodes behind onspec's server (the same scheduler, guard, metrics and
    dashboard); the trainer learns the draft from what it served and writes each version into it."""
    from onspec.wiring import build_vllm_pool

    cfg = cfg.resolved("vllm")
    backend.check(server=cfg)  # the model, engine and trainer options: in build_vllm_pool
    state_dir = Path(cfg.state_dir)
    _private_dir(state_dir)
    pool = build_vllm_pool(model_cfg, engine_cfg, backend, trainer_cfg if cfg.learns_draft else None,
                           state_dir / "checkpoints", rollback_tolerance=rollback_tolerance,
                           rollback_min_tokens=rollback_min_tokens)
    member = pool.general
    _reload_traffic(state_dir, cfg, member)
    metrics = ServerMetrics(member.engine.k)
    metrics.add_draft(member.name)
    host = kernels.describe("vllm (its own CPU kernels)")
    metrics.set_host(host)
    scheduler = Scheduler(pool, metrics, None, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    name = cfg.served_model_name or model_cfg.target_name
    return ServerState(engine=member.engine, scheduler=scheduler, metrics=metrics, cfg=cfg, model_name=name,
                       pool=pool, router=None, kernels=host)


def shutdown(state: ServerState) -> None:
    state.scheduler.close()  # after its current step: no thread of ours is left inside torch at exit
    state.pool.wait_built()
    if state.engine.suffix is not None and not state.engine.suffix.frozen:
        save_suffix(state.engine.suffix, Path(state.cfg.state_dir) / SUFFIX_FILE)
    for m in state.pool.all_members:
        if m.trainer is None:
            continue
        m.trainer.close()  # waits for a running update, writes the final checkpoint
        if state.cfg.persist_traffic:
            save_traffic(m.trainer.buffer, _traffic_file(Path(state.cfg.state_dir), m.name))  # never raises
    if state.router is not None:  # never raises either
        state.pool.save_manifest(Path(state.cfg.state_dir) / "checkpoints", state.router.state_dict())
    state.engine.close()


SUFFIX_FILE = "suffix.safetensors"
"""The suffix learner's state in the state directory: the served outputs it learned (user traffic:
owner-only) and its acceptance estimates."""


def load_suffix(suffix: SuffixLearner, path: Path) -> None:
    """Resume the suffix learner from `path` if it is there; one that cannot be read is set aside
    (renamed `.corrupt`) with one log line, and the learner starts empty."""
    if not path.is_file():
        return
    try:
        suffix.load_state_dict(safetensors.torch.load_file(str(path)))
        log.info("resumed the suffix learner from %s (%d outputs, version %d)", path, len(suffix.history),
                 suffix.version)
    except Exception as e:  # a torn or foreign file must not stop the server
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("could not resume the suffix learner from %s (%s: %s); set aside as %s, starting empty",
                    path, type(e).__name__, e, aside)
        suffix.load_state_dict(SuffixLearner(suffix.max_depth).state_dict())


def save_suffix(suffix: SuffixLearner, path: Path) -> None:
    """Durably (temporary file, fsync, rename) and owner-only; a failed write is one log line."""
    try:
        data = safetensors.torch.save(suffix.state_dict())
        replace_synced(path, lambda f: f.write(data), private=True)
        log.info("wrote the suffix learner (%d outputs, version %d) to %s", len(suffix.history), suffix.version, path)
    except OSError as e:
        log.error("could not write the suffix learner to %s: %s", path, e)


def _reload_traffic(state_dir: Path, cfg: ServerConfig, member: Member) -> None:
    """With --persist-traffic: a learning member's buffer takes back the traffic written at the last shutdown."""
    traffic = _traffic_file(state_dir, member.name)
    if member.trainer is not None and cfg.persist_traffic and traffic.is_file():
        _private_file(traffic)
        log.info("reloaded %d buffered requests from %s", member.trainer.buffer.load(traffic), traffic)


def _traffic_file(state_dir: Path, name: str) -> Path:
    """A member's buffered traffic: a specialist's name is a client's route key, so its file is
    named as its checkpoint directory is (`member_dir`: a safe slug and a hash, never a path)."""
    return state_dir / ("traffic.pt" if name == GENERAL else f"traffic-{member_dir(Path(), name).name}.pt")


def _private_dir(path: Path) -> None:
    """Create the state directory 0700 (an existing one is left as the operator made it)."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        path.chmod(0o700)  # mkdir's mode goes through the umask


def _private_file(path: Path) -> None:
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        path.chmod(0o600)


def run_serve(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
              trainer_cfg: TrainerConfig, cfg: ServerConfig, pool_cfg: PoolConfig | None = None,
              backend: BackendConfig | None = None, rollback: tuple[float, int] = (0.05, 512)) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    bounded_malloc()
    sock = _bind(cfg.host, cfg.port)  # before loading: a taken port fails fast
    warning = exposure_warning(cfg)
    if warning:
        log.warning(warning)
    print(f"onspec serve: loading models ({model_cfg.target}) ...", file=sys.stderr, flush=True)
    if backend is not None and backend.vllm:
        state = build_vllm_state(model_cfg, engine_cfg, trainer_cfg, cfg, backend, *rollback)
    else:
        state = build_state(model_cfg, engine_cfg, policy_cfg, trainer_cfg, cfg, pool_cfg)
    state.scheduler.start()
    host, port = sock.getsockname()[:2]
    engine = {"vllm": "vLLM"}.get(state.engine.name, state.engine.name)
    print(f"onspec serve: {state.model_name} ({engine} engine, draft v{state.engine.draft_version}, "
          f"learning {learning(state)}, drafts {len(state.pool.all_members)}"
          f"{'' if state.router is None else ' max ' + str(state.pool.cfg.drafts) + ', router ' + state.router.name}) on http://{host}:{port}  "
          f"(dashboard: /dashboard, metrics: /metrics)", file=sys.stderr, flush=True)
    if state.kernels:
        print(f"onspec serve: {state.kernels['cpu']} CPU with {state.kernels['vector']}; "
              f"kernel path {state.kernels['kernels']}", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(state), log_level="warning", http=_h11_with_read_timeout(cfg.read_timeout),
                            limit_concurrency=cfg.max_connections, timeout_graceful_shutdown=5)
    server = _DrainingServer(config, state.gate, cfg.shutdown_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        # the final checkpoint must not be cut short by an impatient second signal
        previous = {sig: signal.signal(sig, _saving) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            shutdown(state)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print("onspec serve: stopped", file=sys.stderr, flush=True)


def bounded_malloc() -> bool:
    """glibc's allocator, set as MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072 would: at most 2
    arenas, and large blocks always mmapped (returned to the system when freed). With its defaults a
    server whose trainer runs on its own thread grew about 0.5 GB every 10 minutes (per-thread arenas
    and a mmap threshold that rises after each large free keep freed memory; docs/results.md, soak).
    An allocator already set by the environment is left alone. Returns whether glibc took both."""
    if "MALLOC_ARENA_MAX" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # malloc.h
        return bool(libc.mallopt(M_ARENA_MAX, 2)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 131072))
    except (OSError, AttributeError):  # not glibc (musl, ...): its own allocator stays
        return False


def exposure_warning(cfg: ServerConfig) -> str | None:
    """What to say when the server is reachable beyond this machine with no key."""
    if cfg.api_key is not None or is_loopback(cfg.host):
        return None
    return (f"bound to {cfg.host} without --api-key: anyone who can reach this port can use the model, read "
            f"/metrics and /dashboard; set --api-key (and --protect-metrics) or bind 127.0.0.1")


def _saving(signum, frame) -> None:
    log.warning("signal %d while saving state: ignored (the final checkpoint is being written)", signum)


class _DrainingServer(uvicorn.Server):
    """uvicorn with a drain in front of its own shutdown (whose grace is a fixed few seconds, after
    which it cancels requests mid-response). The first SIGTERM/SIGINT starts `Gate.drain`: new
    generation requests get 503, running ones may finish for `shutdown_timeout` s, the rest are
    ended with an error of their own; then uvicorn shuts down with nothing left running. A second
    signal ends the running requests at once. The signal is not re-raised: the process exits 0."""

    def __init__(self, config: uvicorn.Config, gate: Gate, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.gate, self.shutdown_timeout = gate, shutdown_timeout
        self.signals = 0
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:  # a signal handler: only note it; `on_tick` acts on the loop
        self.signals += 1

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self._drain is None:
            self._drain = asyncio.ensure_future(self.gate.drain(self.shutdown_timeout))
        if self.signals > 1 and not self.gate.ended:
            log.warning("second signal: ending the running requests now")
            self.gate.end_all()
        if self._drain is not None and self._drain.done():
            return True
        return await super().on_tick(counter)


def _h11_with_read_timeout(read_timeout: float):
    """uvicorn's h11 protocol with a deadline on a request's head: a connection that has not sent a
    whole request head `read_timeout` s after it opened (or after its last response) is closed.
    uvicorn has none (its keep-alive timer is disarmed by the first byte, so a client sending one
    header byte at a time holds a connection forever). The body's deadline is in `guard.Guard`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithReadTimeout(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(read_timeout, self._head_late)

        def _head_late(self) -> None:
            self._head_timer = None
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return H11WithReadTimeout


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror}") from None
    # listen now: a client that connects once the address is printed waits in the backlog until
    # uvicorn accepts, instead of being refused while the models load and uvicorn starts
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
