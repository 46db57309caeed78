"""experiments/serving.py end to end, for a few seconds on tiny models: both modes (with and without
the long prompt) on fresh servers, and the final JSON line's shape. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_pair

pytestmark = pytest.mark.server

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "serving.py"
FIGURES = [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "p50", "p90", "p99")]


def test_serving_benchmark_reports_both_classes_and_modes(tmp_path):
    target, draft = save_tiny_pair(tmp_path)
    server_args = f"--target {target} --draft {draft} --dtype float32 --no-online --k 3"
    out = subprocess.run([sys.executable, str(SCRIPT), "--server-args", server_args, "--clients", "2", "--minutes",
                          "0.1", "--max-tokens", "8", "--streaming", "0.5", "--long-ids", "300", "--long-every", "2",
                          "--long-max-tokens", "4", "--modes", "long,none"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "serving" and result["host"]["cores"] >= 1
    assert [(r["mode"], r["round"]) for r in result["runs"]] == [("long", 1), ("none", 1)]
    for run in result["runs"]:
        classes = ("short", "long") if run["mode"] == "long" else ("short",)
        if run["mode"] == "none":
            assert run["long"] is None
        for kind in classes:
            s = run[kind]
            assert s["completed"] >= 1 and s["errors"] == 0, s["error_examples"]
            assert s["total_output_tokens"] == s["completed"] * (8 if kind == "short" else 4)
            assert s["request_throughput"] > 0 and s["output_throughput"] > 0
            assert set(FIGURES) <= set(s)
            assert s["p50_e2el_ms"] is not None and s["p50_ttft_ms"] is not None  # some streamed (long ones always)
        assert 0 < run["short"]["streaming"] <= run["short"]["completed"]
        rss = run["rss"]
        assert rss["start_gb"] > 0 and rss["end_gb"] > 0 and rss["peak_gb"] >= rss["end_gb"]
        assert rss["minute1_gb"] is None and rss["growth_minute1_to_end_pct"] is None  # a 6 s run has no minute 1
        assert len(rss["samples"]) >= 2
        server = run["server"]  # the server's /metrics histograms count what the clients got
        completed = sum(run[kind]["completed"] for kind in classes)
        assert server["e2e_request_latency"]["count"] == completed
        assert server["time_to_first_token"]["count"] == completed
        # a short request's 8 tokens come at most k + 1 = 4 a step: at least 4 after its first delivery
        assert server["inter_token_latency"]["count"] >= 4 * run["short"]["completed"]
