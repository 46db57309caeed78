"""experiments/online_sweep.py's measurements on tiny models: the anatomy of the static draft's
disagreements (bands add up, ceilings ordered, a draft equal to the target has none) and the
prequential replay's in-sample measurement (an update raises agreement on the block it was taught)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_online import PARAMS, TEXTS

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.online.distiller import TrainerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import online_sweep  # noqa: E402

CFG = TrainerConfig(background=False, train_layers=1, lr=3e-3, steps=8, positions="all", update_interval=4,
                    probe_every=0)


def served(tokenizer, draft):
    engine = SpeculativeEngine(tiny_model("llama", 0), tokenizer, draft, k=3)
    engine.teacher_top_k = 8
    got = []
    engine.generate([Request(tokenizer.encode(t), PARAMS) for t in TEXTS], on_finish=lambda o: got.append(o.example))
    return got


def test_a_draft_equal_to_the_target_never_disagrees(tokenizer):
    target = tiny_model("llama", 0)
    a = online_sweep.disagreements(served(tokenizer, tiny_model("llama", 0)), target, CFG)
    assert a["agreement"] == 1.0 and a["disagreements"] == 0
    assert all(v == 1.0 for v in a["ceiling"].values())
    assert "n/a" in online_sweep.anatomy_table(a).title  # no disagreements: nothing to take shares of


def test_disagreement_bands_add_up_and_ceilings_are_ordered(tokenizer):
    draft = tiny_model("llama", 7, layers=3)
    examples = served(tokenizer, draft)
    a = online_sweep.disagreements(examples, draft, CFG)
    assert a["positions"] == sum(e.num_positions for e in examples)
    assert sum(b["positions"] for b in a["bands"]) == a["positions"]
    matched = sum(b["positions"] * b["agreement"] for b in a["bands"] if b["positions"])
    assert matched == pytest.approx(a["agreement"] * a["positions"], abs=1e-3)
    assert 0 < a["disagreements"] and sum(b["share_of_disagreements"] for b in a["bands"]) == pytest.approx(1.0)
    c = a["ceiling"]
    assert a["agreement"] <= c["0.9"] <= c["0.7"] <= c["0.5"] <= 1.0


def test_replay_measures_the_taught_block_before_and_after_its_update(tokenizer):
    draft = tiny_model("llama", 7, layers=3)
    examples = served(tokenizer, draft) * 2
    console = online_sweep.Console(quiet=True)
    learnt = online_sweep._replay(examples, draft, CFG, learn=True, console=console, name="learn")
    static = online_sweep._replay(examples, draft, CFG, learn=False, console=console, name="static")
    assert learnt["updates"] >= 2 and static["updates"] == 0 and static["seen_after"] is None
    assert learnt["seen_after"] > learnt["seen_before"] + 0.05
    assert len(learnt["per_block"]) == len(static["per_block"]) == len(examples) // CFG.update_interval


def test_truncated_draft_is_the_first_layers_with_the_drafts_own_norm_and_head():
    draft = tiny_model("qwen2", 7, layers=3)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        full = draft(ids, output_hidden_states=True)
        short = online_sweep.truncated(draft, 2)
        # hidden_states[2]: layer 2's output before the final norm
        expected = draft.lm_head(draft.model.norm(full.hidden_states[2]))
        assert torch.allclose(short(ids).logits, expected, atol=1e-5)
        assert len(draft.model.layers) == draft.config.num_hidden_layers == 3  # the draft is untouched
        assert torch.equal(draft(ids).logits, full.logits)
    assert short.config.num_hidden_layers == 2 and short.lm_head.weight is draft.lm_head.weight  # shared, not copied
    with pytest.raises(SystemExit):
        online_sweep.truncated(draft, 4)


def test_a_truncated_draft_trained_whole_learns_its_taught_block(tokenizer):
    draft = tiny_model("llama", 7, layers=3)
    examples = served(tokenizer, draft) * 2
    student = online_sweep.truncated(draft, 1)
    cfg = online_sweep._config("train_layers=1,lr=3e-3,steps=8,positions=all,update_interval=4,probe_every=0")
    got = online_sweep._replay(examples, student, cfg, learn=True, console=online_sweep.Console(quiet=True), name="m1")
    assert got["seen_after"] > got["seen_before"] + 0.05
    assert got["trained_tokens"] > 0 and got["s_per_trained_token"] > 0
    assert got["trained_parameters"] < sum(p.numel() for p in draft.parameters())
