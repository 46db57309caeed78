"""The OpenAI request bodies the server accepts (pydantic, strict types: a string where a number
belongs is a 400, not a silent conversion). Unknown OpenAI fields are ignored, as vLLM does.
Every string is valid Unicode: JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no
tokenizer or UTF-8 encoder takes, so it is a 400 here rather than a 500 later."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(value: str) -> str:
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}; "
                         "send valid Unicode")
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token."""
    domain: Text | None = Field(None, min_length=1, max_length=64)
    """onspec's extension: the request's domain, for `--router field` (ignored by other routers)."""


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
