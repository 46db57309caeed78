"""Sampling parameters and logit processing, applied identically to target p and draft q.

Speculative sampling is lossless with respect to the distribution the target would sample from
*after* processing (temperature, top-k, top-p). So the same `process_logits` turns both models'
logits into probabilities before the accept test; temperature 0 means greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onspec.config import option


class InvalidRequest(ValueError):
    """A request the engine cannot run, with the field at fault (`param`) and an OpenAI-style
    `code` where one exists: the HTTP layer maps it to a 400 as is, it does not check again."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (the OpenAI/vLLM meanings)."""

    temperature: float = option(0.0, "0 decodes greedily; > 0 samples from softmax(logits / temperature)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]")
    top_k: int = option(0, "keep only the k most likely tokens; 0 disables")
    max_new_tokens: int = option(64, "generate at most this many tokens")
    stop: tuple[str, ...] = option((), "stop when the text contains this string (repeatable); it is cut from the text")
    seed: int | None = option(None, "seed of this request's random stream: the same seed gives the same output, "
                              "whatever the draft, its version or k (engine/verify.py, gumbel_verify)")
    ignore_eos: bool = option(False, "keep generating past the end-of-sequence token")

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature < math.inf):  # inf / inf = NaN where a logit is -inf
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "max_tokens")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must fit in 64 bits, got {self.seed}", "seed")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn raw logits into the distribution a sampler draws from.

    logits: [..., vocab] -> probs: [..., vocab] (float32, rows sum to 1).
    For greedy params the result is one-hot at the argmax, so the same verifier code
    reduces exactly to greedy verification.
    """
    raw = logits.float()  # [..., vocab]
    if params.greedy:
        return torch.nn.functional.one_hot(raw.argmax(-1), raw.shape[-1]).float()
    # shifted so the largest logit is 0 first, and t no smaller than 1e-20: a tiny temperature sends
    # the others to -inf (never inf - inf, nor 0 / 0 where t underflows float32, = NaN, which failed
    # the request). Below 1e-20 the result is the same in float32: the argmax, ties shared. A t
    # beyond float32 (1e300) is inf there, and a -inf logit stays -inf rather than -inf / inf = NaN.
    shifted = raw - raw.amax(-1, keepdim=True)
    logits = torch.where(shifted == float("-inf"), shifted, shifted / max(params.temperature, 1e-20))
    # The filters rank tokens by the raw logits: the order of their probabilities, without the ties a
    # huge t makes in float32 (where every logit / t rounds to 0 and any token could pass for the top).
    if params.top_k > 0 and params.top_k < raw.shape[-1]:
        kth = torch.topk(raw, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(raw < kth, float("-inf"))
    if params.top_p < 1.0:
        order = torch.argsort(raw, dim=-1, descending=True)
        sorted_probs = logits.softmax(-1).gather(-1, order)
        # drop a token when the mass strictly before it already reaches top_p. The most likely token
        # has none before it and is always kept: said outright, because a top_p below float32's
        # smallest (1e-300, 5e-324) is 0 there, and `0 >= 0` dropped every token (NaN, a failed request)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row. probs: [n, vocab] -> tokens: [n]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads (seed, position) pairs over 64 bits


def gumbel_noise(seed: int, position: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise [vocab] for output position `position` of a request seeded `seed`:
    a function of the two alone, so target and draft (and any rerun) draw the same noise there."""
    key = ((seed % 2**64) * _MIX + position * 0xBF58476D1CE4E5B9) % 2**63
    u = torch.rand(vocab, generator=torch.Generator(device=device).manual_seed(key), device=device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
