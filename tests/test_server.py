"""`onspec serve` as a live process on loopback, on tiny models saved to disk: the OpenAI API
(httpx and the official `openai` client), streaming, batching of concurrent clients, disconnects,
bad input, API key, Prometheus metrics, restart with the same state directory, the dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import save_tiny_pair

pytestmark = pytest.mark.server

KEY = "test-key"
ONSPEC = [sys.executable, "-m", "onspec.cli"]
PROMPTS = ["hello world", "the quick brown fox", "def f(x):", "a", "once upon a time", "SELECT * FROM", "1 2 3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("models"))


class Server:
    def __init__(self, models, state_dir: Path, *extra: str) -> None:
        target, draft = models
        self.log = state_dir.parent / f"{state_dir.name}-{time.monotonic_ns()}.log"
        args = [*ONSPEC, "serve", "--target", str(target), "--draft", str(draft), "--port", "0", "--k", "3",
                "--state-dir", str(state_dir), "--max-tokens-limit", "200", "--max-body-bytes", "20000", "--dtype", "float32", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = re.search(r"on (http://[\d.]+:\d+)", self.log.read_text())
            if m:
                self.url = m.group(1)
                break
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        else:
            raise AssertionError("server did not start: " + self.log.read_text())
        while httpx.get(self.url + "/health").status_code != 200:
            time.sleep(0.1)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        return self.log.read_text()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    # --fixed-k: every step drafts, so the drafting metrics move on every request (adaptive k may
    # step aside on these tiny models, where a draft pass costs as much as a target pass)
    s = Server(models, tmp_path_factory.mktemp("state") / "main", "--api-key", KEY, "--learn", "both", "--update-interval", "2",
               "--steps", "1", "--batch-size", "2", "--max-batch", "4", "--fixed-k")
    yield s
    s.stop()


def client(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def complete(server, prompt, max_tokens=24, **kw) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}
    r = client(server).post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(lines) -> list[dict]:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return events


# -- the API ------------------------------------------------------------------------------------------


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    data = client(server).get("/v1/models").json()["data"]
    assert [m["object"] for m in data] == ["model"] and data[0]["id"]


def test_completion_equals_onspec_generate(server, models):
    target, draft = models
    prompt, n = "hello world", 24
    out = subprocess.run([*ONSPEC, "generate", "--target", str(target), "--draft", str(draft), "--k", "3",
                          "--prompt", prompt, "--max-new-tokens", str(n), "--ignore-eos", "--json", "--dtype", "float32"],
                         capture_output=True, text=True, check=True)
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    got = complete(server, prompt, n)
    assert got["choices"][0]["text"] == expected["text"]
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == n
    spec = got["onspec"]
    assert spec["evaluated_tokens"] >= spec["accepted_tokens"] >= 0 and spec["draft_version"] is not None
    assert spec["alpha"] == pytest.approx(spec["accepted_tokens"] / spec["evaluated_tokens"])


def test_streaming_completion_concatenates_to_the_same_text(server):
    whole = complete(server, "the quick brown fox", 30)["choices"][0]["text"]
    body = {"prompt": "the quick brown fox", "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with client(server).stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "onspec" in chunks[-1]
    assert events[-2]["usage"]["completion_tokens"] == 30


def test_openai_client_chat_and_completion(server):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    model = oc.models.list().data[0].id
    chat = oc.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi there"}],
                                      max_tokens=20, temperature=0, seed=1)
    text = chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1 and chat.model_extra["onspec"]["evaluated_tokens"] >= 0
    stream = oc.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi there"}],
                                        max_tokens=20, temperature=0, seed=1, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    comp = oc.completions.create(model=model, prompt="def f(x):", max_tokens=10, temperature=0, stop=["\n\n"])
    assert comp.choices[0].finish_reason in ("stop", "length")
    # sampling: same seed, same text
    a = oc.completions.create(model=model, prompt="abc", max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    b = oc.completions.create(model=model, prompt="abc", max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_stop_string_is_cut_from_text_and_stream(server):
    whole = complete(server, "once upon a time", 40)["choices"][0]["text"]
    if len(whole) < 6:
        pytest.skip("the tiny model's text is too short to pick a stop string")
    stop = whole[3:6]
    cut = complete(server, "once upon a time", 40, stop=[stop])
    assert cut["choices"][0]["text"] == whole[: whole.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    body = {"prompt": "once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True,
            "stop": stop}
    with client(server).stream("POST", "/v1/completions", json=body) as r:
        events = sse(r.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == whole[: whole.find(stop)]


def test_concurrent_clients_each_equal_their_single_request(server):
    alone = {p: complete(server, p, 20)["choices"][0]["text"] for p in PROMPTS}
    results, errors = {}, []

    def run(p):
        try:
            results[p] = complete(server, p, 20)["choices"][0]["text"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == alone


def test_a_client_that_disconnects_does_not_stall_the_others(server):
    body = {"prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with client(server).stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
    # gone after a few tokens: the others complete, and the slot is freed
    t0 = time.monotonic()
    assert complete(server, "a", 8)["usage"]["completion_tokens"] == 8
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(server.url + "/metrics").text
        if re.search(r"^onspec:num_requests_running 0\.0$", metrics, re.M):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the disconnected request still holds its slot")
    assert time.monotonic() - t0 < 60


# -- bad input ------------------------------------------------------------------------------------------

LONG = "x" * 600  # the tiny model's context is 512 tokens (one byte = one token)
BAD = {
    "invalid json": ("/v1/completions", b"{not json", 400),
    "missing prompt": ("/v1/completions", {"max_tokens": 5}, 400),
    "missing messages": ("/v1/chat/completions", {"max_tokens": 5}, 400),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400),
    "wrong type max_tokens": ("/v1/completions", {"prompt": "a", "max_tokens": "five"}, 400),
    "wrong type temperature": ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    "unknown model": ("/v1/completions", {"prompt": "a", "model": "gpt-17"}, 404),
    "prompt too long": ("/v1/completions", {"prompt": LONG, "max_tokens": 5}, 400),
    "max_tokens 0": ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    "max_tokens over limit": ("/v1/completions", {"prompt": "a", "max_tokens": 100000}, 400),
    "negative temperature": ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400),
    "top_p 0": ("/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    "top_p over 1": ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400),
    "n 2": ("/v1/completions", {"prompt": "a", "n": 2}, 400),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400),
    "token id out of vocab": ("/v1/completions", {"prompt": [1, 2, 99999]}, 400),
    "empty stop": ("/v1/completions", {"prompt": "a", "stop": [""]}, 400),
    "oversized body": ("/v1/completions", {"prompt": "y" * 30000}, 413),
    "unknown route": ("/v1/embeddings", {"input": "a"}, 404),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_error(server, case):
    path, body, status = BAD[case]
    c = client(server)
    r = c.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
        else c.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_api_key_is_required(server):
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "a"}).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_server_still_healthy_after_bad_input(server):
    assert complete(server, "1 2 3", 5)["usage"]["completion_tokens"] == 5


# -- metrics, dashboard -----------------------------------------------------------------------------------


def test_metrics_parse_and_move(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        values = {}
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for sample in family.samples:
                key = sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else "")
                values[key] = sample.value
        return values

    before = scrape()
    complete(server, "metrics please", 16)
    after = scrape()
    g = '{"draft": "general"}'
    for name in ("onspec:spec_decode_num_drafts_total" + g, "onspec:spec_decode_num_draft_tokens_total" + g,
                 "onspec:generation_tokens_total", "onspec:e2e_request_latency_seconds_count"):
        assert after[name] > before.get(name, 0), name
    accepted = "onspec:spec_decode_num_accepted_tokens_total" + g
    assert after[accepted] >= before[accepted]
    assert 'onspec:spec_decode_num_accepted_tokens_per_pos_total{"draft": "general", "position": "0"}' in after
    assert "onspec:spec_decode_alpha_recent" in after
    for name in ("onspec:draft_version", "onspec:trainer_updates", "onspec:trainer_rollbacks", "onspec:buffer_records",
                 "onspec:trainer_time_seconds", "onspec:spec_decode_alpha_recent_by_draft"):
        assert name + g in after, name


def test_dashboard_renders_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs Debian's chromium when it can)")
    for p in PROMPTS[:3]:
        complete(server, p, 12)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--window-size=1200,1100"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", server.url + "/dashboard"], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-loaded="1"' in dom, dom[-2000:]  # the page's script fetched the data and drew
    assert "<circle" in dom and re.search(r'id="version">v\d+<', dom)
    shot = tmp_path / "dashboard.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", server.url + "/dashboard"], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("ONSPEC_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ONSPEC_KEEP_SCREENSHOT"])


# -- state ------------------------------------------------------------------------------------------------


def test_restart_resumes_the_draft_version(models, tmp_path):
    state = tmp_path / "state"
    first = Server(models, state, "--learn", "both", "--update-interval", "2", "--steps", "1", "--batch-size", "2")
    for p in PROMPTS[:4]:
        r = httpx.post(first.url + "/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0,
                                                              "ignore_eos": True}, timeout=120)
        assert r.status_code == 200
    deadline = time.monotonic() + 120
    while httpx.get(first.url + "/health").json()["draft_version"] < 1:
        assert time.monotonic() < deadline, "no draft update happened"
        time.sleep(0.2)
    version = httpx.get(first.url + "/health").json()["draft_version"]
    first.stop()
    assert (state / "checkpoints" / "LATEST").is_file()
    assert not (state / "traffic.pt").exists()  # traffic stays in memory unless --persist-traffic
    second = Server(models, state, "--no-online")
    try:
        assert httpx.get(second.url + "/health").json()["draft_version"] >= version
    finally:
        second.stop()


def test_field_routing_serves_each_domain_with_its_own_draft(models, tmp_path):
    server = Server(models, tmp_path / "state", "--learn", "draft", "--drafts", "3", "--router", "field", "--open-after", "1",
                    "--general-share", "0", "--update-interval", "2", "--steps", "1", "--batch-size", "2")
    try:
        served = {}
        for i in range(3):
            for domain, prompt in (("code", "def f(x):"), ("chat", "hello there")):
                r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12,
                               "temperature": 0, "ignore_eos": True, "domain": domain}, timeout=120)
                assert r.status_code == 200, r.text
                served.setdefault(domain, set()).add(r.json()["onspec"]["draft"])
        assert served == {"code": {"code"}, "chat": {"chat"}}
        plain = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=120).json()
        assert plain["onspec"]["draft"] == "general"  # no domain named: the general draft
        metrics = httpx.get(server.url + "/metrics").text
        assert 'onspec:spec_decode_num_drafts_total{draft="code"}' in metrics
        assert set(httpx.get(server.url + "/health").json()["drafts"]) == {"general", "code", "chat"}
    finally:
        server.stop()
    assert (tmp_path / "state" / "checkpoints" / "pool.json").is_file()
    again = Server(models, tmp_path / "state", "--learn", "draft", "--drafts", "3", "--router", "field", "--no-online")
    try:  # the pool comes back with its specialists
        assert set(httpx.get(again.url + "/health").json()["drafts"]) == {"general", "code", "chat"}
    finally:
        again.stop()


def test_persist_traffic_round_trip(models, tmp_path):
    state = tmp_path / "state"
    first = Server(models, state, "--learn", "both", "--persist-traffic", "--update-interval", "100")
    for p in PROMPTS[:3]:
        httpx.post(first.url + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0,
                                                        "ignore_eos": True}, timeout=120)
    first.stop()
    assert (state / "traffic.pt").is_file()
    second = Server(models, state, "--learn", "both", "--persist-traffic", "--update-interval", "100")
    try:
        data = httpx.get(second.url + "/dashboard/data").json()
        assert data["trainer"]["buffer_requests"] == 3
    finally:
        second.stop()


@pytest.mark.real_model
def test_default_pair_server_equals_onspec_generate(tmp_path):
    """The documented path on the small named pair: `onspec serve`, the openai client, greedy chat."""
    import openai

    log = tmp_path / "serve.log"
    small = ("--target", "smollm2-135m", "--dtype", "float32")
    proc = subprocess.Popen([*ONSPEC, "serve", *small, "--port", "0", "--state-dir", str(tmp_path / "state"), "--no-online"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        deadline = time.monotonic() + 300
        while not (m := re.search(r"on (http://[\d.]+:\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        oc = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="unused")
        question = "What is the capital of France?"
        r = oc.chat.completions.create(model="smollm2-135m", max_tokens=24, temperature=0,
                                       messages=[{"role": "user", "content": question}])
        out = subprocess.run([*ONSPEC, "generate", *small, "--chat", "--prompt", question, "--max-new-tokens", "24", "--json"],
                             capture_output=True, text=True, check=True)
        assert r.choices[0].message.content == json.loads(out.stdout.strip().splitlines()[-1])["text"]
        assert "Paris" in r.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
