"""Start and stop an onspec cluster: the hub, the trainer actor, and N engine replicas behind
Ray Serve's HTTP proxy (`onspec serve --replicas N`, tests, experiments/load.py)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import ray
from ray import serve

from onspec.cluster.config import ClusterConfig
from onspec.cluster.hub import Hub
from onspec.cluster.replica import EngineReplica, ReplicaSpec
from onspec.cluster.trainer import TrainerActor
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.loading import resolve_device
from onspec.models.pair import ModelConfig
from onspec.online.distiller import TrainerConfig
from onspec.pool.pool import PoolConfig
from onspec.serve.config import ServerConfig

log = logging.getLogger("onspec.cluster")

NAMESPACE = "onspec"
HUB = "onspec-hub"
TRAINER = "onspec-trainer"
APP = "onspec"


@dataclass
class RunningCluster:
    url: str
    hub: object
    trainer: object | None
    started_ray: bool
    startup_s: dict = field(default_factory=dict)
    """Seconds: ray (init or join), trainer (load + resume), replicas (load, serve ready), total."""

    def state(self) -> dict:
        """The hub's view: versions, every replica's version and age, rollbacks, swap latency."""
        return ray.get(self.hub.state.remote())

    def close(self, timeout: float = 60.0) -> dict | None:
        """Replicas drain (Serve waits for their running requests) and stop; then the trainer
        writes its final checkpoint; then Ray stops if this process started it. Each step runs
        whatever the one before did; a step that fails is one log line (Ray's errors run to many).
        Returns the trainer's last stats (None without a trainer or when it could not answer)."""
        stats = None
        try:
            serve.delete(APP)
        except Exception as e:
            log.error("the replicas did not stop cleanly: %s", _one_line(e))
        if self.trainer is not None:
            try:
                stats = ray.get(self.trainer.close.remote(), timeout=timeout)
            except Exception as e:  # the trainer is gone, or its final checkpoint ran past `timeout`
                log.error("the trainer's final checkpoint failed: %s", _one_line(e))
        try:
            serve.shutdown()
        except Exception as e:
            log.error("Serve did not shut down cleanly: %s", _one_line(e))
        finally:
            if self.started_ray:
                ray.shutdown()
        return stats


def _one_line(e: BaseException) -> str:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:300]}"


