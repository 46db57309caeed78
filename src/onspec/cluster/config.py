"""The flags of `onspec serve --replicas N` (no Ray import: the CLI reads this without it)."""

from __future__ import annotations

from dataclasses import dataclass

from onspec.config import option


@dataclass
class ClusterConfig:
    """Ray cluster (with --replicas)."""

    replicas: int = option(0, "serve with N engine replicas on Ray behind one endpoint, all feeding one trainer actor "
                           "(0: one process, Ray is not imported)")
    ray_address: str | None = option(None, "join this running Ray cluster (e.g. 10.0.0.5:6379) instead of starting a "
                                     "local one")
    replica_threads: int = option(0, "torch threads per replica (0: this machine's cores divided among the replicas)")
    replica_gpus: float = option(-1.0, "GPUs per replica (-1: 1 with a CUDA --device, so one replica per GPU; else 0)")
    max_replicas_per_node: int = option(0, "most replicas Ray places on one node (0: no limit; 1 spreads them, one "
                                        "per machine)")
    max_pending_sends: int = option(4, "batches of verify records a replica may have in flight to the trainer; beyond, "
                                    "new records are dropped and counted (decoding never waits for the trainer)")
    rollback_tolerance: float = option(0.05, "global rollback: every replica returns to the last good draft when the "
                                       "live alpha under a new version is this far below the last good version's "
                                       "(with --engine vllm: the live guard on vLLM's own counters)")
    rollback_min_tokens: int = option(512, "draft tokens proposed under a version (all replicas) before its live "
                                      "alpha is judged")

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"--replicas must be >= 0, got {self.replicas}")
        if self.replica_threads < 0:
            raise ValueError(f"--replica-threads must be >= 0, got {self.replica_threads}")
        if self.max_replicas_per_node < 0:
            raise ValueError(f"--max-replicas-per-node must be >= 0, got {self.max_replicas_per_node}")
        if self.max_pending_sends < 1:
            raise ValueError(f"--max-pending-sends must be >= 1, got {self.max_pending_sends}")
        if not 0 <= self.rollback_tolerance <= 1:
            raise ValueError(f"--rollback-tolerance must be in [0, 1], got {self.rollback_tolerance}")
        if self.rollback_min_tokens < 1:
            raise ValueError(f"--rollback-min-tokens must be >= 1, got {self.rollback_min_tokens}")
