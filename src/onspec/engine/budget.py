"""How many prompt tokens a step prefills, and how they are shared among the prompts being prefilled.

A step runs the verify pass of every decoding row and a chunk of every prompt being prefilled; its
time is what each decoding request waits for its next tokens. `PrefillBudget` sizes the step's
prompt tokens to a step-latency target measured on the host (Sarathi-Serve's stall-free batching;
vLLM's `max_num_batched_tokens` is the fixed form, which `target="off"` keeps): from the measured
seconds of a verify step and of a prefilled token, it gives prefill what the target leaves beside
decoding, between `floor` and `cap` tokens. With no row decoding there is nothing to protect and a
step prefills `cap` tokens. `share` splits a step's tokens: prompts the engine marks `whole` (those
within `cap`: a short request's prompt is cached in the step after it arrives, beside any number of
long ones) first, then prompts whose rest fits, shortest first, and the prompts that do not fit
share what is left evenly (each advances every step).
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO_FACTOR = 2.0
"""target "auto": a step may take this many times a verify step alone (a decoding request's time
between tokens at most about doubles while prompts are prefilled beside it)."""


def parse_target(value: str) -> float | str:
    """`--step-latency`: "auto", "off", or seconds (> 0). Raises ValueError naming the option."""
    if value in ("auto", "off"):
        return value
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"--step-latency must be auto, off or a number of seconds > 0, got {value!r}")
    return seconds


@dataclass
class PrefillBudget:
    cap: int = 512
    """Most prompt tokens a step caches, over all prefilling requests (0: whole prompts at once, no budget)."""
    target: float | str = "off"
    """Seconds a step may take while rows decode; "auto": AUTO_FACTOR times the measured verify
    step; "off": every step may cache `cap` tokens."""
    floor: int = 16
    """Fewest prompt tokens a step caches while any prompt waits (prefill always progresses)."""
    probe: int = 64
    """Tokens per step before a prefilled token's cost has been measured."""
    smoothing: float = 0.25
    decode_s: float | None = None
    """Seconds of a verify step (moving average; None: none measured yet)."""
    token_s: float | None = None
    """Seconds per prefilled prompt token (moving average; None: none measured yet)."""

    def __post_init__(self) -> None:
        if self.cap < 0:
            raise ValueError(f"--prefill-chunk must be >= 0, got {self.cap}")
        if isinstance(self.target, str):
            self.target = parse_target(self.target)

    @property
    def seconds(self) -> float | None:
        """The step-latency target now (None: no target, or not measured yet)."""
        if self.target == "off":
            return None
        if self.target == "auto":
            return AUTO_FACTOR * self.decode_s if self.decode_s is not None else None
        return float(self.target)

    def observe_decode(self, seconds: float) -> None:
        self.decode_s = _mean(self.decode_s, seconds, self.smoothing)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.token_s = _mean(self.token_s, seconds / tokens, self.smoothing)

    def tokens(self, decoding: bool) -> int:
        """Prompt tokens this step may cache (0: whole prompts). decoding: rows decode this step."""
        if not self.cap or not decoding or self.target == "off":
            return self.cap
        target = self.seconds
        if target is None or self.decode_s is None or self.token_s is None:
            return min(self.cap, self.probe)
        room = (target - self.decode_s) / self.token_s
        return int(min(self.cap, max(self.floor, room + 1e-9)))  # + 1e-9: (0.3 - 0.1) / 0.002 is 99.99...

    @staticmethod
    def share(remaining: list[int], rows: list[int], budget: int, whole: list[bool] | None = None) -> list[int]:
        """Tokens per row of each prefilling group this step (a group's rows advance together):
        remaining[i] is group i's uncached prompt tokens (its longest row's), rows[i] its row count,
        budget the step's tokens (0: whole prompts). Groups marked `whole` are cached whole first,
        beyond the budget if need be; then the groups whose rest fits, cheapest first; the others
        share what is left evenly, each at least one token."""
        if not budget:
            return [0] * len(remaining)  # 0: "all the rest" to Prefill.advance
        whole = whole or [False] * len(remaining)
        chunks = [remaining[i] if whole[i] else 0 for i in range(len(remaining))]
        left = max(0, budget - sum(remaining[i] * rows[i] for i in range(len(remaining)) if whole[i]))
        rest = []
        for i in sorted((i for i in range(len(remaining)) if not whole[i]), key=lambda i: remaining[i] * rows[i]):
            if remaining[i] * rows[i] <= left:
                chunks[i], left = remaining[i], left - remaining[i] * rows[i]
            else:
                rest.append(i)
        for i in rest:
            chunks[i] = max(1, left // len(rest) // rows[i])
        return chunks

def _mean(old: float | None, new: float, smoothing: float) -> float:
    return new if old is None else (1 - smoothing) * old + smoothing * new
