"""LoRA adapters for the online draft (`TrainerConfig.lora_rank`, issue 14): peft's adapters are
injected into the trained layers' projections; what is published, checkpointed and adopted is the
merged draft. On tiny models: the merged weights decode exactly like the unmerged student (and
equal peft's own merge), only the adapters (with the norms and the head) train, alpha rises on a
repeated stream with and without a frozen boundary, and rollback, checkpoint/resume and adopt
restore exactly the served weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import noisy_copy, plain_greedy, tiny_model
from test_online import TEXTS, serve
from test_partial_training import examples, learns_on_repeats, make
from transformers import AutoModelForCausalLM

from onspec.online.distiller import Distiller, TrainerConfig
from onspec.wiring import attach_trainer


def trained(tokenizer, **cfg) -> tuple[Distiller, object]:
    """A distiller with adapters after a few steps at a high rate (so the adapters are far from zero)."""
    engine, config = make(tokenizer, **{"lora_rank": 4, "lr": 1e-2, **cfg})
    d = Distiller(engine.draft, config)
    batch = examples(engine, tokenizer)
    for _ in range(4):
        assert d.train_step(batch) is not None
    return d, engine


@pytest.mark.parametrize("train_layers", [0, 1])
def test_merged_adapters_decode_exactly_like_the_unmerged_student(train_layers, tokenizer):
    d, engine = trained(tokenizer, train_layers=train_layers)
    assert all(float(layer.lora_B["default"].weight.abs().max()) > 0 for layer in d.adapted.values())
    merged = copy.deepcopy(engine.draft)
    merged.load_state_dict(d.weights(torch.float32), strict=False)
    student = d.student.eval()
    ids = torch.tensor([tokenizer.encode(t + " and more text") for t in TEXTS[:1]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)
    for text in TEXTS:
        prompt = tokenizer.encode(text)
        assert plain_greedy(merged, prompt, 24) == plain_greedy(student, prompt, 24), text
    # the merge is peft's own: LoraLayer.merge() on a copy gives the same weights
    by_peft = copy.deepcopy(d.student)
    for name, layer in dict(by_peft.named_modules()).items():
        if f"{name}.weight" in d.adapted:
            layer.merge()
            torch.testing.assert_close(layer.base_layer.weight, d.weights(torch.float32)[f"{name}.weight"],
                                       rtol=0, atol=0)


@pytest.mark.parametrize("train_layers, freeze_head", [(0, False), (1, False), (1, True)])
def test_only_adapters_norms_and_an_unfrozen_head_train(train_layers, freeze_head, tokenizer):
    engine, cfg = make(tokenizer, lora_rank=4, train_layers=train_layers, freeze_head=freeze_head)
    d = Distiller(engine.draft, cfg)
    scope = ("model.layers.2.",) if train_layers else ("model.layers.",)
    assert d.adapted and all(n.startswith(scope) and n.endswith("_proj.weight") for n in d.adapted)
    for name in d.trainable:
        assert ".lora_" in name or "norm" in name or (name.startswith("lm_head.") and not freeze_head), name
    assert not any(".base_layer." in n for n in d.trainable)
    assert any(n.startswith("lm_head.") for n in d.trainable) != freeze_head
    full = Distiller(engine.draft, TrainerConfig(**{**vars(cfg), "lora_rank": 0}))
    assert sum(p.numel() for p in d.trainable.values()) < sum(p.numel() for p in full.trainable.values())
    # published under the served names only, every adapted projection among them
    assert set(d.weights(torch.float32)) == set(d.published_names) <= set(dict(engine.draft.named_parameters()))
    assert set(d.adapted) <= set(d.published_names)


@pytest.mark.parametrize("train_layers", [0, 1])
def test_alpha_rises_when_adapters_learn(train_layers, tokenizer):
    engine, cfg = make(tokenizer, lora_rank=8, train_layers=train_layers, freeze_head=True, lr=1e-2)
    learns_on_repeats(engine, attach_trainer(engine, cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollback_and_resume_restore_exactly_the_served_weights(dtype, tokenizer, tmp_path, monkeypatch):
    """The checkpoint directory holds the merged draft (loadable as a plain model: `--draft DIR`);
    a restarted trainer adopts it with zeroed adapters and serves exactly what was served."""
    draft = lambda: noisy_copy(tiny_model("llama", 0), 0.1, seed=3).to(dtype)  # noqa: E731
    engine, cfg = make(tokenizer, draft=draft(), train_layers=1, lora_rank=4, probe_every=2, probe_size=4,
                       lr=1e-2, checkpoint_every=1, guard_tolerance=1.0)
    trainer = attach_trainer(engine, cfg, tmp_path)
    serve(engine, trainer, [tokenizer.encode(t) for t in TEXTS])  # every update accepted (tolerance 1)
    engine.apply_pending_swap()
    d = trainer.distiller
    assert d.version >= 1
    served = {n: p.detach().clone() for n, p in engine.draft.named_parameters()}
    trainer.distiller.cfg.guard_tolerance = 0.02
    honest = d.loss_on
    monkeypatch.setattr(d, "loss_on", lambda ex: -honest(ex))
    assert trainer.update().outcome == "rolled_back"
    assert not engine.apply_pending_swap()
    assert all(torch.equal(w, served[n]) for n, w in d.weights(dtype).items())  # the rollback restored the adapters
    trainer.checkpoint()
    saved = sorted(p for p in tmp_path.iterdir() if p.name.startswith("v"))[-1]
    plain = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)  # what `--draft DIR` loads
    assert not any(".lora_" in n or "base_layer" in n for n in plain.state_dict())
    for n, p in plain.named_parameters():
        assert torch.equal(p, served[n]), n

    fresh_engine, _ = make(tokenizer, draft=draft())
    resumed = attach_trainer(fresh_engine, cfg, tmp_path)
    assert resumed.version == d.version and fresh_engine.draft_version == d.version
    for n, p in fresh_engine.draft.named_parameters():
        assert torch.equal(p, served[n]), n
    assert all(float(layer.lora_B["default"].weight.abs().max()) == 0 for layer in resumed.distiller.adapted.values())


def test_adopt_takes_published_weights_whole_and_refuses_another_models(tokenizer):
    d, engine = trained(tokenizer, train_layers=1)
    other, _ = trained(tokenizer, train_layers=1, seed=5, lr=3e-2)
    published = other.weights(torch.float32)
    d.adopt(published, version=7, floor=9)
    assert d.version == 7 and d.version_floor == 9
    mine = d.weights(torch.float32)
    assert all(torch.equal(mine[n], published[n]) for n in published)
    assert all(float(layer.lora_B["default"].weight.abs().max()) == 0 for layer in d.adapted.values())
    name = next(iter(d.adapted))
    with pytest.raises(ValueError, match="another draft model"):
        d.adopt({name: torch.zeros(3, 3)}, version=8)
    assert torch.equal(d.weights(torch.float32)[name], published[name])  # refused before anything changed


def test_lora_refuses_what_it_cannot_do(tokenizer):
    with pytest.raises(ValueError, match="lora-rank"):
        TrainerConfig(lora_rank=4, train_embeddings=True)
    with pytest.raises(ValueError, match="lora-rank"):
        TrainerConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="no linear projections"):  # GPT-2's projections are Conv1D
        Distiller(tiny_model("gpt2", 7, layers=2), TrainerConfig(lora_rank=4))
