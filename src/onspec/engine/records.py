"""Data carriers between the engine and whoever listens.

- `StepOutput`: what `SpeculativeEngine.step` returns per request (new tokens and text; at the end
  the whole `RequestOutput` and, when a trainer listens, the request's `Example`).
- `StepRecord`: one verify step of one request in detail, for metrics and analysis (`on_record`).
- `Example`: a served request as training data, built by the engine from what its verify steps
  already computed (the trainer never re-runs the target for teacher logits).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    request_id: str
    step: int
    """Index of this verify step within the request (0-based)."""
    position: int
    """Position (in prompt + generated tokens) of the first verified token, i.e. the token the
    target predicted at target_logits[0]; the tokens before it are the prompt and the output so far."""
    proposed: torch.Tensor
    """The draft's proposed tokens x_1..x_k. [k] (k = 0 on a target-only step)"""
    num_accepted: int
    emitted: list[int]
    """Tokens appended by this step: accepted prefix + recovered/bonus token (before stop-trimming)."""
    target_logits: torch.Tensor | None
    """Only with `engine.record_logits` (analysis, tests), else None. Raw target logits at the
    verified positions: [num_accepted + 1, vocab]. Row i predicts the token at position + i given
    the tokens before `position` + emitted[:i]. Positions after the first rejection are not
    included: they were conditioned on rejected draft tokens, which are not in the sequence."""
    draft_logits: torch.Tensor | None
    """Only with `engine.record_logits`: raw draft logits at the same positions, where the draft
    proposed: [min(num_accepted + 1, k), vocab]; None on a target-only step."""
    draft_version: int = 0

    @property
    def k(self) -> int:
        return int(self.proposed.shape[0])

    @property
    def evaluated(self) -> int:
        return self.num_accepted + int(self.num_accepted < self.k)


@dataclass
class Counts:
    """Verify steps and their proposed / accepted / evaluated tokens."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    evaluated: int = 0

    def observe(self, proposed: int, num_accepted: int) -> None:
        self.steps += 1
        self.proposed += proposed
        self.accepted += num_accepted
        self.evaluated += num_accepted + int(num_accepted < proposed)

    @property
    def alpha(self) -> float | None:
        """Token acceptance rate: accepted / evaluated. None when nothing was proposed."""
        return self.accepted / self.evaluated if self.evaluated else None


@dataclass
class RequestStats(Counts):
    """Acceptance and speed for one request (README "What the figures mean"): the counts above over
    its verify steps (target passes, excluding prefill), and per kind of proposer."""

    k: int = 0
    generated: int = 0
    accepted_hist: list[int] = field(default_factory=list)
    """accepted_hist[n] = number of steps that accepted exactly n draft tokens."""
    draft_time_s: float = 0.0
    draft_forwards: int = 0
    target_time_s: float = 0.0
    target_forwards: int = 0
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0
    by_proposer: dict[str, Counts] = field(default_factory=dict)
    """The steps each kind of proposer ('draft', 'suffix', ...) proposed for; their tokens are
    counted in the totals too."""

    def observe(self, proposed: int, num_accepted: int, proposer: str | None = None) -> None:
        super().observe(proposed, num_accepted)
        if len(self.accepted_hist) <= num_accepted:
            self.accepted_hist.extend([0] * (num_accepted + 1 - len(self.accepted_hist)))
        self.accepted_hist[num_accepted] += 1
        if proposer is not None:
            self.by_proposer.setdefault(proposer, Counts()).observe(proposed, num_accepted)

    def of(self, proposer: str) -> Counts:
        """The counts of one kind of proposer (zero if it never proposed)."""
        return self.by_proposer.get(proposer, Counts())

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per target forward pass (accepted + 1 per step)."""
        return (self.accepted + self.steps) / self.steps if self.steps else None

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def cost_ratio(self) -> float | None:
        """c: time of one draft forward / time of one target forward (measured)."""
        if not (self.draft_forwards and self.target_forwards and self.target_time_s > 0):
            return None
        return (self.draft_time_s / self.draft_forwards) / (self.target_time_s / self.target_forwards)

    def merge(self, other: "RequestStats") -> "RequestStats":
        """Sum two stats (for aggregates over many requests)."""
        return _sum(self, other)

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "steps": self.steps,
            "accepted": self.accepted,
            "evaluated": self.evaluated,
            "proposed": self.proposed,
            "alpha": self.alpha,
            "mean_accepted_length": self.mean_accepted_length,
            "accepted_hist": list(self.accepted_hist),
            "generated": self.generated,
            "tokens_per_s": self.tokens_per_s,
            "cost_ratio_c": self.cost_ratio,
            "by_proposer": {name: {**dataclasses.asdict(c), "alpha": c.alpha} for name, c in self.by_proposer.items()},
            "wall_time_s": self.wall_time_s,
        }


