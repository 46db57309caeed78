"""When a request is done: EOS, max new tokens, or a stop string (vLLM semantics).

Token ids keep the token that ended generation (EOS or the one completing a stop string);
the text excludes special tokens and is cut just before the stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from onspec.engine.sampling import SamplingParams


@dataclass
class StopResult:
    keep: int
    """How many of the newly offered tokens to keep."""
    reason: str | None
    """None (go on), 'stop' (EOS or stop string) or 'length'."""


class StopChecker:
    def __init__(self, tokenizer, eos_ids: set[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.params = params

    def check(self, generated: list[int], new: list[int]) -> StopResult:
        """`generated` holds the tokens before this step; `new` the tokens this step offers."""
        for i, tok in enumerate(new):
            if tok in self.eos_ids:  # a stop string completed before the EOS ends generation first
                return self._stop_string(generated, new[:i]) or StopResult(i + 1, "stop")
            if len(generated) + i + 1 >= self.params.max_new_tokens:
                return self._stop_string(generated, new[: i + 1]) or StopResult(i + 1, "length")
        return self._stop_string(generated, new) or StopResult(len(new), None)

    def _stop_string(self, generated: list[int], new: list[int]) -> StopResult | None:
        if not self.params.stop:
            return None
        # A stop string completed now ends in the new tokens' text and spans at most its length
        # before it: decode only a tail of the output (a token is at least one character, or a
        # piece of one of at most 4 bytes), not the whole output every step.
        tail = generated[-(4 * max(len(s) for s in self.params.stop) + 4):]
        if not any(s in self.text(tail + new) for s in self.params.stop):
            return None
        for i in range(1, len(new) + 1):  # the first new token that completes a stop string
            if any(s in self.text(tail + new[:i]) for s in self.params.stop):
                return StopResult(i, "stop")
        return None  # a stop string already present before this step cannot happen

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def final_text(self, ids: list[int]) -> str:
        text = self.text(ids)
        cuts = [text.find(s) for s in self.params.stop if s in text]
        return text[: min(cuts)] if cuts else text
