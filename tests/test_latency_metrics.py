"""The latency histograms of /metrics (vLLM's time to first token, inter-token latency and
end-to-end latency, under onspec's prefix): what they count, on the metrics object alone and on a
live `onspec serve` of tiny models. Counts only: no wall-clock value is asserted."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import save_tiny_pair
from test_server import Server

from onspec.serve.metrics import ServerMetrics

K = 3


def samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
            or set(s.labels) == {"le"} and s.labels["le"] == "+Inf" and s.name.endswith("_bucket")}


def test_a_delivery_of_n_tokens_counts_n_inter_token_gaps():
    m = ServerMetrics(k=K)
    m.observe_delivery(2, 0.5, first=True)  # the first delivery: one TTFT, whatever its size
    m.observe_delivery(3, 0.3, first=False)  # 3 tokens after 0.3 s: 3 gaps of 0.1 s
    m.observe_delivery(1, 0.2, first=False)
    got = samples(m.exposition().decode())
    assert got["onspec:time_to_first_token_seconds_count"] == 1
    assert got["onspec:time_to_first_token_seconds_sum"] == pytest.approx(0.5)
    assert got["onspec:inter_token_latency_seconds_count"] == 4
    assert got["onspec:inter_token_latency_seconds_sum"] == pytest.approx(0.5)  # the time from first to last delivery


@pytest.mark.server
def test_served_requests_fill_the_latency_histograms(tmp_path):
    models = save_tiny_pair(tmp_path)
    server = Server(models, tmp_path / "state", "--no-online", "--fixed-k")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            before = samples(http.get("/metrics").text)
            n = 20
            body = {"prompt": "hello world", "max_tokens": n, "temperature": 0, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
            with http.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                assert r.status_code == 200
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert events and "error" not in events[-1]
            after = samples(http.get("/metrics").text)
    finally:
        server.stop()
    delta = {name: after[name] - before.get(name, 0) for name in after}
    requests = 2
    assert delta["onspec:time_to_first_token_seconds_count"] == requests
    assert delta["onspec:e2e_request_latency_seconds_count"] == requests
    tokens = delta["onspec:generation_tokens_total"]
    assert tokens == requests * n
    # every token after each request's first delivery (a verify step delivers 1 to k + 1 tokens)
    assert tokens - requests * (K + 1) <= delta["onspec:inter_token_latency_seconds_count"] <= tokens - requests
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert after[f"onspec:{name}_seconds_bucket"] == after[f"onspec:{name}_seconds_count"]
