"""A bounded soak of a live `onspec serve` (experiments/soak.py, shortened for CI): mixed streaming,
non-streaming, abandoned, sampling and bad requests for 45 s while the trainer updates the draft
every 2 requests. No 5xx, every bad request a 4xx with an OpenAI-shaped body, every greedy answer
equal to the same prompt served alone (float32), and the draft really changed during the soak."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import save_tiny_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from soak import soak  # noqa: E402

pytestmark = pytest.mark.server


def test_mixed_traffic_while_learning(tmp_path):
    save_tiny_pair(tmp_path)
    result = soak(["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--dtype", "float32",
                   "--k", "3", "--learn", "both", "--update-interval", "2", "--steps", "1", "--lr", "1e-3", "--probe-every", "0"],
                  seconds=45, concurrency=4, max_tokens=24)
    assert result["server_errors"] == 0, result["errors"]
    assert result["bad_not_4xx"] == 0
    assert result["greedy_compared"] >= 10 and result["greedy_mismatches"] == 0, result["mismatch_examples"]
    assert set(result["kinds"]) == {"greedy", "stream", "abandon", "sample", "bad"}
    assert result["trainer_updates"] and len(result["draft_versions"]) >= 2, result
    assert len(result["rss_samples"]) >= 3 and result["rss_end_mb"] > 0  # sampled every 30 s, and at the end
