"""A body refused for a field this server does not implement costs no tokenizer call (issue 41,
item 4): whichever endpoint, whatever the prompt's form (text, a one-element list, token ids, which
are decoded), and for the fields inside a chat message too. The tokenizer counts its calls; a body
that is served shows that the count sees tokenising."""

from __future__ import annotations

import pytest
from test_http_reliability import app_client, models, openai_error  # noqa: F401 (fixtures)

TOKENIZING = ("encode", "decode", "batch_decode", "apply_chat_template", "__call__", "tokenize", "convert_ids_to_tokens")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def counted(app_client, monkeypatch):  # noqa: F811
    """(client, calls): the app of test_http_reliability, and the names of the tokenizer methods it called."""
    c, state = app_client()
    calls: list[str] = []
    cls = type(state.tokenizer)
    for name in TOKENIZING:
        method = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _name=name, _method=method, **k:
                            calls.append(_name) or _method(self, *a, **k))
    return c, calls


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hello", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": ["hello"], "echo": True}, "echo"),
    ("/v1/completions", {"prompt": [104, 105], "logprobs": 1}, "logprobs"),  # ids: decoded when served
    ("/v1/completions", {"prompt": [104, 105], "min_p": 0.1}, "min_p"),
    ("/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                           {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
     "messages"),
])
def test_an_unsupported_field_is_refused_with_no_tokenizer_call(counted, path, body, param):
    c, calls = counted
    err = openai_error(c.post(path, json=body | {"max_tokens": 4}), 400, "unsupported_parameter")
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert calls == [], f"the tokenizer was called for a refused body: {calls}"
    # the same body without the field is served, and tokenising is seen
    served = {k: v for k, v in body.items() if k != param} if param != "messages" else CHAT
    assert c.post(path, json=served | {"max_tokens": 4}).status_code == 200
    assert calls, "the count saw no tokenizer call for a served body"
