"""`onspec replay` and `onspec distill` on the small named pair (smollm2-135m, float32), small enough for CI (marked real_model)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.real_model
SMALL = ("--target", "smollm2-135m", "--dtype", "float32")


def onspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onspec.cli", args[0], *SMALL, *args[1:]], capture_output=True, text=True, timeout=900)


def test_replay_both_modes_writes_csv_plot_and_json(tmp_path):
    proc = onspec("replay", "--dataset", "humaneval", "--limit", "4", "--max-new-tokens", "8", "--mode", "both",
                  "--learn", "both", "--update-interval", "2", "--steps", "1", "--probe-every", "0", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("queries", "tokens", "alpha_first", "alpha_last", "alpha_mean", "updates", "rollbacks", "tokens_per_s"):
        assert key in summary, key
    assert summary["queries"] == 4 and summary["updates"] >= 1
    assert summary["modes"]["static"]["updates"] == 0
    for mode in ("static", "online"):
        rows = list(csv.DictReader(open(tmp_path / f"replay_{mode}.csv")))
        assert len(rows) == 4 and all(0 <= float(r["alpha_tf"]) <= 1 for r in rows)
    assert (tmp_path / "alpha.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "LATEST").is_file()


def test_replay_rejects_a_bad_dataset(tmp_path):
    proc = onspec("replay", "--dataset", "nope", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown dataset" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("trained", [(), ("--train-layers", "2", "--lora-rank", "4")])
def test_distill_writes_a_loadable_draft(trained, tmp_path):
    """Also with adapters: the directory is the merged draft, a plain model."""
    out = tmp_path / "draft"
    proc = onspec("distill", "--dataset", "humaneval", "--limit", "6", "--holdout", "2", "--epochs", "1",
                  "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out), *trained)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["responses"] == 4 and (out / "model.safetensors").is_file()
    names = safe_open(out / "model.safetensors", "pt").keys()
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora_" in n or "base_layer" in n for n in names)
    gen = onspec("generate", "--prompt", "def add(a, b):", "--max-new-tokens", "4", "--draft", str(out), "--json")
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout.strip().splitlines()[-1])["token_ids"]) == 4
