"""A drafter: one draft model and everything that runs it, for the rows of the batch it serves.

An engine verifies the rows of every drafter it holds in one target pass per step (a pool's
general draft and its specialists share the target's batch); each drafter proposes for its own
rows with its own KV cache. A drafter owns what is specific to one draft:
- `draft`: the full-precision weights, what a trainer copies and publishes into;
- `fast`: the copy that runs (reduced head, int8), refreshed after each swap;
- `vocab`: its reduced head's token set, following the tokens its rows emit;
- `policy`: its adaptive k (its own alpha and draft cost);
- `version` and the swap: `offer` from any thread, live at the start of the next step.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from onspec.engine.policy import AdaptiveK
from onspec.models.draft_vocab import DraftVocab
from onspec.models.decode import decode_forward
from onspec.models.fast_draft import FastDraft

DEFAULT = "general"
"""The name of the drafter an engine is built with (the pool's general draft)."""


class Drafter:
    def __init__(self, draft: nn.Module, *, k: int = 4, policy: AdaptiveK | None = None,
                 vocab: DraftVocab | None = None, int8: bool | str = False, name: str = DEFAULT,
                 forward: str = "auto") -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.name = name
        self.draft = draft.eval()
        self.fast = FastDraft(self.draft, vocab.ids if vocab is not None else None, int8=int8)
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
        self._lock = threading.Lock()
        self._pending: tuple[dict, int, float | None] | None = None

    def choose_k(self) -> int:
        """Proposals per row this step, at most (before each row's remaining budget)."""
        return self.policy.choose() if self.policy is not None else self.k

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

    def observe_emitted(self, emitted: list[list[int]]) -> None:
        if self.vocab is not None:
            for tokens in emitted:
                self.vocab.observe(tokens)
