"""What the server counts: vLLM-style speculative decoding counters, alpha over a recent window,
the trainer's state, requests, tokens and latencies (Prometheus), plus a short timeline for the
dashboard. Written by the scheduler thread, read by HTTP handlers: a lock guards the timeline."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from onspec.engine.records import RequestOutput, StepOutput

PREFIX = "onspec:"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)  # vLLM's


class ServerMetrics:
    def __init__(self, k: int, window: int = 64, timeline: int = 2000) -> None:
        self.registry = r = CollectorRegistry()
        self.window = window
        self.k = k
        d = ["draft"]  # the pool member that proposed ("general" when there is one draft)
        self.num_drafts = Counter(f"{PREFIX}spec_decode_num_drafts", "verify steps that checked draft tokens", d,
                                  registry=r)
        self.num_draft_tokens = Counter(f"{PREFIX}spec_decode_num_draft_tokens", "draft tokens proposed", d,
                                        registry=r)
        self.num_accepted_tokens = Counter(f"{PREFIX}spec_decode_num_accepted_tokens", "draft tokens accepted", d,
                                           registry=r)
        self.accepted_per_pos = Counter(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos",
                                        "draft tokens accepted, by position in the proposal (0 = first)",
                                        ["draft", "position"], registry=r)
        self.alpha = Gauge(f"{PREFIX}spec_decode_alpha_recent",
                           f"accepted / evaluated draft tokens over the last {window} finished requests", registry=r)
        self.draft_alpha = Gauge(f"{PREFIX}spec_decode_alpha_recent_by_draft", "recent alpha of each pool member",
                                 d, registry=r)
        self.draft_version = Gauge(f"{PREFIX}draft_version", "draft version serving now", d, registry=r)
        self.updates = Gauge(f"{PREFIX}trainer_updates", "accepted draft updates", d, registry=r)
        self.rollbacks = Gauge(f"{PREFIX}trainer_rollbacks", "updates rolled back by the guard", d, registry=r)
        self.discarded = Gauge(f"{PREFIX}trainer_discarded_nan", "updates discarded for a NaN/inf loss", d, registry=r)
        self.trainer_time = Gauge(f"{PREFIX}trainer_time_seconds", "wall-clock time spent training", d, registry=r)
        self.buffer_records = Gauge(f"{PREFIX}buffer_records", "requests held in the training buffer", d, registry=r)
        self.buffer_tokens = Gauge(f"{PREFIX}buffer_tokens", "generated tokens held in the training buffer", d,
                                   registry=r)
        self.buffer_bytes = Gauge(f"{PREFIX}buffer_bytes", "bytes held in the training buffer", d, registry=r)
        # the suffix learner beside the draft (engine/suffix.py): its share of the counters above
        self.suffix_drafts = Counter(f"{PREFIX}suffix_num_drafts", "verify steps whose proposals came from the suffix "
                                     "learner (included in spec_decode_num_drafts)", registry=r)
        self.suffix_draft_tokens = Counter(f"{PREFIX}suffix_num_draft_tokens", "tokens the suffix learner proposed",
                                           registry=r)
        self.suffix_accepted_tokens = Counter(f"{PREFIX}suffix_num_accepted_tokens",
                                              "tokens the suffix learner proposed that were accepted", registry=r)
        self.suffix_version = Gauge(f"{PREFIX}suffix_learner_outputs", "served outputs the suffix learner has learned "
                                    "(its version)", registry=r)
        self.suffix_history = Gauge(f"{PREFIX}suffix_learner_history", "earlier outputs it matches in now", registry=r)
        self.host = Gauge(f"{PREFIX}host_info", "the CPU, its vector extensions and the kernel path the target runs "
                          "on (models/kernels.py); always 1", ["cpu", "vector", "kernels"], registry=r)
        self.running = Gauge(f"{PREFIX}num_requests_running", "requests in the decoding batch", registry=r)
        self.waiting = Gauge(f"{PREFIX}num_requests_waiting", "requests queued for the batch", registry=r)
        self.requests = Counter(f"{PREFIX}request_success", "finished requests by finish reason", ["finished_reason"],
                                registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "tokens generated", registry=r)
        # latencies are taken in the scheduler (serve/scheduler.py): arrival = the request queued
        # (after tokenising), a token delivered = the engine step that produced it ended
        self.e2e_latency = Histogram(f"{PREFIX}e2e_request_latency_seconds", "finished requests' latency, arrival to "
                                     "last token (vLLM: vllm:e2e_request_latency_seconds)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "arrival to the first delivered token, one per "
                              "request that got one (vLLM: vllm:time_to_first_token_seconds)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "gap between a request's successive token "
                             "deliveries, divided among the tokens delivered: a step that delivers n tokens g seconds "
                             "after the last delivery counts n tokens of g/n each, so the count is every token after "
                             "each request's first delivery (vLLM: vllm:inter_token_latency_seconds, which counts "
                             "a step's gap once however many tokens it delivered)",
                             buckets=ITL_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._recent: deque[tuple[int, int]] = deque(maxlen=window)
        self._recent_by_draft: dict[str, deque] = {}
        self.by_version: dict[int, list[int]] = {}
        """General draft version -> [accepted, proposed] draft tokens, since start (the cluster's
        global rollback judges a version by these)."""
        self.add_draft("general")
        self.timeline: deque[dict] = deque(maxlen=timeline)
        self.started = time.time()

    def set_host(self, host: dict) -> None:
        """The host's line (models/kernels.describe): cpu, vector, kernels."""
        self.host.labels(host["cpu"], host["vector"], host["kernels"]).set(1)

    def add_draft(self, name: str) -> None:
        """Create a pool member's series (so they exist, at 0, before its first step)."""
        for c in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens):
            c.labels(draft=name)
        for pos in range(self.k):
            self.accepted_per_pos.labels(draft=name, position=str(pos))
        self._recent_by_draft.setdefault(name, deque(maxlen=self.window))

    def observe_step(self, out: StepOutput, draft: str = "general") -> None:
        k = out.proposed
        if not k:
            return
        if draft == "general":
            with self._lock:
                counts = self.by_version.setdefault(out.draft_version, [0, 0])
                counts[0] += out.accepted
                counts[1] += k
        if out.speculator == "suffix":
            self.suffix_drafts.inc()
            self.suffix_draft_tokens.inc(k)
            self.suffix_accepted_tokens.inc(out.accepted)
        self.num_drafts.labels(draft=draft).inc()
        self.num_draft_tokens.labels(draft=draft).inc(k)
        if out.accepted:
            self.num_accepted_tokens.labels(draft=draft).inc(out.accepted)
            for pos in range(out.accepted):
                self.accepted_per_pos.labels(draft=draft, position=str(pos)).inc()

    def observe_delivery(self, tokens: int, since_s: float, first: bool) -> None:
        """A request's step delivered `tokens` tokens, `since_s` after its arrival (`first`) or after
        its previous delivery."""
        if first:
            self.ttft.observe(since_s)
            return
        for _ in range(tokens):
            self.itl.observe(since_s / tokens)

    def observe_finish(self, out: RequestOutput, latency_s: float, draft_version: int,
                       draft: str = "general", route: str | None = None) -> None:
        s = out.stats
        self.requests.labels(finished_reason=out.finish_reason).inc()
        self.prompt_tokens.inc(len(out.prompt_ids))
        self.generation_tokens.inc(len(out.token_ids))
        self.e2e_latency.observe(latency_s)
        with self._lock:
            if s.evaluated:
                self._recent.append((s.accepted, s.evaluated))
                mine = self._recent_by_draft.setdefault(draft, deque(maxlen=self.window))
                mine.append((s.accepted, s.evaluated))
                self.draft_alpha.labels(draft=draft).set(sum(a for a, _ in mine) / sum(e for _, e in mine))
            accepted = sum(a for a, _ in self._recent)
            evaluated = sum(e for _, e in self._recent)
            if evaluated:
                self.alpha.set(accepted / evaluated)
            self.timeline.append({
                "t": time.time() - self.started, "alpha": s.alpha, "alpha_window": accepted / evaluated if evaluated else None,
                "tokens": len(out.token_ids), "tokens_per_s": len(out.token_ids) / latency_s if latency_s > 0 else None,
                "draft_version": draft_version, "finish_reason": out.finish_reason, "draft": draft, "route": route,
            })

    def refresh_suffix(self, stats: dict) -> None:
        """The suffix learner's `stats()`."""
        self.suffix_version.set(stats["version"])
        self.suffix_history.set(stats["history"])

    def refresh(self, drafts: dict[str, tuple[int, dict | None]], running: int, waiting: int) -> None:
        """drafts: name -> (serving version, trainer stats or None)."""
        self.running.set(running)
        self.waiting.set(waiting)
        for name, (version, trainer) in drafts.items():
            self.draft_version.labels(draft=name).set(version)
            if trainer:
                self.updates.labels(draft=name).set(trainer["updates"])
                self.rollbacks.labels(draft=name).set(trainer["rollbacks"])
                self.discarded.labels(draft=name).set(trainer["discarded_nan"])
                self.trainer_time.labels(draft=name).set(trainer["trainer_time_s"])
                self.buffer_records.labels(draft=name).set(trainer["buffer_requests"])
                self.buffer_tokens.labels(draft=name).set(trainer["buffer_tokens"])
                self.buffer_bytes.labels(draft=name).set(trainer["buffer_bytes"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def version_counts(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return {v: (a, p) for v, (a, p) in self.by_version.items()}

    def recent_alpha(self) -> float | None:
        with self._lock:
            evaluated = sum(e for _, e in self._recent)
            return sum(a for a, _ in self._recent) / evaluated if evaluated else None

    def timeline_since(self, n: int) -> list[dict]:
        with self._lock:
            return list(self.timeline)[-n:]
