"""The speculative decoding engine: prefill -> propose -> verify -> accept -> repeat.

Draft q proposes k tokens with its own KV cache; target p scores all k+1 positions in one
forward pass; `verify` (a pure function) decides; both caches roll back what was rejected.
Without a draft (or with k = 0) the same loop is plain target-only decoding: the baseline.
Rows of a batch have their own prompt lengths, sampling parameters, RNG streams and numbers of
accepted tokens; a finished row leaves the batch at once.

The interface a server drives (vLLM's LLMEngine shape): `add(request)` prefills it and it joins
the running batch between steps; `step()` runs one verify step for every running request and
returns a `StepOutput` per request (its new tokens and new text, and on the last one the whole
output and, when a trainer listens, the request's lesson as one `Example`); `cancel(id)` drops a
request at once. `generate` is add-then-step-until-done, for offline use.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from onspec.config import option
from onspec.engine.detok import IncrementalDetokenizer
from onspec.engine.records import Example, RequestOutput, RequestStats, StepOutput, StepRecord
from onspec.engine.runner import ModelRunner
from onspec.engine.policy import AdaptiveK
from onspec.engine.sampling import InvalidRequest, SamplingParams, gumbel_noise, process_logits, sample
from onspec.engine.stopping import StopChecker
from onspec.engine.verify import Verdict, greedy_verify, gumbel_verify, rejection_sample
from onspec.models.draft_vocab import DraftVocab
from onspec.models.fast_draft import FastDraft


@dataclass
class EngineConfig:
    """Speculative decoding engine."""

    k: int = option(4, "draft tokens proposed per verify step, at most (0 = target-only decoding)")
    draft_vocab: int = option(0, "the draft proposes only from the N most frequent target tokens (a reduced head, "
                              "FR-Spec style; verification stays over the full vocabulary); 0 = the full head")
    draft_quant: str = option("auto", "the running draft's weights: int8 (weight-only, per-channel scales; the "
                              "target keeps its dtype), none, or auto (int8 on CPU, where one-position draft passes "
                              "read half the bytes; none on CUDA, where the int8 path only dequantises)",
                              choices=("auto", "int8", "none"))

    def __post_init__(self) -> None:
        if not 0 <= self.k <= 32:
            raise ValueError(f"k must be in [0, 32], got {self.k}")
        if self.draft_vocab < 0:
            raise ValueError(f"--draft-vocab must be >= 0, got {self.draft_vocab}")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class Proposal:
    tokens: torch.Tensor  # [batch, k] token ids
    logits: torch.Tensor  # [batch, k, draft vocab] raw draft logits over the draft's head (FastDraft.vocab_ids)
    probs: list[torch.Tensor | None]  # per row: processed q [k, vocab], None for greedy rows


@dataclass
class _Sequence:
    """One request's state while it is in the batch."""

    request: Request
    stop: StopChecker
    generator: torch.Generator
    stats: RequestStats
    started: float
    detok: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    sent: int = 0
    """Characters of detok.text already handed out in StepOutputs."""
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

    def gumbel(self, offset: int, vocab: int, device: torch.device) -> torch.Tensor:
        """The noise [vocab] of output position len(generated) + offset (kept until it is emitted)."""
        key = (len(self.generated) + offset, vocab)
        if key not in self._noise:
            self._noise[key] = gumbel_noise(self.params.seed, key[0], vocab, device)
        return self._noise[key]

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request.request_id,
            prompt_ids=self.request.prompt_ids,
            token_ids=self.generated,
            text=self.stop.final_text(self.generated),
            finish_reason=self.finish_reason or "length",
            stats=self.stats,
        )


RecordCallback = Callable[[StepRecord], None]
FinishCallback = Callable[[StepOutput], None]


