"""The HTTP side of serving under hostile or careless clients (issue 15), one test per finding:
a client that leaves is cancelled while tokens flow; SIGTERM drains (503 for new requests, an
error event + [DONE] for the rest, exit 0, no traceback); big prompts are tokenised off the event
loop after a cheap length bound; a lone surrogate is a 400; NaN in the dashboard data is null;
the key is checked first and in constant time, /metrics and /dashboard can be protected, /docs is
off by default, the Host header is checked; traffic is written 0600 in a 0700 directory; admission
control: --max-queue (429 + Retry-After), --request-timeout, --read-timeout, --max-connections.

In-process tests run the ASGI app on tiny models with the scheduler thread (or without it, to hold
requests in the queue); live ones (`server` mark) start `onspec serve` on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import save_tiny_pair
from test_server import Server, sse

from onspec.apps.serve import build_state, shutdown
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.pair import ModelConfig
from onspec.online.distiller import TrainerConfig, UpdateLog
from onspec.serve.app import create_app
from onspec.serve.config import ServerConfig

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 200_000  # room for long requests, and for 900 KB prompts to pass the length bound (then be refused)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny pair of test_server.py, with a long context."""
    return save_tiny_pair(tmp_path_factory.mktemp("models-long"), context=CONTEXT)


def make_state(models, tmp_path: Path, start: bool = True, **server):
    target, draft = models
    server.setdefault("learn", "draft")  # the trainer these tests probe; the draft alone proposes (no_suffix)
    cfg = ServerConfig(state_dir=str(tmp_path / "state"), max_tokens_limit=5000, **server)
    state = build_state(ModelConfig(target=str(target), draft=str(draft), dtype="float32"), EngineConfig(k=3, no_suffix=True),
                        PolicyConfig(), TrainerConfig(), cfg)
    if start:
        state.scheduler.start()
    return state


@pytest.fixture
def app_client(models, tmp_path):
    """client(**ServerConfig options) -> an httpx client on the ASGI app (scheduler running)."""
    states = []

    def make(start: bool = True, **server):
        state = make_state(models, tmp_path / f"s{len(states)}", start=start, **server)
        states.append(state)
        return httpx.Client(transport=_SyncASGI(create_app(state)), base_url="http://127.0.0.1", timeout=60), state

    yield make
    for s in states:
        s.scheduler.close()