def _sum(a, b):
    """Field by field: numbers add, lists add element-wise (padded), dicts by key; `k` is the max."""
    if isinstance(a, (int, float)):
        return a + b
    if isinstance(a, list):
        n = max(len(a), len(b))
        return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]
    if isinstance(a, dict):
        return {key: _sum(a[key], b[key]) if key in a and key in b else copy.deepcopy(a.get(key, b.get(key)))
                for key in {**a, **b}}
    out = type(a)(**{f.name: _sum(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})
    if hasattr(out, "k"):
        out.k = max(a.k, b.k)
    return out


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    """Generated ids (an EOS that ended generation is included, as in vLLM)."""
    text: str
    finish_reason: str
    """'stop' (EOS or stop string) or 'length'."""
    stats: RequestStats

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            **self.stats.to_dict(),
        }


@dataclass(eq=False)  # compared by identity: it holds tensors
class Example:
    """One served request as training data: per generated position, the target's top-K token ids
    (int32) and probabilities (float16, temperature 1); the leftover mass is 1 - their sum.
    K * 6 + 4 bytes per token (196 B at K = 32) against 2 bytes per vocabulary entry for a full
    float16 distribution (304 KB per token for Qwen2.5's 151,936 tokens)."""

    request_id: str
    tokens: torch.Tensor
    """int32 [T]: prompt + generated tokens."""
    start: int
    """Index of the first generated token (the prompt length)."""
    top_ids: torch.Tensor
    """int32 [G, K]: the target's top-K token ids at generated positions start .. start+G-1."""
    top_probs: torch.Tensor
    """float16 [G, K]: their probabilities (temperature 1); 1 - row sum is the leftover mass."""
    draft_version: int = 0
    source: str = ""

    @property
    def num_positions(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.top_ids, self.top_probs))


@dataclass
class StepOutput:
    """One request's part of one engine step."""

    request_id: str
    token_ids: list[int]
    """Tokens this step added to the output (after stop handling)."""
    text: str
    """Text they complete (incremental detokenisation; a possible stop-string start is held back)."""
    finished: bool = False
    finish_reason: str | None = None
    """With `finished`: 'stop', 'length', 'abort', or 'error' (this request failed alone; see `error`)."""
    error: str | None = None
    """With finish reason 'error': what failed. The other requests of the batch go on."""
    proposed: int = 0
    """Draft tokens proposed for this request in this step (k), and how many were accepted."""
    accepted: int = 0
    draft_version: int = 0
    """The draft version that proposed them, and the drafter it belongs to."""
    drafter: str | None = None
    speculator: str | None = None
    """The kind of proposer whose tokens this step verified: 'draft' (the draft model), 'suffix'
    (the suffix learner, engine/suffix.py), ...; None: nothing was proposed."""
    output: RequestOutput | None = None
    """On the last step: the whole output with its stats."""
    example: Example | None = None
    """On the last step, when the engine keeps teacher data: the request as training data."""
