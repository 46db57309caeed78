"""Which speculator proposes for a row this step, and how many tokens: the draft model (the floor)
or the suffix learner.

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

When the draft proposes, the learner may extend its proposal (`extension`): the context followed
by the draft's k tokens often continues text the stream or the request has seen, and the learner's
continuation rides in the same target pass, past the draft's last token, at no draft pass. It pays
only if the draft's k are all accepted (probability alpha^k), so m tokens are appended where
(tokens(alpha, k) + alpha^k * E[accepted of m]) * T(0) / (k * t_draft + T(k + m) + catch-up) beats
the draft's step alone; catch-up: the draft's pass over accepted extension tokens it never saw
(t_draft, with the probability that one is accepted).
"""

from __future__ import annotations

import random

from onspec.engine.policy import AdaptiveK, expected_tokens
from onspec.engine.suffix import SuffixLearner, SuffixProposal

PRIOR = 4.0
"""Pseudo-observations of the draft's live alpha that each context kind's estimate starts from."""


class Controller:
    def __init__(self, learner: SuffixLearner, probe_share: float = 0.05, seed: int = 0,
                 decay: float = 0.995) -> None:
        self.learner = learner
        self.probe_share = probe_share
        self.decay = decay
        self._rng = random.Random(seed)
        # the draft's decayed (accepted, evaluated) on steps where the learner matched a context of depth d
        self._draft: dict[int, list[float]] = {}
        self.suffix_steps = self.draft_steps = self.probe_steps = 0
        self.extended_steps = 0

    def draft_alpha(self, depth: int, live: float) -> float:
        """The draft's acceptance where the learner's first proposed token matched `depth` tokens
        (`live`: the draft's alpha over all steps, the prior)."""
        accepted, evaluated = self._draft.get(min(depth, self.learner.max_depth), (0.0, 0.0))
        return (accepted + PRIOR * live) / (evaluated + PRIOR)

    def observe_draft(self, proposal: SuffixProposal, accepted: int, evaluated: int) -> None:
        """The draft proposed for a row the learner had `proposal` for: the draft's outcome."""
        if not proposal.tokens or not evaluated:
            return
        counts = self._draft.setdefault(min(proposal.depths[0], self.learner.max_depth), [0.0, 0.0])
        factor = self.decay ** evaluated
        counts[0] = counts[0] * factor + accepted
        counts[1] = counts[1] * factor + evaluated

    def suffix_offer(self, policy: AdaptiveK, proposal: SuffixProposal, switch: bool = False) -> tuple[int, float]:
        """The best cut m of the proposal (0 if it has none) and its expected speedup; `switch`:
        the draft proposed the row's last step, so taking this one costs the draft a catch-up pass."""
        t0 = policy.target_time(0)
        catch_up = (policy.draft_time or 0.0) if switch else 0.0
        expected = self.learner.expected_accepted(proposal.depths)
        best_m, best = 0, 0.0
        for m in range(1, len(proposal.tokens) + 1):
            tm = policy.target_time(m)
            speedup = float("inf") if t0 is None or tm is None else (1.0 + expected[m]) * t0 / (tm + catch_up)
            if speedup > best:
                best_m, best = m, speedup
        return best_m, best

    def draft_offer(self, policy: AdaptiveK, k_draft: int, proposal: SuffixProposal) -> float:
        """The draft's expected speedup at its best k <= k_draft, at its acceptance in the context
        of `proposal` (one with tokens: `choose` asks only then)."""
        alpha = self.draft_alpha(proposal.depths[0], policy.alpha)
        return max(policy.expected_speedup(k, alpha) for k in range(k_draft + 1))

    def choose(self, policy: AdaptiveK | None, k_draft: int, proposal: SuffixProposal, switch: bool = False) -> int:
        """Suffix tokens to verify this step (0: the draft proposes, its k chosen by its policy).
        `switch`: the row's last step was not the suffix learner's (see `suffix_offer`)."""
        if policy is not None and policy.measuring:  # a plain step that measures target-only decoding
            return 0
        if policy is None or not proposal.tokens or policy.draft_time is None:
            self.draft_steps += 1
            return 0
        m, suffix = self.suffix_offer(policy, proposal, switch)
        if m and suffix > self.draft_offer(policy, k_draft, proposal):
            if self._rng.random() >= self.probe_share:
                self.suffix_steps += 1
                return m
            self.probe_steps += 1
        self.draft_steps += 1
        return 0

    def extension(self, policy: AdaptiveK | None, k: int, proposal: SuffixProposal) -> int:
        """Suffix tokens to append after the draft's k proposals (0: none): `proposal` continues the
        row's context followed by those k tokens. Priced at the draft's live alpha."""
        if policy is None or k <= 0 or not proposal.tokens:
            return 0
        t0, t_draft, tk = policy.target_time(0), policy.draft_time, policy.target_time(k)
        if t0 is None or t_draft is None or tk is None:
            return 0
        alpha = policy.alpha
        base = expected_tokens(alpha, k)
        reach = alpha ** k  # the draft's k accepted: the extension is verified only then
        expected = self.learner.expected_accepted(proposal.depths)
        # an accepted extension leaves the draft model tokens it never saw: one catch-up pass
        catch_up = reach * expected[1] * t_draft
        best_m, best = 0, base / (k * t_draft + tk)
        for m in range(1, len(proposal.tokens) + 1):
            rate = (base + reach * expected[m]) / (k * t_draft + policy.target_time(k + m) + catch_up)
            if rate > best:
                best_m, best = m, rate
        if best_m:
            self.extended_steps += 1
        return best_m

    def stats(self) -> dict:
        """Steps each speculator was given, and the draft's (decayed) acceptance per depth of the
        learner's first matched context, where measured: compare the learner's own by depth."""
        return {"suffix_steps": self.suffix_steps, "draft_steps": self.draft_steps, "probe_steps": self.probe_steps,
                "extended_steps": self.extended_steps,
                "draft_acceptance_by_depth": {d: round(a / e, 3) for d, (a, e) in sorted(self._draft.items()) if e}}