class _SyncASGI(httpx.BaseTransport):
    """httpx's ASGITransport is async only: run it on a private event loop per request."""

    def __init__(self, app) -> None:
        self.inner = httpx.ASGITransport(app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def go():
            request.stream = httpx.ByteStream(request.read())
            response = await self.inner.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return asyncio.run(go())


def openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# The tiny random pair repeats itself, so the suffix learner would decode a 4000-token request in 16-token
# steps within a second or two; these tests need requests that run for seconds, so their servers go
# without it (NO_SUFFIX).
NO_SUFFIX = "--no-suffix"


def long_body(n: int = 4000, **kw) -> dict:
    return {"prompt": "hello", "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def running(url: str) -> float:
    m = re.search(r"^onspec:num_requests_running (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1))


# -- a non-streaming client that leaves --------------------------------------------------------------


@pytest.mark.server
def test_nonstreaming_client_that_leaves_is_cancelled_while_tokens_flow(models, tmp_path):
    server = Server(models, tmp_path / "state", "--no-online", NO_SUFFIX, "--max-tokens-limit", "5000")
    try:
        url = httpx.URL(server.url)
        sock = socket.create_connection((url.host, url.port))
        body = json.dumps(long_body()).encode()  # ~4000 tokens: ~10 s on the tiny pair
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while running(server.url) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # tokens are flowing now
        sock.close()
        left = time.monotonic()
        while running(server.url) > 0:
            assert time.monotonic() - left < 3, "the request kept decoding after its client left"
            time.sleep(0.05)
    finally:
        log = server.stop()
    assert "cancelled by its client" in log


# -- SIGTERM: drain ----------------------------------------------------------------------------------


@pytest.mark.server
def test_sigterm_drains_then_ends_the_rest_cleanly_and_exits_0(models, tmp_path):
    server = Server(models, tmp_path / "state", "--no-online", NO_SUFFIX, "--max-tokens-limit", "5000",
                    "--shutdown-timeout", "3")
    results: dict = {}

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json=long_body(stream=True), timeout=60) as r:
            results["stream"] = (r.status_code, sse(r.iter_lines()))

    def whole(name, n):
        results[name] = httpx.post(server.url + "/v1/completions", json=long_body(n), timeout=60)

    threads = [threading.Thread(target=stream), threading.Thread(target=whole, args=("long", 4000))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while running(server.url) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    short = threading.Thread(target=whole, args=("short", 40))
    short.start()
    time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(server.url + "/v1/completions", json=long_body(5), timeout=10)  # during the drain
    health = httpx.get(server.url + "/health", timeout=10)
    for t in (*threads, short):
        t.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0
    log = server.log.read_text()

    openai_error(refused, 503, "server_shutting_down")
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert results["short"].status_code == 200  # it finished within --shutdown-timeout
    openai_error(results["long"], 503, "server_shutting_down")
    status, events = results["stream"]
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "server_shutting_down" and set(events[-2]["error"]) == {
        "message", "type", "param", "code"}
    assert "Traceback" not in log and "onspec serve: stopped" in log


# -- big prompts: off the event loop, after a cheap bound ----------------------------------------------


@pytest.mark.server
def test_big_prompts_do_not_stall_the_event_loop(models, tmp_path):
    server = Server(models, tmp_path / "state", "--no-online", "--max-body-bytes", "1000000")
    prompt = ("the quick brown fox jumps over the lazy dog. " * 20_000)[:900_000]  # 900 KB: tokenised, then too long
    try:
        statuses, latencies = [], []

        def post():
            statuses.append(httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 5},
                                       timeout=120).status_code)

        threads = [threading.Thread(target=post) for _ in range(8)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=60).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert statuses == [400] * 8  # 900,000 tokens > the context of 200,000: refused after tokenising
    assert max(latencies) < 1.5, f"/health took up to {max(latencies):.2f} s while prompts were tokenised"


def test_a_prompt_beyond_any_tokenisation_of_the_context_is_refused_before_tokenising(app_client, monkeypatch):
    c, state = app_client()
    calls = []
    monkeypatch.setattr(type(state.tokenizer), "encode", lambda self, *a, **k: calls.append(1) or [])
    longest = max(len(t) for t in state.tokenizer.get_vocab())  # 5: "<eos>"
    r = c.post("/v1/completions", json={"prompt": "x" * (CONTEXT * longest + 1), "max_tokens": 5}, headers=AUTH)
    err = openai_error(r, 400, "context_length_exceeded")
    assert err["param"] == "prompt" and "characters" in err["message"] and not calls
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * (CONTEXT * longest + 1)}]})
    assert openai_error(r, 400, "context_length_exceeded")["param"] == "messages" and not calls


def test_an_unsupported_field_is_refused_before_tokenising(app_client, monkeypatch):
    """A body refused for its fields costs no tokenizer call, however long its prompt (here one the
    length bound lets through, so only the field check can stop it)."""
    c, state = app_client()

    def tokenised(*a, **k):
        raise AssertionError("the tokenizer was called for a body refused by its fields")

    for method in ("encode", "apply_chat_template", "__call__"):
        monkeypatch.setattr(type(state.tokenizer), method, tokenised)
    prompt = "the quick brown fox " * (CONTEXT // 20)  # 200,000 characters: within the cheap bound
    for path, body in (("/v1/completions", {"prompt": prompt}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]})):
        err = openai_error(c.post(path, json=body | {"logit_bias": {"1": 5}, "max_tokens": 5}), 400,
                           "unsupported_parameter")
        assert err["param"] == "logit_bias" and "logit_bias" in err["message"], (path, err)