class SpeculativeEngine:
    def __init__(self, target, tokenizer, draft=None, *, k: int = 4, policy: AdaptiveK | None = None,
                 draft_vocab: DraftVocab | None = None, draft_int8: bool = False) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        """The draft's full-precision weights: what the trainer copies and swaps into."""
        self.fast = (FastDraft(self.draft, draft_vocab.ids if draft_vocab is not None else None, int8=draft_int8)
                     if draft is not None else None)
        """The copy of the draft that runs (reduced head, int8), refreshed after each swap."""
        self.vocab = draft_vocab if draft is not None else None
        self.tokenizer = tokenizer
        self.k = k if draft is not None else 0
        self.policy = policy if draft is not None else None
        """Optional adaptive choice of k per step (engine/policy.py); None = always k."""
        self.draft_version = 0
        """The version of the draft weights live in this engine (0 = as loaded)."""
        self.teacher_top_k = 0
        """> 0: keep the target's top-K distribution at every emitted position and hand each finished
        request's `Example` out with its last StepOutput (set by whoever trains on the traffic)."""
        self.record_logits = False
        """Put full-vocabulary target and draft logits into StepRecords (analysis and tests only)."""
        self._rows: list[_Sequence] = []
        self._target_runner: ModelRunner | None = None
        self._draft_runner: ModelRunner | None = None
        self._swap_lock = threading.Lock()
        self._pending_swap: tuple[dict, int, float | None] | None = None
        self.device = next(target.parameters()).device
        self.eos_ids = _eos_ids(target, tokenizer)
        self.max_context = getattr(target.config, "max_position_embeddings", None)

    # -- the interface -------------------------------------------------------------------------

    def add(self, requests: Request | list[Request]) -> None:
        """Admit and prefill requests; they join the running batch before the next step.
        Raises ValueError (and admits none of them) if one is invalid."""
        seqs = [self._admit(r) for r in ([requests] if isinstance(requests, Request) else requests)]
        if not seqs:
            return
        self.apply_pending_swap()
        target, draft = self._prefill(seqs)
        if self._target_runner is None:
            self._target_runner, self._draft_runner = target, draft
        else:
            self._target_runner.extend(target)
            if draft is not None:
                self._draft_runner.extend(draft)
        self._rows += seqs

    def step(self, on_record: RecordCallback | None = None) -> list[StepOutput]:
        """One verify step for every running request; one StepOutput per request, in batch order.
        Finished requests (their `finished` is True) have left the batch. `on_record` gets each
        request's StepRecord."""
        if not self._rows:
            return []
        rows = self._rows
        steps = self._verify_step(rows, on_record)
        outputs = [self._step_output(s, kept, k, v) for s, (kept, k, v) in zip(rows, steps)]
        if any(s.finish_reason is not None for s in rows):
            self._keep([r for r, s in enumerate(rows) if s.finish_reason is None])
        return outputs

    def cancel(self, request_id: str) -> StepOutput | None:
        """Drop a running request at once (e.g. its client went away); its slot is freed.
        Returns its last StepOutput (finish reason 'abort'), or None if it is not running."""
        for r, s in enumerate(self._rows):
            if s.request.request_id == request_id:
                s.finish_reason = "abort"
                self._keep([i for i in range(len(self._rows)) if i != r])
                return self._step_output(s, [], 0, None)
        return None

    @property
    def num_running(self) -> int:
        return len(self._rows)

    def generate(
        self,
        requests: list[Request],
        on_record: RecordCallback | None = None,
        on_finish: FinishCallback | None = None,
    ) -> list[RequestOutput]:
        """Decode requests to completion (with any already running); outputs in request order.
        `on_record` gets every verify step's record, `on_finish` each request's last StepOutput."""
        self.add(requests)
        done: dict[str, RequestOutput] = {}
        wanted = {r.request_id for r in requests}
        while not wanted <= done.keys():
            for o in self.step(on_record):
                if o.finished:
                    if o.request_id in wanted:
                        done[o.request_id] = o.output
                    if on_finish is not None:
                        on_finish(o)
        return [done[r.request_id] for r in requests]

    # -- one verify step ---------------------------------------------------------------------

    def _prefill(self, seqs: list[_Sequence]) -> tuple[ModelRunner, ModelRunner | None]:
        prompts = [s.request.prompt_ids for s in seqs]
        t0 = time.perf_counter()
        target = ModelRunner(self.target, len(seqs))
        target.prefill(prompts)
        draft = None
        if self.draft is not None:
            draft = ModelRunner(self.fast.model, len(seqs))
            draft.prefill(prompts)
        self._sync()
        for s in seqs:
            s.stats.prefill_time_s = time.perf_counter() - t0
        return target, draft

    def _verify_step(self, rows: list[_Sequence], on_record: RecordCallback | None
                     ) -> list[tuple[list[int], int, Verdict]]:
        """Propose, score, verify and commit one step for every row; per row (the tokens kept after
        stopping, k, the verdict)."""
        target, draft = self._target_runner, self._draft_runner
        self.apply_pending_swap()
        if self.vocab is not None and (ids := self.vocab.maybe_refresh()) is not None:
            self.fast.set_vocab(ids)  # the served tokens moved the most frequent set
        k_max = (self.policy.choose() if self.policy is not None else self.k) if draft is not None else 0
        ks = self._choose_k(rows, k_max)
        k = max(ks)  # the draft runs k forwards for the batch; row r uses its first ks[r] proposals
        t_start = time.perf_counter()
        if k:
            draft.catch_up()  # the backlog of steps that did not speculate: not a cost of proposing
            self._sync()
        t0 = time.perf_counter()
        proposal = self.propose(draft, rows, ks) if k else None
        self._sync()
        t1 = time.perf_counter()
        target_logits = self.score(target, proposal)  # [batch, k+1, vocab]
        self._sync()
        t2 = time.perf_counter()
        verdicts = [self.verify(r, s, ks[r], proposal, target_logits) for r, s in enumerate(rows)]
        accepted = [v.num_accepted for v in verdicts]
        emitted = [v.tokens for v in verdicts]
        if self.policy is not None:
            self.policy.observe(k, sum(accepted), sum(v.evaluated for v in verdicts), t1 - t0, t2 - t1)
        target.accept(accepted, emitted)
        if draft is not None:
            draft.accept(accepted, emitted)
        if self.vocab is not None:
            for tokens in emitted:
                self.vocab.observe(tokens)
        if self.teacher_top_k:
            self._keep_teacher(rows, target_logits, accepted)
        steps = []
        for r, (s, v) in enumerate(zip(rows, verdicts)):
            s.stats.observe(ks[r], v.num_accepted)
            s.stats.draft_time_s += t1 - t_start
            s.stats.draft_forwards += k
            s.stats.target_time_s += t2 - t1
            s.stats.target_forwards += 1
            if on_record is not None:
                on_record(self._record(s, r, ks[r], proposal, target_logits, v))
            steps.append((self._append(s, v.tokens), ks[r], v))
        return steps

    def propose(self, draft: ModelRunner, rows: list[_Sequence], ks: list[int]) -> Proposal:
        """The draft proposes max(ks) tokens per row, one forward pass each; a sampling row draws
        from its RNG only for the ks[r] proposals it will use (its stream never depends on the batch);
        a seeded row takes the Gumbel-max sample with its position's noise (see verify.py)."""
        fast = self.fast
        logits = draft.feed()[:, -1]  # [batch, draft vocab] at the last committed token
        tokens, all_logits = [], []
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for i in range(max(ks)):
            if i:
                logits = draft.feed(tokens[-1][:, None])[:, -1]
            choice = logits.argmax(-1)  # [batch], an index into the draft's head
            for r, s in enumerate(rows):
                if not s.params.greedy and i < ks[r]:
                    q = process_logits(logits[r], s.params)  # [draft vocab]
                    if s.coupled:
                        g = s.gumbel(i, fast.vocab_size, logits.device)
                        choice[r] = (q.log() + (g if fast.vocab_ids is None else g[fast.vocab_ids])).argmax()
                    else:
                        choice[r] = sample(q[None], s.generator)[0]
                    probs[r].append(fast.to_full_probs(q))  # [vocab], 0 outside the draft's head
            tokens.append(fast.to_full_ids(choice))
            all_logits.append(logits)
        return Proposal(
            tokens=torch.stack(tokens, 1),
            logits=torch.stack(all_logits, 1),
            probs=[torch.stack(p) if p else None for p in probs],
        )

    def score(self, target: ModelRunner, proposal: Proposal | None) -> torch.Tensor:
        """The target scores the last committed token and the k proposals in one pass."""
        return target.feed(proposal.tokens if proposal is not None else None)

    def verify(
        self, row: int, seq: _Sequence, k: int, proposal: Proposal | None, target_logits: torch.Tensor
    ) -> Verdict:
        """Verify row `row`'s first k proposals against target_logits[row, :k+1]."""
        if proposal is None:
            draft_tokens = torch.empty(0, dtype=torch.long, device=self.device)
        else:
            draft_tokens = proposal.tokens[row, :k]
        if seq.params.greedy:
            return greedy_verify(draft_tokens, target_logits[row, : k + 1])
        p = process_logits(target_logits[row, : k + 1], seq.params)
        if seq.coupled:
            gumbels = torch.stack([seq.gumbel(i, p.shape[-1], p.device) for i in range(k + 1)])
            return gumbel_verify(draft_tokens, p, gumbels)
        q = proposal.probs[row] if k else p[:0]
        return rejection_sample(draft_tokens, q, p, seq.generator)

    # -- draft updates ------------------------------------------------------------------------

    def offer_draft(self, state_dict: dict, version: int, alpha_hint: float | None = None) -> None:
        """Offer new draft weights (from any thread; a subset of parameters is fine). They go live
        at the start of the next verify step, in the decoding thread, so no forward pass ever sees
        a half-written draft. `alpha_hint` (e.g. the trainer's probe alpha) restarts the policy's
        alpha estimate for the new version."""
        with self._swap_lock:
            self._pending_swap = (state_dict, version, alpha_hint)

    def apply_pending_swap(self) -> bool:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None or self.draft is None:
            return False
        state_dict, version, alpha_hint = pending
        with torch.no_grad():
            self.draft.load_state_dict(state_dict, strict=False)
        self.fast.refresh()
        self.draft_version = version
        if self.policy is not None and alpha_hint is not None:
            self.policy.reset_alpha(alpha_hint)
        return True

    # -- bookkeeping --------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raise InvalidRequest if this engine cannot run the request (the one place it is checked)."""
        n = len(request.prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        need = n + request.params.max_new_tokens + self.k
        if self.max_context is not None and need > self.max_context:
            raise InvalidRequest(
                f"prompt ({n} tokens) + max_new_tokens ({request.params.max_new_tokens}) + k ({self.k}) "
                f"= {need} exceeds the model's context of {self.max_context} tokens",
                "prompt", "context_length_exceeded")

    def _admit(self, request: Request) -> _Sequence:
        self.check(request)
        generator = torch.Generator(device=self.device)
        seed = request.params.seed
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
        return _Sequence(
            request=request,
            stop=StopChecker(self.tokenizer, self.eos_ids, request.params),
            generator=generator,
            stats=RequestStats(k=self.k),
            started=time.perf_counter(),
            detok=IncrementalDetokenizer(self.tokenizer),
        )

    def _choose_k(self, rows: list[_Sequence], k_max: int) -> list[int]:
        """Per row: no more than (remaining budget - 1) proposals, as the step adds one more token."""
        return [max(0, min(k_max, s.params.max_new_tokens - len(s.generated) - 1)) for s in rows]

    def _append(self, seq: _Sequence, tokens: list[int]) -> list[int]:
        """Commit a step's tokens up to any stop; returns the ones kept."""
        result = seq.stop.check(seq.generated, tokens)
        kept = tokens[: result.keep]
        seq.generated.extend(kept)
        for key in [key for key in seq._noise if key[0] < len(seq.generated)]:
            del seq._noise[key]
        seq.stats.generated = len(seq.generated)
        seq.stats.wall_time_s = time.perf_counter() - seq.started
        if result.reason is not None:
            seq.finish_reason = result.reason
        return kept

    def _step_output(self, seq: _Sequence, kept: list[int], k: int, verdict: Verdict | None) -> StepOutput:
        """The request's new tokens and text of this step; on its last step the whole output.
        While it runs, text that could still be the start of a stop string is held back."""
        finished = seq.finish_reason is not None
        if finished:  # the final text is decoded whole once (cut at a stop string)
            output = seq.output()
            text, end = output.text, len(output.text)
        else:
            seq.detok.push(kept)
            output, text = None, seq.detok.text
            end = len(text) - max((len(x) - 1 for x in seq.params.stop), default=0)
        delta = text[seq.sent:end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        return StepOutput(
            request_id=seq.request.request_id, token_ids=kept, text=delta, finished=finished,
            finish_reason=seq.finish_reason, proposed=k, accepted=verdict.num_accepted if verdict else 0,
            draft_version=self.draft_version, output=output,
            example=self._example(seq) if finished and self.teacher_top_k and seq.finish_reason != "abort" else None,
        )

    def _keep_teacher(self, rows: list[_Sequence], target_logits: torch.Tensor, accepted: list[int]) -> None:
        """The target's top-K at each row's emitted positions: one batched softmax + top-k on the
        model's device, one copy to the host per step."""
        n = max(accepted) + 1
        top = target_logits[:, :n].float().softmax(-1).topk(min(self.teacher_top_k, target_logits.shape[-1]), dim=-1)
        ids, probs = top.indices.to(torch.int32).cpu(), top.values.to(torch.float16).cpu()
        for r, s in enumerate(rows):
            s.teacher.append((ids[r, : accepted[r] + 1], probs[r, : accepted[r] + 1]))

    def _example(self, seq: _Sequence) -> Example | None:
        """A finished request as training data: one teacher distribution per generated token."""
        if not seq.generated or not seq.teacher:
            return None
        g = len(seq.generated)  # positions past the kept output (stop-trimmed) are dropped
        return Example(
            request_id=seq.request.request_id,
            tokens=torch.tensor(seq.request.prompt_ids + seq.generated, dtype=torch.int32),
            start=len(seq.request.prompt_ids),
            top_ids=torch.cat([ids for ids, _ in seq.teacher])[:g],
            top_probs=torch.cat([probs for _, probs in seq.teacher])[:g],
            draft_version=self.draft_version,
        )

    def _record(
        self, seq: _Sequence, row: int, k: int, proposal: Proposal | None, target_logits: torch.Tensor, v: Verdict
    ) -> StepRecord:
        n = v.num_accepted
        full = self.record_logits
        return StepRecord(
            request_id=seq.request.request_id,
            step=seq.stats.steps - 1,
            position=len(seq.request.prompt_ids) + len(seq.generated),
            proposed=proposal.tokens[row, :k].cpu() if k else torch.empty(0, dtype=torch.long),
            num_accepted=n,
            emitted=list(v.tokens),
            target_logits=target_logits[row, : n + 1].clone() if full else None,
            draft_logits=(self.fast.to_full_logits(proposal.logits[row, : min(n + 1, k)]).clone()
                          if full and k else None),
            draft_version=self.draft_version,
        )

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch."""
        self._rows = [self._rows[r] for r in keep]
        if not keep:
            self._target_runner = self._draft_runner = None
            return
        self._target_runner.select(keep)
        if self._draft_runner is not None:
            self._draft_runner.select(keep)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