def start_cluster(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
                  trainer_cfg: TrainerConfig, server_cfg: ServerConfig, cluster_cfg: ClusterConfig,
                  pool_cfg: PoolConfig | None = None) -> RunningCluster:
    if cluster_cfg.replicas < 1:
        raise ValueError("a cluster needs --replicas >= 1")
    if pool_cfg is not None and pool_cfg.drafts > 1:
        raise ValueError("--replicas does not combine with --drafts > 1 (one general draft per cluster for now)")
    server_cfg = server_cfg.resolved("onspec")
    if model_cfg.no_draft and server_cfg.learns_draft:
        raise ValueError("--no-draft has no draft to train: drop --learn draft/both (or add --no-online)")
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    port = server_cfg.port or _free_port(server_cfg.host)  # Serve's proxy needs a fixed port
    started = not ray.is_initialized()
    if started:
        caller_sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(address=cluster_cfg.ray_address, namespace=NAMESPACE, include_dashboard=False,
                 logging_level=logging.WARNING)
        if caller_sigterm is not None and threading.current_thread() is threading.main_thread():
            # ray.init sets its own, which exits at once (sys.exit): the caller's stays in charge
            signal.signal(signal.SIGTERM, caller_sigterm)
    times["ray"] = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    threads = cluster_cfg.replica_threads or max(1, cores // cluster_cfg.replicas)
    gpus = cluster_cfg.replica_gpus
    if gpus < 0:
        gpus = 1.0 if resolve_device(model_cfg.device).type == "cuda" else 0.0
    online = server_cfg.learns_draft and not model_cfg.no_draft
    try:
        hub = ray.remote(Hub).options(name=HUB, namespace=NAMESPACE, num_cpus=0, max_restarts=-1).remote(
            cluster_cfg.rollback_tolerance, cluster_cfg.rollback_min_tokens)
        trainer = None
        if online:
            t = time.perf_counter()
            trainer = ray.remote(TrainerActor).options(
                name=TRAINER, namespace=NAMESPACE, num_cpus=0, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
                max_concurrency=8,
            ).remote(model_cfg, trainer_cfg, server_cfg.state_dir, (NAMESPACE, HUB), server_cfg.persist_traffic,
                     trainer_cfg.trainer_threads or threads)
            ray.get(trainer.ready.remote())  # also converts a named model once, before the replicas load it
            times["trainer"] = time.perf_counter() - t
        spec = ReplicaSpec(model_cfg, engine_cfg, policy_cfg, trainer_cfg if online else None, server_cfg,
                           cluster_cfg, NAMESPACE, HUB, TRAINER, threads)
        t = time.perf_counter()
        # Serve's controller, proxy and replicas log warnings and errors, as uvicorn does behind
        # `onspec serve` (not every request, nor every step of a deploy)
        deployment = serve.deployment(serve.ingress()(EngineReplica), name="EngineReplica",
                                      num_replicas=cluster_cfg.replicas,
                                      max_ongoing_requests=server_cfg.max_batch + server_cfg.max_queue + 8,
                                      graceful_shutdown_timeout_s=server_cfg.shutdown_timeout,
                                      health_check_period_s=2.0, health_check_timeout_s=60.0,
                                      max_replicas_per_node=cluster_cfg.max_replicas_per_node or None,
                                      logging_config={"log_level": "WARNING"},
                                      ray_actor_options={"num_cpus": 0, "num_gpus": gpus})
        serve.start(http_options={"host": server_cfg.host, "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(deployment.bind(spec), name=APP, route_prefix="/", blocking=False)
        _wait_running(timeout=600)
        times["replicas"] = time.perf_counter() - t
    except BaseException:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
        raise
    times["total"] = time.perf_counter() - t0
    host = f"[{server_cfg.host}]" if ":" in server_cfg.host else server_cfg.host
    return RunningCluster(f"http://{host}:{port}", hub, trainer, started, times)


def _wait_running(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the replicas failed to start: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"the replicas were not ready after {timeout:.0f} s")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_cluster_serve(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
                      trainer_cfg: TrainerConfig, server_cfg: ServerConfig, cluster_cfg: ClusterConfig,
                      pool_cfg: PoolConfig | None = None) -> None:
    """`onspec serve --replicas N`: start, print the address, serve until SIGINT/SIGTERM, stop.
    A signal while the cluster starts stops what has started; one after it drains the replicas and
    writes the trainer's final checkpoint (`RunningCluster.close`). Either way the process says so
    in a line and exits 0; a second signal changes nothing (the final checkpoint is not cut short)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's Serve client, as start_cluster's
    print(f"onspec serve: starting {cluster_cfg.replicas} replicas on Ray "
          f"({cluster_cfg.ray_address or 'a local instance'}) ...", file=sys.stderr, flush=True)
    stop, running = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()
        if not running.is_set():  # out of start_cluster, which stops what it started; Ray's blocking
            raise KeyboardInterrupt  # calls give this one back as raised (another becomes a SystemError)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    cluster = None
    try:
        cluster = start_cluster(model_cfg, engine_cfg, policy_cfg, trainer_cfg, server_cfg, cluster_cfg, pool_cfg)
        running.set()
    except KeyboardInterrupt:
        if cluster is None:
            print("onspec serve: stopped while starting", file=sys.stderr, flush=True)
            return
        running.set()  # the signal came just after the start: stop as below
    state = cluster.state()
    print(f"onspec serve: {server_cfg.served_model_name or model_cfg.target_name} on {cluster.url} "
          f"({len(state['replicas'])} replicas, draft v{state['version'] if state['version'] is not None else 0}, "
          f"online {'on' if cluster.trainer is not None else 'off'}, started in {cluster.startup_s['total']:.0f} s; "
          f"dashboard: /dashboard, metrics: /metrics)", file=sys.stderr, flush=True)
    stop.wait()
    print("onspec serve: stopping (replicas drain, then the trainer's final checkpoint)", file=sys.stderr, flush=True)
    cluster.close()
    print("onspec serve: stopped", file=sys.stderr, flush=True)
