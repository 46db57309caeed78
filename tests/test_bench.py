"""`onspec bench`'s measuring (bench/compare.py) on tiny local models: every way decodes every
prompt, the greedy ways agree token for token in float32, and the summary holds what the printed
tables and the JSON line are made of. Nothing here asserts a time."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_pair

from onspec.bench.compare import BenchConfig, measure
from onspec.bench.report import finish, save_json
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.pair import ModelConfig


@pytest.fixture(scope="module")
def local_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_tiny_pair(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("hello world", "def f(x):", "the quick brown fox", "once upon a time")))
    return root, prompts


def test_measure_interleaves_every_way_and_greedy_ways_agree(local_pair):
    root, prompts = local_pair
    model_cfg = ModelConfig(target=str(root / "target"), draft=str(root / "draft"), dtype="float32", no_pack=True)
    cfg = BenchConfig(dataset=str(prompts), prompts=3, pool=4, max_new_tokens=12,
                      ways="target,adaptive,fixed,hf-greedy,hf-assisted", no_cost_curve=True)
    lines = []
    result = measure(model_cfg, EngineConfig(k=3, draft_quant="none"), PolicyConfig(), cfg, log=lines.append)
    assert sum(line.startswith("[") for line in lines) == 3  # one progress line per prompt
    ways = result["ways"]
    assert set(ways) == {"target", "adaptive", "fixed", "hf-greedy", "hf-assisted"}
    for name, way in ways.items():
        assert way["tokens"] > 0 and way["tok_s"] > 0
        assert way["outputs_differing_from_own_target_only"] == 0, name  # lossless, float32
    assert ways["fixed"]["mean_k"] > 0 and 0 <= ways["fixed"]["alpha"] <= 1
    assert result["speedup_fixed"] == ways["fixed"]["ratio_to_onspec_target_only"]
    assert ways["hf-assisted"]["baseline"] == "hf-greedy"
    json.dumps(result)  # the JSON line


def test_a_benchmark_ends_with_its_summary_saved_and_printed_last(tmp_path, capsys):
    summary = {"ways": {"target": {"tok_s": 14.5}}, "ratio": 1.33}
    save_json(None, summary)  # no --out: nothing written
    assert list(tmp_path.iterdir()) == []
    assert finish(tmp_path / "out", summary) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
