"""`onspec serve`: load the pair, resume the draft from the state directory, start the scheduler
and (unless --no-online) the online trainer, and run uvicorn until SIGINT/SIGTERM; then write the
final checkpoint (and, only with --persist-traffic, the buffered traffic)."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.distiller import TrainerConfig
from onspec.pool.pool import GENERAL, Member, PoolConfig
from onspec.wiring import build_pool
from onspec.serve.app import ServerState, create_app
from onspec.serve.config import ServerConfig
from onspec.serve.metrics import ServerMetrics
from onspec.serve.scheduler import Scheduler

log = logging.getLogger("onspec.serve")


def build_state(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
                trainer_cfg: TrainerConfig, cfg: ServerConfig, pool_cfg: PoolConfig | None = None) -> ServerState:
    pool_cfg = pool_cfg or PoolConfig()
    target, draft = load_pair(model_cfg)
    state_dir = Path(cfg.state_dir)

    def reload_traffic(member: Member) -> None:
        traffic = _traffic_file(state_dir, member.name)
        if member.trainer is not None and cfg.persist_traffic and traffic.is_file():
            log.info("reloaded %d buffered requests from %s", member.trainer.buffer.load(traffic), traffic)

    pool, router = build_pool(target.model, target.tokenizer, draft.model if draft else None, engine_cfg, policy_cfg,
                              pool_cfg, trainer_cfg=None if cfg.no_online else trainer_cfg,
                              checkpoints=state_dir / "checkpoints", on_member=reload_traffic)
    metrics = ServerMetrics(pool.general.engine.k)
    for m in pool.all_members:
        metrics.add_draft(m.name)
    scheduler = Scheduler(pool, metrics, router, max_batch=cfg.max_batch)
    name = cfg.served_model_name or model_cfg.target_name
    return ServerState(engine=pool.general.engine, scheduler=scheduler, metrics=metrics, cfg=cfg, model_name=name,
                       pool=pool, router=router)


def shutdown(state: ServerState) -> None:
    state.scheduler.close()
    for m in state.pool.all_members:
        if m.trainer is None:
            continue
        m.trainer.close()  # waits for a running update, writes the final checkpoint
        if state.cfg.persist_traffic:
            path = _traffic_file(Path(state.cfg.state_dir), m.name)
            log.info("wrote %d buffered requests to %s", m.trainer.buffer.save(path), path)
    if state.router is not None:
        state.pool.save_manifest(Path(state.cfg.state_dir) / "checkpoints", state.router.state_dict())


def _traffic_file(state_dir: Path, name: str) -> Path:
    return state_dir / ("traffic.pt" if name == GENERAL else f"traffic-{name}.pt")


def run_serve(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
              trainer_cfg: TrainerConfig, cfg: ServerConfig, pool_cfg: PoolConfig | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock = _bind(cfg.host, cfg.port)  # before loading: a taken port fails fast
    print(f"onspec serve: loading models ({model_cfg.target}) ...", file=sys.stderr, flush=True)
    state = build_state(model_cfg, engine_cfg, policy_cfg, trainer_cfg, cfg, pool_cfg)
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    state.scheduler.start()
    host, port = sock.getsockname()[:2]
    print(f"onspec serve: {state.model_name} (draft v{state.engine.draft_version}, "
          f"online {'off' if state.trainer is None else 'on'}, drafts {len(state.pool.all_members)}"
          f"{'' if state.router is None else ' max ' + str(state.pool.cfg.drafts) + ', router ' + state.router.name}) on http://{host}:{port}  "
          f"(dashboard: /dashboard, metrics: /metrics)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=5))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # that was there before it: make that one stop us cleanly (checkpoint first), not kill us
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown(state)
        print("onspec serve: stopped", file=sys.stderr, flush=True)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop()


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
