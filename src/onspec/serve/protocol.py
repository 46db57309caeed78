"""The OpenAI request bodies the server accepts (pydantic, strict types: a string where a number
belongs is a 400, not a silent conversion). Every string is valid Unicode: JSON may escape a lone
UTF-16 surrogate ("\\ud800"), which no tokenizer or UTF-8 encoder takes, so it is a 400 here
rather than a 500 later.

Every field of OpenAI's completions and chat completions bodies (and vLLM's sampling extensions)
either works, or is refused with a 400 naming it when set to anything but its "off" value
(`UNSUPPORTED`, checked by `unsupported()`), or changes nothing the server returns and is accepted
and ignored (`IGNORED`); docs/reliability-http.md has the table. A field named nowhere here is
ignored, as vLLM ignores it."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

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


# field -> the values that mean "not used" (JSON's, as parsed). Sent with any other value, the field
# is refused: decoding without it would answer a question the client did not ask.
UNSUPPORTED: dict[str, tuple] = {
    "logit_bias": (None, {}),  # NOTE: applying it (to p and q alike, so acceptance holds) is future work
    "logprobs": (None, False),  # completions' int (0 included: it asks for the sampled token's) or chat's bool
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "verbosity": (None, "medium"),
    "web_search_options": (None,),
    # vLLM's sampling extensions
    "min_p": (None, 0),
    "repetition_penalty": (None, 1),
    "min_tokens": (None, 0),
    "stop_token_ids": (None, []),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}
UNSUPPORTED_IN_MESSAGES: dict[str, tuple] = {"tool_calls": (None, []), "function_call": (None,)}
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "prompt_cache_key",
           "safety_identifier", "messages[].name", "messages[].tool_call_id", "stream_options.continuous_usage_stats")
"""Accepted and ignored: they change nothing in what the server returns (`prediction` only speeds
OpenAI's own decoding up; `messages[].name` has no place in a chat template)."""


def _off(value: Any, offs: tuple) -> bool:
    """`value` is one of the "not used" values `offs` (a bool is never taken for 0 or 1, nor the other way)."""
    for off in offs:
        if isinstance(value, bool) or isinstance(off, bool):
            same = value is off
        elif isinstance(value, (int, float)) and isinstance(off, (int, float)):
            same = value == off
        else:  # null, a string, a list, an object
            same = type(value) is type(off) and value == off
        if same:
            return True
    return False


def _refusal(fields: dict[str, Any], table: dict[str, tuple], where: str = "", param: str | None = None
             ) -> tuple[str, str] | None:
    """(message, param) for the first of `fields` that `table` refuses at its value, else None."""
    for name, offs in table.items():
        if name in fields and not _off(fields[name], offs):
            shown = json.dumps(fields[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            allowed = " or ".join(json.dumps(o) for o in offs)
            return (f"{where}{name} is not supported by this server (got {shown}); leave it out or send {allowed}",
                    param or name)
    return None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extras are kept, for `unsupported()` to look at

    model: Text | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    top_k: int = Field(0, ge=-1)
    """vLLM's extension: keep only the top_k most likely tokens; 0 or -1 keeps all."""
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token."""
    domain: Text | None = Field(None, min_length=1, max_length=64)
    """onspec's extension: the request's domain, for `--router field` (ignored by other routers)."""

    def unsupported(self) -> tuple[str, str] | None:
        """(message, field) for the first field set that this server does not implement, else None."""
        return _refusal(self.model_extra or {}, UNSUPPORTED)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extras are kept, for `unsupported()`
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

    def unsupported(self) -> tuple[str, str] | None:
        refused = super().unsupported()
        for i, m in enumerate(self.messages):
            refused = refused or _refusal(m.model_extra or {}, UNSUPPORTED_IN_MESSAGES, f"messages[{i}].", "messages")
        return refused
