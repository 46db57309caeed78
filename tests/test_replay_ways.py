"""`onspec replay --mode ways`: the proposers compared on one stream, taking turns per query."""

import csv
import json

import pytest
from conftest import save_tiny_pair

from onspec.apps.replay import ReplayConfig, run_replay
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.pair import ModelConfig
from onspec.online.distiller import TrainerConfig
from onspec.peers import arctic


def _replay(tmp_path, ways: str, queries: int = 15):
    save_tiny_pair(tmp_path, noise=0.3)
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"prompt": f"query {i % 3} says hello"}) + "\n" for i in range(queries)))
    summary = run_replay(ModelConfig(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"), dtype="float32",
                                     target_quant="none"),
                         EngineConfig(k=2), PolicyConfig(), TrainerConfig(),
                         ReplayConfig(dataset=str(stream), limit=queries, max_new_tokens=16, mode="ways", ways=ways,
                                      out=str(tmp_path / "o")))
    rows = {w: list(csv.DictReader(open(tmp_path / "o" / f"replay_{w}.csv"))) for w in summary["ways"]}
    return summary, rows


def test_ways_serve_the_same_tokens_and_the_learner_needs_fewer_passes(tmp_path):
    """float32, greedy: every way emits the target's own tokens; target-only makes one pass per
    token; on a stream that repeats, the learning system needs fewer passes than the floor by its
    end; the plot and the ratios are there."""
    summary, rows = _replay(tmp_path, "target,floor,adaptive")
    ways = summary["ways"]
    assert list(ways) == ["target", "floor", "adaptive"]
    assert all(w["outputs_differing_from_target"] == 0 for w in ways.values())
    assert [r["output"] for r in rows["adaptive"]] == [r["output"] for r in rows["target"]]
    assert ways["target"]["tokens_per_pass"] == pytest.approx(1.0)
    assert all(int(r["suffix_steps"]) == 0 for w in ("target", "floor") for r in rows[w])
    assert ways["adaptive"]["tokens_per_pass_last_20pct"] > ways["floor"]["tokens_per_pass_last_20pct"]
    assert set(ways["adaptive"]["vs"]) == {"target", "floor"} and ways["adaptive"]["vs"]["floor"]["tokens_per_s"] > 0
    assert summary["modes"]["adaptive"]["learner"]["version"] == 15  # it learned every output
    assert (tmp_path / "o" / "ways.png").is_file() and summary["ways_plot"].endswith("ways.png")


def test_the_reference_way(tmp_path):
    """The SuffixDecoding reference as a way, beside the draft, lossless; where it cannot be built
    it is left out with its reason and the others still run."""
    why = arctic.available()
    summary, rows = _replay(tmp_path, "target,arctic", queries=6)
    if why is not None:
        assert list(summary["ways"]) == ["target"]
        pytest.skip(f"the reference cannot be built here: {why}")
    assert summary["ways"]["arctic"]["outputs_differing_from_target"] == 0
    assert sum(int(r["arctic_steps"]) for r in rows["arctic"]) > 0


def test_bad_ways_are_refused():
    with pytest.raises(ValueError, match="--ways"):
        ReplayConfig(mode="ways", ways="target,magic")
    with pytest.raises(ValueError, match="--ways"):
        ReplayConfig(mode="ways", ways="floor,floor")


def test_the_learner_variants_as_ways(tmp_path):
    """SuffixDecoding's scoring and tree speculation as ways beside the default learner: float32,
    greedy, every way emits the target's tokens; the tree way verifies trees."""
    summary, rows = _replay(tmp_path, "target,adaptive,adaptive-probability,adaptive-tree")
    assert all(w["outputs_differing_from_target"] == 0 for w in summary["ways"].values())
    for way in ("adaptive-probability", "adaptive-tree"):
        assert summary["modes"][way]["learner"]["version"] == 15
        assert sum(int(r["suffix_steps"]) for r in rows[way]) > 0
