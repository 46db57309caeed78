"""The draft model as a proposer (engine/proposer.py): one draft and everything that runs it, for
the rows of the batch it serves.

An engine verifies the rows of every drafter it holds in one target pass per step (a pool's
general draft and its specialists share the target's batch); each drafter proposes for its own
rows with its own KV cache (`runner`, its rows in batch order). A drafter owns what is specific
to one draft:
- `draft`: the full-precision weights, what a trainer copies and publishes into;
- `fast`: the copy that runs (reduced head, int8), refreshed after each swap;
- `vocab`: its reduced head's token set, following the tokens its rows emit;
- `policy`: its adaptive k (its own alpha and costs, and the rate its steps achieve);
- `version` and the swap: `offer` from any thread, live at the start of the next step.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from onspec.engine.policy import AdaptiveK
from onspec.engine.proposer import Draft, Step, sync
from onspec.engine.runner import ModelRunner
from onspec.engine.sampling import process_logits, sample
from onspec.engine.sequence import Sequence
from onspec.models.decode import decode_forward
from onspec.models.draft_vocab import DraftVocab
from onspec.models.fast_draft import FastDraft

DEFAULT = "general"
"""The name of the drafter an engine is built with (the pool's general draft)."""


class Drafter:
    kind = "draft"

    def __init__(self, draft: nn.Module, *, k: int = 4, policy: AdaptiveK | None = None,
                 vocab: DraftVocab | None = None, quant: str = "none", name: str = DEFAULT,
                 forward: str = "auto") -> None:
        """quant: the running copy's format (models/fast_draft.py): none, int8, w8a8-vllm, w8a8-fbgemm."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.name = name
        self.draft = draft.eval()
        self.fast = FastDraft(self.draft, vocab.ids if vocab is not None else None, quant=quant)
        self.forward = decode_forward(self.fast.model) if forward == "auto" else None
        """What the draft's runners call for a pass (None: the running model itself; models/decode.py)."""
        self.vocab = vocab
        self.k = k
        self.policy = policy
        """Optional adaptive choice of k per step (engine/policy.py); None = always k."""
        self.version = 0
        """The version of the draft weights live here (0 = as loaded): the one source of truth."""
        self.swapped_at: float | None = None
        """time.time() when the live version went live (None: as loaded)."""
        self.runner: ModelRunner | None = None
        """The KV cache of this drafter's rows in the running batch, in batch order (None: no rows)."""
        self.clock = time.perf_counter
        """The engine's clock (set by the engine)."""
        self._lock = threading.Lock()
        self._pending: tuple[dict, int, float | None] | None = None
        self.times = (0.0, 0.0, 0)
        """This step's (catch-up seconds, proposing seconds, draft passes), by `clock`."""

    # -- rows ----------------------------------------------------------------------------------

    def new_runner(self, rows: int) -> ModelRunner:
        """A KV cache for rows being prefilled (they `join` when their prompts are cached)."""
        return ModelRunner(self.fast.model, rows, self.forward)

    def join(self, runner: ModelRunner) -> None:
        """Prefilled rows join this drafter's rows (after those it has)."""
        if self.runner is None:
            self.runner = runner
        else:
            self.runner.extend(runner)

    def keep(self, rows: list[int]) -> None:
        """Keep only these of its rows (indices among its own)."""
        if not rows:
            self.runner = None
        else:
            self.runner.select(rows)

    # -- proposing -----------------------------------------------------------------------------

    def choose_k(self) -> int:
        """Proposals per row this step, at most (before each row's remaining budget)."""
        return self.policy.choose() if self.policy is not None else self.k

    def admit(self, row: Sequence) -> None:
        pass

    def release(self, row: Sequence) -> None:
        pass

    @torch.no_grad()
    def propose(self, rows: list[Sequence], ks: list[int]) -> list[Draft | None]:
        """max(ks) proposals for each of its rows (all of them, in batch order), one forward pass
        each; row r takes its first ks[r]. A sampling row draws from its RNG only for the ks[r]
        proposals it will use (its stream never depends on the batch); a seeded row takes the
        Gumbel-max sample with its position's noise (see verify.py)."""
        k = max(ks, default=0)
        self.times = (0.0, 0.0, 0)
        if not k:
            return [None] * len(rows)
        device = next(self.fast.model.parameters()).device
        t_start = self.clock()
        self.runner.catch_up()  # the backlog of steps that did not speculate: not a cost of proposing
        sync(device)
        t0 = self.clock()
        fast = self.fast
        logits = self.runner.feed()[:, -1]  # [rows, draft vocab] at the last committed token
        tokens, all_logits = [], []
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for i in range(k):
            if i:
                logits = self.runner.feed(tokens[-1][:, None])[:, -1]
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
                        s.fail("sampling from the draft", e)
            tokens.append(fast.to_full_ids(choice))
            all_logits.append(logits)
        sync(device)
        self.times = (t0 - t_start, self.clock() - t0, k)
        stacked, stacked_logits = torch.stack(tokens, 1), torch.stack(all_logits, 1)  # [rows, k], [rows, k, vocab]
        return [Draft(stacked[r, : ks[r]], self, torch.stack(probs[r]) if probs[r] else None,
                      stacked_logits[r, : ks[r]]) if ks[r] else None for r in range(len(rows))]

    # -- learning from the step ----------------------------------------------------------------

    def observe(self, step: Step) -> None:
        """Its cache keeps the accepted proposals of rows it proposed for and queues the tokens it
        has not seen; its policy learns its acceptance, its costs and the rate its steps achieved."""
        idx = [r for r, s in enumerate(step.rows) if s.drafter is self]
        if not idx:
            return
        mine = [r for r in idx if step.drafts[r] is not None and step.drafts[r].by is self]
        own = {r: min(step.verdicts[r].num_accepted, len(step.drafts[r])) for r in mine}
        self.runner.accept([own.get(r, 0) for r in idx], [step.verdicts[r].tokens for r in idx])
        if self.vocab is not None:
            for r in idx:
                self.vocab.observe(step.verdicts[r].tokens)
        if self.policy is None:
            return
        catch_up, seconds, k = self.times
        evaluated = sum(min(step.verdicts[r].evaluated, len(step.drafts[r])) for r in mine)
        # the target pass is shared: each drafter sees its time
        self.policy.observe(k, sum(own.values()), evaluated, seconds, step.target_seconds, width=step.width)
        # the whole step, as the achieved rates count it, but for the catch-up on tokens the draft
        # did not see: a cost of having stepped aside, paid once, not of speculating; steps another
        # proposer had a row of are priced by the controller
        if all(step.drafts[r] is None or step.drafts[r].by is self for r in idx):
            emitted = sum(len(step.verdicts[r].tokens) for r in idx) / len(idx)
            self.policy.observe_step(bool(mine), emitted, step.seconds - catch_up)

    def stats(self) -> dict:
        return {"name": self.name, "version": self.version, "k": self.k,
                **({"alpha": self.policy.alpha, "draft_time_s": self.policy.draft_time}
                   if self.policy is not None else {})}

    # -- swapping weights ----------------------------------------------------------------------

    def offer(self, state_dict: dict, version: int, alpha_hint: float | None = None) -> None:
        """Offer new draft weights (from any thread; a subset of parameters is fine). They go live
        at the start of the next verify step, in the decoding thread, so no forward pass ever sees
        a half-written draft. `alpha_hint` (e.g. the trainer's probe alpha) restarts the policy's
        alpha estimate for the new version."""
        with self._lock:
            self._pending = (state_dict, version, alpha_hint)

    def apply_pending_swap(self) -> bool:
        """Between steps, on the decoding thread: make an offered version live."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        state_dict, version, alpha_hint = pending
        with torch.no_grad():
            self.draft.load_state_dict(state_dict, strict=False)
        self.fast.refresh()
        self.version = version
        self.swapped_at = time.time()
        if self.policy is not None and alpha_hint is not None:
            self.policy.reset_alpha(alpha_hint)
        return True

    def before_step(self) -> None:
        """A swap offered since the last step goes live; the reduced head follows the served tokens."""
        self.apply_pending_swap()
        if self.vocab is not None and (ids := self.vocab.maybe_refresh()) is not None:
            self.fast.set_vocab(ids)
