"""Which speculator proposes for a row this step, and how many tokens: the draft model (the floor)
or the suffix learner.

Both are priced by the speedup model of engine/policy.py, in target passes saved per second, from
live numbers only:
- the draft with k proposals: tokens(alpha, k) * T(0) / (k * t_draft + T(k)), its alpha and costs
  measured by its AdaptiveK (the best k in [0, k_max] is its offer);
- the suffix learner's proposal cut to its first m tokens:
  (1 + E[accepted of m]) * T(0) / (T(m) + switch * t_draft), E from the learner's live acceptance
  per matched depth (SuffixLearner.expected_accepted). It runs no model; its costs are the wider
  target pass and, when the draft proposed the row's last step (`switch`), the pass the draft will
  need to catch up on the tokens it did not see (one memory-bound pass, ~t_draft, whatever the
  backlog's length: `ModelRunner.catch_up`), paid once per run of suffix steps.
The better offer proposes. While the draft's costs are not measured yet it proposes (to measure
them). A small share of steps (`probe_share`) gives a suffix proposal the draft would have beaten
a short trial anyway, so the learner's acceptance keeps being measured after it collapsed and the
work returns to it as soon as it pays again.
"""

from __future__ import annotations

import random

from onspec.engine.policy import AdaptiveK
from onspec.engine.suffix import SuffixLearner, SuffixProposal


class Controller:
    def __init__(self, learner: SuffixLearner, probe_share: float = 0.05, seed: int = 0) -> None:
        self.learner = learner
        self.probe_share = probe_share
        self._rng = random.Random(seed)
        self.suffix_steps = self.draft_steps = self.probe_steps = 0

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

    def choose(self, policy: AdaptiveK | None, k_draft: int, proposal: SuffixProposal, switch: bool = False) -> int:
        """Suffix tokens to verify this step (0: the draft proposes, its k chosen by its policy).
        `switch`: the row's last step was not the suffix learner's (see `suffix_offer`)."""
        if policy is None or not proposal.tokens or policy.draft_time is None:
            self.draft_steps += 1
            return 0
        m, suffix = self.suffix_offer(policy, proposal, switch)
        draft = max(policy.expected_speedup(k) for k in range(k_draft + 1))
        if m and suffix > draft:
            self.suffix_steps += 1
            return m
        if self._rng.random() < self.probe_share:
            self.probe_steps += 1
            return min(2, len(proposal.tokens))
        self.draft_steps += 1
        return 0
