"""A request, and its state in the engine: while its prompt is being cached (`Prefill`), then as a
row of the running batch (`Sequence`), which is what proposers see."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from onspec.engine.detok import IncrementalDetokenizer
from onspec.engine.records import RequestOutput, RequestStats
from onspec.engine.runner import ModelRunner
from onspec.engine.sampling import SamplingParams, gumbel_noise
from onspec.engine.stopping import StopChecker

if TYPE_CHECKING:
    from onspec.engine.drafter import Drafter

log = logging.getLogger("onspec.engine")

@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass(eq=False)  # compared by identity
class Sequence:
    """One request's state while it is in the batch."""

    request: Request
    drafter: "Drafter | None"
    """The draft model that proposes for this row (None: target-only)."""
    stop: StopChecker
    generator: torch.Generator
    stats: RequestStats
    started: float
    detok: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    sent: int = 0
    """Characters of detok.text already handed out in StepOutputs."""
    state: dict[str, Any] = field(default_factory=dict)
    """Each proposer's own state of this row, under its kind (e.g. the suffix learner's index)."""
    proposed_by: str | None = None
    """The kind of proposer whose draft the last verify step verified (None: nothing proposed)."""
    teacher: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Per verify step, the target's top-K ids and probabilities at the emitted positions."""
    _noise: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def coupled(self) -> bool:
        """Seeded sampling: target and draft share Gumbel noise per output position (gumbel_verify)."""
        return self.params.seed is not None and not self.params.greedy

    @property
    def budget(self) -> int:
        """Proposals this row may take in a step: the step adds one token more."""
        return max(0, self.params.max_new_tokens - len(self.generated) - 1) if self.error is None else 0

    def gumbel(self, offset: int, vocab: int, device: torch.device) -> torch.Tensor:
        """The noise [vocab] of output position len(generated) + offset (kept until it is emitted)."""
        key = (len(self.generated) + offset, vocab)
        if key not in self._noise:
            self._noise[key] = gumbel_noise(self.params.seed, key[0], vocab, device)
        return self._noise[key]

    def append(self, tokens: list[int]) -> None:
        """Committed tokens; the noise of emitted positions is dropped."""
        self.generated.extend(tokens)
        for key in [key for key in self._noise if key[0] < len(self.generated)]:
            del self._noise[key]

    def fail(self, doing: str, error: Exception) -> None:
        """This row failed on its own: it leaves the batch at the end of the step with finish
        reason 'error'; the others go on."""
        if self.error is None:
            self.error = f"{type(error).__name__} while {doing}: {error}"
            self.finish_reason = "error"
            log.warning("request %s failed alone (%s); the rest of the batch goes on",
                        self.request.request_id, self.error)

    def tail(self, n: int) -> list[int]:
        """The last n tokens of the prompt + output so far."""
        g = self.generated
        if len(g) >= n:
            return g[len(g) - n:]
        prompt = self.request.prompt_ids
        return prompt[max(0, len(prompt) - (n - len(g))):] + g

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request.request_id,
            prompt_ids=self.request.prompt_ids,
            token_ids=self.generated,
            text=self.stop.final_text(self.generated),
            finish_reason=self.finish_reason or "length",
            stats=self.stats,
        )


@dataclass(eq=False)  # compared by identity (removed from the engine's list)
class Prefill:
    """Requests whose prompts are being cached, a chunk per step, before they join the batch: their
    own KV caches (the target's, and their drafter's) and how far into their prompts they are."""

    seqs: list[Sequence]
    drafter: "Drafter | None"
    target: ModelRunner
    draft: ModelRunner | None
    cached: int = 0
    """Prompt tokens cached so far, in the longest prompt (all but its last token are cached)."""
    done: bool = False
    """Every prompt is cached: the rows may join the batch."""
    version: int = 0
    """The draft version whose keys and values `draft` holds."""
    long: bool = False
    """A prompt longer than the engine's `prefill_chunk` (prefilled alone, and in its turn)."""

    def __post_init__(self) -> None:
        self.version = self.drafter.version if self.drafter is not None else 0

    @property
    def prompts(self) -> list[list[int]]:
        return [s.request.prompt_ids for s in self.seqs]

    @property
    def remaining(self) -> int:
        """Prompt tokens still to cache, in the longest prompt."""
        return max(len(p) for p in self.prompts) - 1 - self.cached

    def advance(self, chunk: int) -> int:
        """Cache the next `chunk` tokens of every row's prompt (0: all the rest), target and draft;
        returns the prompt tokens cached, over all rows. If a new draft version went live since the
        draft's cache began, the draft's cache is made again from the prompt's start with it (a row
        joins with a cache of one draft version)."""
        start, prompts = self.cached, self.prompts
        self.cached = self.target.prefill(prompts, start, chunk)
        if self.draft is not None:
            draft_start = start
            if self.drafter.version != self.version:
                self.draft, self.version, draft_start = self.drafter.new_runner(len(self.seqs)), self.drafter.version, 0
            self.draft.prefill(prompts, draft_start, self.cached - draft_start)
        self.done = self.cached >= max(len(p) for p in prompts) - 1
        return sum(max(0, min(len(p) - 1, self.cached) - start) for p in prompts)

    def drop(self, row: int) -> None:
        keep = [r for r in range(len(self.seqs)) if r != row]
        self.seqs = [self.seqs[r] for r in keep]
        if keep:
            for runner in (self.target, self.draft):
                if runner is not None:
                    runner.select(keep)