# -- bad text, bad numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 4}'),
    ("/v1/completions", b'{"prompt": ["\\udfff"], "max_tokens": 4}'),
    ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud800"], "max_tokens": 4}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\udc00"}], "max_tokens": 4}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
])
def test_a_lone_surrogate_is_a_400(app_client, path, body):
    c, _ = app_client()
    err = openai_error(c.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert "surrogate" in err["message"] and err["param"] in ("prompt", "stop", "messages")
    ok = c.post("/v1/completions", content=b'{"prompt": "a\\ud83d\\ude00b", "max_tokens": 2}',  # a valid pair
                headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_dashboard_data_is_valid_json_after_a_nan_update(app_client):
    c, state = app_client()
    state.trainer.distiller.history.append(UpdateLog(1, "discarded_nan", float("nan"), float("inf"), None, 0.1))
    r = c.get("/dashboard/data")
    assert r.status_code == 200, r.text
    data = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert data["updates"][-1]["loss"] is None and data["updates"][-1]["probe_before"] is None


# -- keys, hosts, docs -------------------------------------------------------------------------------------


def test_the_key_is_checked_first_and_in_constant_time(app_client, monkeypatch):
    import hmac

    c, _ = app_client(api_key=KEY)
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    bad_json = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert openai_error(bad_json, 401, "invalid_api_key") and bad_json.headers["www-authenticate"] == "Bearer"
    assert c.post("/v1/chat/completions", json={"messages": []}, headers={"Authorization": "Bearer nope"}).status_code == 401
    huge = c.post("/v1/completions", content=b"x" * 100, headers={"content-length": str(10 ** 9)})
    assert huge.status_code == 401  # not 413: nothing about the body is looked at first
    assert c.get("/v1/models").status_code == 401 and c.get("/v1/models", headers=AUTH).status_code == 200
    assert compared
    assert c.get("/metrics").status_code == 200 and c.get("/dashboard").status_code == 200  # open by default


def test_protect_metrics_puts_metrics_and_dashboard_behind_the_key(app_client):
    import base64

    c, _ = app_client(api_key=KEY, protect_metrics=True)
    for path in ("/metrics", "/dashboard", "/dashboard/data"):
        r = c.get(path)
        openai_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"].startswith("Basic")  # a browser asks for it
        assert c.get(path, headers=AUTH).status_code == 200
        basic = base64.b64encode(f"any:{KEY}".encode()).decode()
        assert c.get(path, headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert c.get("/health").status_code == 200  # probes stay open
    with pytest.raises(ValueError, match="--protect-metrics needs --api-key"):
        ServerConfig(protect_metrics=True)


def test_docs_are_off_by_default_and_on_with_the_flag(app_client):
    c, _ = app_client()
    for path in ("/docs", "/redoc", "/openapi.json"):
        openai_error(c.get(path), 404)
    c, _ = app_client(docs=True)
    assert c.get("/openapi.json").json()["paths"]["/v1/completions"] and c.get("/docs").status_code == 200


def test_host_allow_list(app_client):
    c, _ = app_client()  # bound to loopback: loopback names only (a DNS-rebinding page sends its own name)
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host
    openai_error(c.get("/health", headers={"Host": "evil.example:8000"}), 400, "invalid_host")
    c, _ = app_client(allowed_hosts=("api.example.com", "*.internal"))
    assert c.get("/health", headers={"Host": "api.example.com"}).status_code == 200
    assert c.get("/health", headers={"Host": "gpu1.internal:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "localhost"}).status_code == 400
    c, _ = app_client(host="0.0.0.0")  # bound beyond loopback with no list: any
    assert c.get("/health", headers={"Host": "whatever.example"}).status_code == 200


def test_a_warning_when_bound_beyond_loopback_without_a_key():
    from onspec.apps.serve import exposure_warning

    assert "without --api-key" in exposure_warning(ServerConfig(host="0.0.0.0"))
    assert exposure_warning(ServerConfig(host="0.0.0.0", api_key=KEY)) is None
    assert exposure_warning(ServerConfig(host="127.0.0.1")) is None and exposure_warning(ServerConfig(host="::1")) is None


# -- state files -----------------------------------------------------------------------------------------


def test_traffic_is_written_0600_in_a_0700_state_dir(models, tmp_path):
    state = make_state(models, tmp_path, start=False, persist_traffic=True)
    state_dir = tmp_path / "state"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    old = os.umask(0o022)
    try:
        shutdown(state)
    finally:
        os.umask(old)
    assert stat.S_IMODE((state_dir / "traffic.pt").stat().st_mode) == 0o600


# -- admission control -------------------------------------------------------------------------------------


def test_max_queue_answers_429_with_retry_after(app_client):
    """The scheduler is not started: requests stay queued (1 free slot + 2 waiting), and each is ended by
    --request-timeout (a 504 of its own, which is what the deadline does to a non-streaming request)."""
    c, state = app_client(start=False, max_batch=1, max_queue=2, request_timeout=2.0)
    out: list = [None] * 3

    def post(i):
        out[i] = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while state.scheduler.waiting < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
    err = openai_error(r, 429, "queue_full")
    assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    # what the limit counts: "3 requests are waiting ... (--max-queue 2)" read as a broken limit
    assert "3 requests are waiting, 1 for the decoding slots free now (of --max-batch 1) and 2 beyond them, " \
        "the most that --max-queue 2 allows" in err["message"], err
    for t in threads:
        t.join(timeout=30)
    for r in out:
        openai_error(r, 504, "request_timeout")


def test_request_timeout_ends_a_stream_with_an_error_event_and_done(app_client):
    c, _ = app_client(request_timeout=1.0)
    t0 = time.monotonic()
    r = c.post("/v1/completions", json=long_body(4000, stream=True))
    assert r.status_code == 200 and time.monotonic() - t0 < 8
    events = sse(r.text.splitlines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
    assert any("choices" in e for e in events[:-2])  # tokens flowed first


@pytest.mark.server
def test_slow_clients_are_cut_off_by_the_read_timeout(models, tmp_path):
    server = Server(models, tmp_path / "state", "--no-online", "--read-timeout", "1.5")
    url = httpx.URL(server.url)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    try:
        # three clients sending their headers one byte every 0.2 s (slowloris)
        socks = [socket.create_connection((url.host, url.port)) for _ in range(3)]
        t0 = time.monotonic()
        closed_at: dict[int, float] = {}
        while len(closed_at) < 3 and time.monotonic() - t0 < 8:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    s.sendall(head[int((time.monotonic() - t0) / 0.2) % len(head):][:1])
                except OSError:
                    closed_at[i] = time.monotonic() - t0
            time.sleep(0.2)
        assert len(closed_at) == 3 and max(closed_at.values()) < 5, closed_at
        # a client that sends its headers, then a part of its body, then nothing: 408
        s = socket.create_connection((url.host, url.port))
        s.sendall(head + b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        s.settimeout(8)
        t0 = time.monotonic()
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5, reply
        while chunk := s.recv(65536):  # the head and the body may come in separate segments; then close
            reply += chunk
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    finally:
        server.stop()


@pytest.mark.server
def test_connection_limit(models, tmp_path):
    server = Server(models, tmp_path / "state", "--no-online", "--max-connections", "4")
    url = httpx.URL(server.url)
    try:
        idle = [socket.create_connection((url.host, url.port)) for _ in range(4)]
        time.sleep(0.3)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        server.stop()


# -- sampling parameters at their extremes, fields the server does not implement (issue 26) --------------


def test_a_tiny_top_p_decodes_over_http(app_client):
    """top_p 1e-300 and 5e-324 (0 in float32) were a 500, and a stream a 200 ending in an error
    event: any top_p in (0, 1] keeps the most likely token, so each gives the greedy text. top_k 1
    (vLLM's extension, taken now) does too."""
    c, _ = app_client()
    base = {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}
    greedy = c.post("/v1/completions", json=base | {"temperature": 0})
    assert greedy.status_code == 200, greedy.text
    want = greedy.json()["choices"][0]["text"]
    for extreme in ({"top_p": 1e-300}, {"top_p": 5e-324}, {"top_k": 1}, {"top_p": 5e-324, "top_k": 1, "temperature": 100.0}):
        body = base | {"temperature": 1.0} | extreme
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (extreme, r.text)
        events = sse(c.post("/v1/completions", json=body | {"stream": True}).text.splitlines())
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), (extreme, events)
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want, extreme
    openai_error(c.post("/v1/completions", json=base | {"top_k": -2}), 400)


# a value each field refused when it is set; what "set" means is protocol.UNSUPPORTED
SET = {
    "logit_bias": {"999999999": 100}, "logprobs": 0, "top_logprobs": 2, "echo": True, "suffix": " end", "best_of": 2,
    "presence_penalty": 0.5, "frequency_penalty": -1, "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required",
    "functions": [{"name": "f"}], "function_call": {"name": "f"}, "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "reasoning_effort": "high", "verbosity": "low", "web_search_options": {},
    "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 4, "stop_token_ids": [3], "use_beam_search": True,
    "length_penalty": 0.5, "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a"],
    "guided_grammar": "root ::= 'a'",
}


def test_fields_the_server_does_not_implement_are_refused_by_name(app_client):
    """logit_bias was accepted and ignored ({"logit_bias": {"999999999": 100}} gave 200 and the usual
    text). Every OpenAI (or vLLM) field the server does not implement is a 400 naming it when set,
    on both endpoints; left at a value that means "not used" it is accepted, and the text is the
    same as without it."""
    from onspec.serve.protocol import UNSUPPORTED

    assert set(SET) == set(UNSUPPORTED), "a refused field without a test value, or the other way"
    c, _ = app_client()
    completion = {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    for path, base in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        for name, value in SET.items():
            err = openai_error(c.post(path, json=base | {name: value}), 400, "unsupported_parameter")
            assert err["param"] == name and err["message"].startswith(f"{name} is not supported"), (path, err)
        plain = c.post(path, json=base)
        assert plain.status_code == 200, plain.text
        for i in range(3):  # every "not used" value of every field, all in one request
            off = {name: offs[min(i, len(offs) - 1)] for name, offs in UNSUPPORTED.items()}
            r = c.post(path, json=base | off)
            assert r.status_code == 200, (off, r.text)
            assert r.json()["choices"] == plain.json()["choices"]
    err = openai_error(c.post("/v1/completions", json=completion | {"logit_bias": {"999999999": 100}}), 400)
    assert "logit_bias" in err["message"] and "999999999" in err["message"]
    # in a message: an assistant turn's tool calls would be dropped from the prompt
    turn = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    err = openai_error(c.post("/v1/chat/completions", json=chat | {"messages": [chat["messages"][0], turn]}),
                       400, "unsupported_parameter")
    assert err["param"] == "messages" and err["message"].startswith("messages[1].tool_calls is not supported"), err


def test_fields_that_change_nothing_are_accepted_and_ignored(app_client):
    """What protocol.IGNORED lists changes nothing the server returns: accepted, same text."""
    from onspec.serve.protocol import IGNORED

    c, _ = app_client()
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto",
                "parallel_tool_calls": False, "prediction": {"type": "content", "content": "Hi there"},
                "prompt_cache_key": "k", "safety_identifier": "s"}
    assert set(harmless) | {"messages[].name", "messages[].tool_call_id", "stream_options.continuous_usage_stats"} \
        == set(IGNORED)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "tool", "content": "1"}]
    chat = {"messages": turns, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = c.post("/v1/chat/completions", json=chat)
    assert plain.status_code == 200, plain.text
    named = [turns[0] | {"name": "ann"}, turns[1] | {"name": "bot"}, turns[2] | {"tool_call_id": "c1"}]
    body = chat | harmless | {"messages": named, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"] == plain.json()["choices"], r.text
