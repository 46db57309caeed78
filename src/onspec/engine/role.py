"""The engine's role, as the server, the pool, replay and bench drive it, and the config that
chooses who plays it (`--engine`): onspec's own `SpeculativeEngine` (engine/engine.py) or vLLM
(`VllmEngine`, engine/vllm_engine.py: vLLM decodes and verifies with its draft_model speculation,
onspec learns the draft and writes each version into it). Both satisfy `Engine`; callers use
nothing else, and `BackendConfig.check` is the one place where what vLLM cannot run is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from onspec.config import option

if TYPE_CHECKING:
    from onspec.engine.drafter import Drafter
    from onspec.engine.records import RequestOutput, StepOutput
    from onspec.engine.sequence import Request
    from onspec.engine.suffix import SuffixLearner


class Engine(Protocol):
    name: str
    """'onspec' or 'vllm'."""
    tokenizer: object
    drafter: "Drafter | None"
    """The default draft (the pool's general one): its weights, version and swap."""
    drafters: dict
    proposers: list
    """Model-free proposers beside the drafts (engine/proposer.py)."""
    teacher_top_k: int

    @property
    def k(self) -> int: ...

    @property
    def draft_version(self) -> int: ...

    @property
    def suffix(self) -> "SuffixLearner | None": ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int:
        """Of `num_running`, requests that wait inside the engine and hold no decoding slot."""

    def check(self, request: "Request") -> None:
        """Raise InvalidRequest if this engine cannot run the request."""

    def add(self, requests: "Request | list[Request]", drafter: str | None = None) -> None: ...

    def step(self) -> list["StepOutput"]: ...

    def cancel(self, request_id: str) -> "StepOutput | None": ...

    def generate(self, requests: list["Request"], on_finish: Callable | None = None,
                 drafter: str | None = None) -> list["RequestOutput"]: ...

    def offer_draft(self, state_dict: dict, version: int, alpha_hint: float | None = None) -> None:
        """New draft weights, live at the start of the next step."""

    def apply_pending_swap(self) -> bool: ...

    def health(self) -> dict:
        """For /health: which engine, and what it watches live."""

    def stats(self) -> dict:
        """For reports: the engine's own counters."""

    def close(self) -> None:
        """Release what it holds (vLLM's engine core); running requests end."""


@dataclass
class BackendConfig:
    """The engine that decodes (--engine), and vLLM's options when it is vLLM."""

    engine: str = option("onspec", "onspec (its own engine) or vllm (vLLM decodes and verifies with its draft_model "
                         "speculation, in this process; onspec learns the draft and writes each version into it)",
                         choices=("onspec", "vllm"))
    vllm_kv_cache_gib: int = option(2, "vLLM's KV cache on a CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)")
    vllm_max_model_len: int = option(0, "the longest prompt + output vLLM accepts (its max_model_len), at most the "
                                     "model's own context; 0: the model's own context")
    vllm_compile: bool = option(False, "let vLLM compile the models (torch.compile; a much longer start-up); off: eager")
    vllm_cpu_bind: str = option("", "the CPUs vLLM binds its OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND, a list "
                                "such as 0-1); default: every CPU this process may use")

    def __post_init__(self) -> None:
        if self.engine not in ("onspec", "vllm"):
            raise ValueError(f"--engine must be onspec or vllm, got {self.engine!r}")
        if self.vllm_kv_cache_gib < 1:
            raise ValueError(f"--vllm-kv-cache-gib must be >= 1, got {self.vllm_kv_cache_gib}")
        if self.vllm_max_model_len < 0:
            raise ValueError(f"--vllm-max-model-len must be >= 0, got {self.vllm_max_model_len}")

    @property
    def vllm(self) -> bool:
        return self.engine == "vllm"

    def check(self, *, model=None, engine=None, trainer=None, server=None, pool=None, cluster=None) -> None:
        """Every option that `--engine vllm` cannot honour, refused with what to do instead (the
        one place; each command passes the configs it has)."""
        if not self.vllm:
            return
        if engine is not None and engine.forward != "auto":
            raise ValueError("--forward chooses the pass of onspec's own engine; with --engine vllm, vLLM runs its own")
        if model is not None and model.target_quant not in ("none", "auto"):
            raise ValueError(f"--target-quant {model.target_quant} quantizes onspec's own engine's target; vLLM "
                             "loads its target from the model's files as they are (drop the flag with --engine vllm)")
        if trainer is not None and trainer.data_source != "teacher":
            raise ValueError("--engine vllm learns from the served outputs (--data-source teacher): student-sampled "
                             "data needs the target's logits on the draft's own samples, which vLLM does not expose")
        if server is not None and server.learns_suffix:
            raise ValueError("--engine vllm learns the draft model (--learn draft): vLLM runs one speculative method "
                             "per engine, and onspec's suffix learner and its controller are not one it can run "
                             "beside the draft; use onspec's own engine for --learn suffix or both")
        if pool is not None and pool.drafts > 1:
            raise ValueError("--engine vllm serves one draft: drop --drafts")
        if cluster is not None and cluster.replicas:
            raise ValueError("--replicas with --engine vllm is not built: run one `onspec serve --engine vllm` per "
                             "machine (docs/design.md says how one trainer would feed several)")
