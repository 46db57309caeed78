"""Which proposer proposes for a row this step, and how many tokens: the row's draft model (the
floor) or a model-free proposer's offer (the suffix learner's, engine/suffix.py).

Both are priced by the speedup model of engine/policy.py, in target passes saved per second, from
live numbers only:
- the draft with k proposals: tokens(alpha, k) * T(0) / (k * t_draft + T(k)), its costs measured
  by its AdaptiveK (the best k in [0, k_max] is its offer). Its alpha is its acceptance in the kind
  of context the learner matched: text the stream repeats is easy for the draft too, so pricing
  the draft at its average alpha would hand the learner steps the draft would have done better.
  The controller keeps the draft's acceptance per depth of the learner's first matched context
  (`draft_alpha`), from the draft's steps where the learner had a proposal, starting from the
  draft's live alpha;
- the suffix learner's proposal cut to its first m tokens:
  (1 + E[accepted of m]) * T(0) / (T(m) + switch * t_draft), E from the learner's acceptance per
  matched depth (SuffixLearner.expected_accepted), measured on every step it had a proposal (on
  the draft's steps against the tokens they emitted). It runs no model; its costs are the wider
  target pass and, when the draft proposed the row's last step (`switch`), the pass the draft will
  need to catch up on the tokens it did not see (one memory-bound pass, ~t_draft, whatever the
  backlog's length: `ModelRunner.catch_up`), paid once per run of suffix steps.
The better offer proposes. While the draft's costs are not measured yet it proposes (to measure
them). A small share (`probe_share`) of the steps the learner wins go to the draft anyway, so the
draft's acceptance where the learner proposes keeps being measured.
"""

from __future__ import annotations

import random

from onspec.engine.policy import AdaptiveK
from onspec.engine.proposer import Draft

PRIOR = 4.0
"""Pseudo-observations of the draft's live alpha that each context kind's estimate starts from."""


MAX_DEPTH = 64
"""Matched lengths beyond this share one estimate of the draft's acceptance."""


class Controller:
    def __init__(self, probe_share: float = 0.05, seed: int = 0, decay: float = 0.995) -> None:
        self.probe_share = probe_share
        self.decay = decay
        self._rng = random.Random(seed)
        # the draft's decayed (accepted, evaluated) on steps where the learner matched a context of depth d
        self._draft: dict[int, list[float]] = {}
        self.suffix_steps = self.draft_steps = self.probe_steps = 0

    def draft_alpha(self, depth: int, live: float) -> float:
        """The draft's acceptance where the learner's first proposed token matched `depth` tokens
        (`live`: the draft's alpha over all steps, the prior)."""
        accepted, evaluated = self._draft.get(min(depth, MAX_DEPTH), (0.0, 0.0))
        return (accepted + PRIOR * live) / (evaluated + PRIOR)

    def observe_draft(self, offer: Draft, accepted: int, evaluated: int) -> None:
        """The draft proposed for a row that had this declined `offer`: the draft's outcome."""
        if not len(offer) or not evaluated:
            return
        counts = self._draft.setdefault(min(offer.match[0], MAX_DEPTH), [0.0, 0.0])
        factor = self.decay ** evaluated
        counts[0] = counts[0] * factor + accepted
        counts[1] = counts[1] * factor + evaluated

    def offer_speedup(self, policy: AdaptiveK, offer: Draft, switch: bool = False) -> tuple[int, float]:
        """The best cut m of the offer (0 if it has none) and its expected speedup; `switch`:
        the draft proposed the row's last step, so taking this one costs the draft a catch-up pass."""
        t0 = policy.target_time(0)
        catch_up = (policy.draft_time or 0.0) if switch else 0.0
        expected = offer.expected
        best_m, best = 0, 0.0
        for m in range(1, len(offer) + 1):
            tm = policy.target_time(m)
            speedup = float("inf") if t0 is None or tm is None else (1.0 + expected[m]) * t0 / (tm + catch_up)
            if speedup > best:
                best_m, best = m, speedup
        return best_m, best

    def draft_speedup(self, policy: AdaptiveK, k_draft: int, offer: Draft) -> float:
        """The draft's expected speedup at its best k <= k_draft, at its acceptance in the context
        of `offer` (one with tokens: `choose` asks only then)."""
        alpha = self.draft_alpha(offer.match[0], policy.alpha)
        return max(policy.expected_speedup(k, alpha) for k in range(k_draft + 1))

    def choose(self, policy: AdaptiveK | None, k_draft: int, offers: list[Draft], switch: bool = False
               ) -> Draft | None:
        """The offer to verify this step, cut to the length that pays (None: the draft proposes,
        its k chosen by its policy). `switch`: the row's last step was the draft's (see
        `offer_speedup`)."""
        offers = [o for o in offers if len(o)]
        if policy is not None and policy.measuring:  # a plain step that measures target-only decoding
            return None
        if policy is None or not offers or policy.draft_time is None:
            self.draft_steps += 1
            return None
        (m, speedup), offer = max(((self.offer_speedup(policy, o, switch), o) for o in offers),
                                  key=lambda x: x[0][1])
        if m and speedup > self.draft_speedup(policy, k_draft, offer):
            if self._rng.random() >= self.probe_share:
                self.suffix_steps += 1
                return offer.cut(m)
            self.probe_steps += 1
        self.draft_steps += 1
        return None

    def stats(self) -> dict:
        """Steps each speculator was given, and the draft's (decayed) acceptance per depth of the
        learner's first matched context, where measured: compare the learner's own by depth."""
        return {"suffix_steps": self.suffix_steps, "draft_steps": self.draft_steps, "probe_steps": self.probe_steps,
                "draft_acceptance_by_depth": {d: round(a / e, 3) for d, (a, e) in sorted(self._draft.items()) if e}}
