"""How many tokens to propose: speculation steps aside when it does not pay.

The speedup model of speculative decoding (Leviathan et al., 2023; README "What the figures mean"), with
both costs measured live:
    speedup(k) = tokens(alpha, k) * T(0) / (k * t_draft + T(k)),  tokens = (1 - alpha^(k+1)) / (1 - alpha)
where t_draft is one draft forward and T(k) one target pass over k+1 positions (T(k) grows a
little with k; with T(k) = T(0) this is the paper's formula with c = t_draft / T(0)). T(k) is a line
fitted to every target pass's width and time (decayed least squares), so a width the policy has
not chosen lately is still priced from fresh passes (per-k averages went stale: one slow pass at
k = 4 kept a run at k = 2 for ten requests).
t_draft is measured on proposal passes only: the backlog a draft builds up over steps that did
not speculate is cached in a pass of its own (`ModelRunner.catch_up`), else a probe after a long
k = 0 stretch would charge that backlog to proposing and keep k at 0.
Each step takes the k in [0, k_max] with the best expected speedup; when that is 0 (no k pays),
a small share of steps still proposes one token so alpha keeps being measured and speculation
resumes as soon as the draft (e.g. after an online update) pays. t_draft's memory counts steps, not
draft passes: a probe after a long k = 0 stretch mostly replaces the old estimate, so a draft priced
out by a passing slowdown (another process on the cores) is priced again within a few probes
(a per-pass average took ~30 probes, ~600 steps, and a bench run never recovered).

The model can be wrong: costs it does not see (catch-up passes, the step's own overhead, a kernel
whose multi-position pass costs more than its fit says) can make speculation slower than plain
decoding while the model predicts a gain. So the policy also keeps the rate each way actually
achieved, whole steps timed by the engine's clock (`observe_step`: tokens emitted over the step's
wall time, draft passes, verify pass, catch-up and overhead included): speculating steps against
plain (k = 0) steps, both decayed over a few steps. The draft's catch-up pass after plain steps
is left out (a one-time cost of having stepped aside), and so are the suffix learner's steps, which
the controller prices on their own. When the draft's steps achieve less, the policy steps aside
(k = 0; the learner may still propose where the controller finds it pays), probing again after as
many plain steps as keep the probes' cost within PROBE_BUDGET; plain steps are re-measured every
`PLAIN_EVERY` steps while the draft speculates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from onspec.config import option


DRAFT_EMA = 0.1
"""Per step: the weight of the newest draft pass in the draft's cost (older ones decay per step)."""
TARGET_FIT_DECAY = 0.99
"""Per target pass: the weight of older passes in the fit of T(k) (a memory of ~100 passes)."""
RATE_DECAY = 0.9
"""Per step of its kind: the weight of older steps in the achieved rate of speculating / plain steps."""
PLAIN_EVERY = 64
"""Steps between plain steps that re-measure the target-only rate while speculating pays."""
MIN_STEPS = 1.5
"""Decayed steps of each kind measured before the achieved rates can overrule the model (two steps)."""
PROBE_BUDGET = 0.01
"""While speculation loses: the share of time its probes may cost. A probe step loses
tokens * (plain rate / speculating rate - 1) plain steps' time, so the next probe comes that loss
/ PROBE_BUDGET plain steps later (within [MIN_ASIDE, MAX_ASIDE])."""
MIN_ASIDE, MAX_ASIDE = 4, 1000


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted per step under the i.i.d. acceptance model: (1 - alpha^(k+1)) / (1 - alpha)."""
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class PolicyConfig:
    """Choice of k per step."""

    fixed_k: bool = option(False, "always propose --k tokens per step; by default k is chosen per step in [0, --k] "
                           "from live alpha and the measured costs (0 = target only)")
    probe_share: float = option(0.05, "with adaptive k, share of steps that still propose 1 token while no k pays")
    alpha_decay: float = option(0.98, "per-step decay of the live alpha estimate (closer to 1 = longer memory)")

    def __post_init__(self) -> None:
        if not 0 <= self.probe_share <= 1:
            raise ValueError(f"--probe-share must be in [0, 1], got {self.probe_share}")
        if not 0 < self.alpha_decay < 1:
            raise ValueError(f"--alpha-decay must be in (0, 1), got {self.alpha_decay}")


def make_policy(k_max: int, config: "PolicyConfig", has_draft: bool = True) -> "AdaptiveK | None":
    """The policy an engine decodes with: adaptive (the default) or None for a fixed k."""
    if config.fixed_k or not has_draft or k_max == 0:
        return None
    return AdaptiveK(k_max, config)


class AdaptiveK:
    def __init__(self, k_max: int, config: PolicyConfig, prior_alpha: float = 0.5, seed: int = 0) -> None:
        self.k_max = k_max
        self.cfg = config
        self._accepted = prior_alpha * 4.0  # decayed counts, with 4 pseudo-observations of the prior
        self._evaluated = 4.0
        self._t_draft: float | None = None  # seconds per draft forward (EMA over steps)
        self._steps_since_draft = 0
        # T(k), seconds per target pass over k+1 positions: a line a + b*k fitted by decayed least
        # squares over every pass (sums of w, w*k, w*k^2, w*t, w*k*t), so each pass updates the
        # cost of every width, one the policy has not chosen for a while included
        self._fit = [0.0] * 5
        self._rng = random.Random(seed)
        self.probing_steps = 0
        # achieved rates: decayed (steps, tokens, seconds) of whole steps that speculated / did not
        self._achieved = {True: [0.0, 0.0, 0.0], False: [0.0, 0.0, 0.0]}
        self._since_plain = 0
        self._aside_left = 0  # plain steps before the next probe while speculation loses
        self.measuring = False
        """True when this step's k = 0 measures plain decoding: nothing at all is proposed (the suffix
        learner neither). Stepping aside (the draft losing) leaves the learner's offers to the controller."""
        self.aside_steps = 0

    @property
    def alpha(self) -> float:
        return self._accepted / self._evaluated

    @property
    def draft_time(self) -> float | None:
        """Seconds per draft forward (EMA of proposal passes); None until measured."""
        return self._t_draft

    def target_time(self, k: int) -> float | None:
        """Seconds per target pass over k+1 positions (measured, else interpolated); None until any is."""
        return self._target_time(k)

    def expected_speedup(self, k: int, alpha: float | None = None) -> float:
        """Target passes saved per second by a step of k proposals, at the live alpha (or `alpha`:
        e.g. the draft's acceptance in a kind of context, engine/controller.py)."""
        if k == 0:
            return 1.0
        t0 = self._target_time(0)
        if t0 is None or self._t_draft is None:
            return float("inf")  # costs not measured yet: try speculating to measure them
        a = self.alpha if alpha is None else alpha
        return expected_tokens(a, k) * t0 / (k * self._t_draft + self._target_time(k))

    def achieved_rate(self, speculating: bool) -> float | None:
        """Tokens per second of whole steps that speculated (or did not); None until measured."""
        steps, tokens, seconds = self._achieved[speculating]
        return tokens / seconds if steps >= MIN_STEPS and seconds > 0 else None

    @property
    def losing(self) -> bool:
        """Speculating achieved fewer tokens per second than plain steps, over recent steps."""
        spec, plain = self.achieved_rate(True), self.achieved_rate(False)
        return spec is not None and plain is not None and spec < plain

    def choose(self) -> int:
        self.measuring = False
        timed, plain_steps = self._achieved[True][0] + self._achieved[False][0], self._achieved[False][0]
        if timed and (plain_steps < MIN_STEPS or self._since_plain >= PLAIN_EVERY):
            self.measuring = True  # measure the target-only rate (a plain step never loses)
            return 0
        best = max(range(self.k_max + 1), key=self.expected_speedup)
        if best == 0 and self.k_max > 0 and self._rng.random() < self.cfg.probe_share:
            self.probing_steps += 1
            best = 1
        if best and self.losing:
            if self._aside_left > 0:
                self._aside_left -= 1
                self.aside_steps += 1
                return 0
            # probe now; the next probe waits until its expected loss is PROBE_BUDGET of the plain steps between
            spec, plain = self.achieved_rate(True), self.achieved_rate(False)
            tokens = self._achieved[True][1] / self._achieved[True][0]  # per speculating step
            loss = tokens * (plain / spec - 1.0)  # plain steps' worth of time a probe step loses
            self._aside_left = min(MAX_ASIDE, max(MIN_ASIDE, int(loss / PROBE_BUDGET)))
            self.probing_steps += 1
        return best

    def observe_step(self, speculated: bool, tokens: int, seconds: float) -> None:
        """A whole step (the drafter's rows): whether any of them speculated, the tokens they
        emitted, and its wall time by the engine's clock."""
        acc = self._achieved[speculated]
        for i, x in enumerate((1.0, tokens, seconds)):
            acc[i] = RATE_DECAY * acc[i] + x
        self._since_plain = self._since_plain + 1 if speculated else 0

    def observe(self, k: int, accepted: int, evaluated: int, draft_seconds: float, target_seconds: float,
                width: int | None = None) -> None:
        """One verify step's outcome (summed over the batch's rows) and its measured times; the
        target pass scored `width` + 1 positions (default k: wider when another speculator's row
        shared the pass)."""
        d = self.cfg.alpha_decay
        if evaluated:
            self._accepted = d * self._accepted + accepted
            self._evaluated = d * self._evaluated + evaluated
        self._steps_since_draft += 1
        if k:  # the old estimate has decayed once per step since the last draft pass
            weight = 1.0 - (1.0 - DRAFT_EMA) ** self._steps_since_draft
            self._t_draft = _ema(self._t_draft, draft_seconds / k, weight)
            self._steps_since_draft = 0
        self.observe_target(k if width is None else width, target_seconds)

    def observe_target(self, width: int, seconds: float) -> None:
        """One target pass over width + 1 positions took `seconds`."""
        d = TARGET_FIT_DECAY
        for i, x in enumerate((1.0, width, width * width, seconds, width * seconds)):
            self._fit[i] = d * self._fit[i] + x

    def reset_alpha(self, alpha: float) -> None:
        """A new draft went live: restart the estimate from a measured hint (e.g. the trainer's probe)."""
        self._accepted, self._evaluated = alpha * 4.0, 4.0

    def _target_time(self, k: int) -> float | None:
        n, sk, skk, st, skt = self._fit
        if n <= 0:
            return None
        var = skk / n - (sk / n) ** 2
        # slope only where the recent passes had different widths (else flat: memory-bound); never < 0
        slope = max(0.0, (skt / n - (sk / n) * (st / n)) / var) if var > 0.25 else 0.0
        return st / n + slope * (k - sk / n)


def _ema(old: float | None, new: float, weight: float = 0.1) -> float:
    return new if old is None else (1 - weight) * old + weight * new
