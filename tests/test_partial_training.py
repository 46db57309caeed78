"""Training only the top layers of the draft (`TrainerConfig.train_layers`, issue 14): the frozen
layers' output at the boundary is computed once per buffered request and kept, and a training
step runs only the layers above it. On tiny models: the same loss and gradients as a full forward
through the frozen layers (also with the head frozen, `freeze_head`), alpha still rises on a
repeated stream, the frozen layers never change (and are shared with the serving draft, not
copied, in its dtype), each example's boundary is computed once, and rollback and
checkpoint/resume restore exactly the served weights."""

from __future__ import annotations

import pytest
import torch
from conftest import noisy_copy, tiny_model
from test_online import PARAMS, TEXTS, alpha_of, serve

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.online import distiller as distiller_module
from onspec.online.distiller import Distiller, TrainerConfig
from onspec.wiring import attach_trainer


def make(tokenizer, arch="llama", draft=None, **cfg):
    target = tiny_model(arch, 0)
    draft = draft if draft is not None else tiny_model(arch, 7, layers=3)
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    config = TrainerConfig(**{"background": False, "update_interval": 2, "steps": 8, "lr": 3e-3, "positions": "all",
                              "probe_every": 0, "train_layers": 1, **cfg})
    return engine, config


def learns_on_repeats(engine, trainer, rounds=5):
    """Serve TEXTS `rounds` + 2 times with the trainer on: alpha must rise by 0.2 from the first
    pass to the last, over at least 10 updates."""
    prompts = [engine.tokenizer.encode(t) for t in TEXTS]
    first = alpha_of(serve(engine, trainer, prompts))
    for _ in range(rounds):
        serve(engine, trainer, prompts)
    last = alpha_of(serve(engine, trainer, prompts))
    assert trainer.distiller.updates >= 10
    assert last > first + 0.2, (first, last)


def examples(engine, tokenizer, n=4):
    engine.teacher_top_k = 8
    got = []
    engine.generate([Request(tokenizer.encode(t), PARAMS) for t in TEXTS[:n]], on_finish=lambda o: got.append(o.example))
    return got


@pytest.mark.parametrize("arch, train_layers, freeze_head", [
    *((arch, m, False) for arch in ("llama", "qwen2") for m in (1, 2, 3)), ("qwen2", 1, True), ("llama", 2, True)])
def test_top_layers_from_kept_boundary_give_the_full_forwards_gradients(arch, train_layers, freeze_head, tokenizer):
    """The loss and every trained parameter's gradient equal those of a full forward through the
    frozen layers (the same parameters trained, the rest frozen), to float32 tolerance; also with
    a context window that cuts the prompt, and with the head frozen (the gradient passes through it)."""
    engine, cfg = make(tokenizer, arch, train_layers=train_layers, freeze_head=freeze_head)
    batch = examples(engine, tokenizer)
    for window in (512, 12):
        partial = Distiller(engine.draft, TrainerConfig(**{**vars(cfg), "max_train_tokens": window}))
        full = Distiller(engine.draft, TrainerConfig(**{**vars(cfg), "train_layers": 0, "max_train_tokens": window}))
        assert partial.boundary == 3 - train_layers
        assert any(n.startswith("lm_head.") for n in partial.trainable) != freeze_head
        for name, p in full.trainable.items():  # the full forward trains the same parameters only
            p.requires_grad_(name in partial.trainable)
        loss_p, loss_f = partial.loss_on(batch), full.loss_on(batch)
        torch.testing.assert_close(loss_p, loss_f, rtol=1e-5, atol=1e-6)
        loss_p.backward()
        loss_f.backward()
        for name, p in partial.trainable.items():
            torch.testing.assert_close(p.grad, full.trainable[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_the_top_layers_and_norm_are_trained_and_the_rest_is_shared(tokenizer):
    engine, cfg = make(tokenizer, train_layers=1)
    d = Distiller(engine.draft, cfg)
    head = () if engine.draft.config.tie_word_embeddings else ("lm_head.",)  # an untied head lies above the boundary
    assert all(n.startswith(("model.layers.2.", "model.norm.", *head)) for n in d.trainable), sorted(d.trainable)
    assert any(n.startswith("model.layers.2.") for n in d.trainable) and "model.norm.weight" in d.trainable
    served = dict(engine.draft.named_parameters())
    for name, p in d.student.named_parameters():  # frozen float32 tensors are the serving draft's own
        if name not in d.trainable:
            assert p.data_ptr() == served[name].data_ptr() and not p.requires_grad, name


@pytest.mark.parametrize("freeze_head", [False, True])
def test_alpha_rises_when_only_the_top_layer_learns(freeze_head, tokenizer):
    engine, cfg = make(tokenizer, train_layers=1, freeze_head=freeze_head)
    trainer = attach_trainer(engine, cfg)
    assert any(n.startswith("lm_head.") for n in trainer.distiller.trainable) != freeze_head
    frozen = {n: p.detach().clone() for n, p in engine.draft.named_parameters() if n not in trainer.distiller.trainable}
    learns_on_repeats(engine, trainer)
    engine.apply_pending_swap()
    for n, p in engine.draft.named_parameters():  # the frozen layers never moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_each_example_crosses_the_frozen_layers_once(tokenizer, monkeypatch):
    engine, cfg = make(tokenizer, train_layers=1, update_interval=2, steps=4, batch_size=2, replay_share=0.5)
    trainer = attach_trainer(engine, cfg)
    crossed = []
    real = distiller_module.boundary_states

    def counting(model, seqs, layer, window):
        crossed.extend(id(tokens) for tokens, _ in seqs)
        return real(model, seqs, layer, window)

    monkeypatch.setattr(distiller_module, "boundary_states", counting)
    serve(engine, trainer, [tokenizer.encode(t) for t in TEXTS] * 2)
    assert trainer.distiller.updates + trainer.distiller.rollbacks >= 4
    held = {id(e.tokens) for e in trainer.buffer.held()}
    assert len(crossed) == len(set(crossed))  # once per example, however often it is trained on
    assert set(crossed) <= held and len(crossed) >= len(held) - cfg.update_interval  # (the newest may wait)
    assert trainer.distiller.boundary_bytes > 0


@pytest.mark.parametrize("freeze_head, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_rollback_and_resume_restore_exactly_the_served_weights(freeze_head, dtype, tokenizer, tmp_path, monkeypatch):
    """A draft that agrees partly (so a worse update shows on the probe), its top layer trained;
    also a bf16 draft, whose frozen part the student shares in bf16."""
    engine, cfg = make(tokenizer, draft=noisy_copy(tiny_model("llama", 0), 0.1, seed=3).to(dtype), train_layers=1,
                       probe_every=2, probe_size=4, lr=1e-3, checkpoint_every=1, guard_tolerance=1.0,
                       freeze_head=freeze_head)
    trainer = attach_trainer(engine, cfg, tmp_path)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    serve(engine, trainer, prompts)  # a few versions, every one accepted (the guard is off: tolerance 1)
    engine.apply_pending_swap()
    trainer.distiller.cfg.guard_tolerance = 0.02
    served = {n: p.detach().clone() for n, p in engine.draft.named_parameters()}
    d = trainer.distiller
    honest = d.loss_on
    monkeypatch.setattr(d, "loss_on", lambda ex: -honest(ex))
    assert trainer.update().outcome == "rolled_back"
    assert not engine.apply_pending_swap()  # nothing new was published
    trainer.checkpoint()

    fresh_engine, _ = make(tokenizer, draft=noisy_copy(tiny_model("llama", 0), 0.1, seed=3).to(dtype))
    resumed = attach_trainer(fresh_engine, cfg, tmp_path)
    assert resumed.version == d.version >= 1 and fresh_engine.draft_version == d.version
    for n, p in fresh_engine.draft.named_parameters():
        assert torch.equal(p, served[n]), n


def test_a_bf16_drafts_frozen_part_is_shared_in_bf16_and_the_rest_trains_in_float32(tokenizer):
    """A bf16 serving draft: its embeddings and frozen layers are the student's own (no float32
    copy; the served draft stays bf16), the boundary states are kept in bf16, the trained layers
    and the (frozen) head run in float32, a step learns and publishes bf16 weights, and the mixed
    student still generates whole (student-sampled data)."""
    engine, cfg = make(tokenizer, draft=tiny_model("llama", 7, layers=3, dtype=torch.bfloat16), train_layers=1,
                       freeze_head=True, data_source="student")
    served = dict(engine.draft.named_parameters())
    d = Distiller(engine.draft, cfg, teacher=lambda ids: engine.target(ids).logits)
    assert all(p.dtype == torch.bfloat16 for p in engine.draft.parameters())  # the served draft was not converted
    for name, p in d.student.named_parameters():
        if name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens.")):
            assert p is served[name] and p.dtype == torch.bfloat16, name
        else:
            assert p.dtype == torch.float32 and p.data_ptr() != served[name].data_ptr(), name
    assert set(d.trainable) == {n for n in served if n.startswith(("model.layers.2.", "model.norm."))}
    batch = examples(engine, tokenizer)
    before = {n: p.detach().clone() for n, p in d.trainable.items()}
    assert d.train_step([d._student_sampled(e) for e in batch]) is not None  # generation through the mixed student
    assert all(st.dtype == torch.bfloat16 for _, st, _, _ in d._states.values())
    assert any(not torch.equal(before[n], p) for n, p in d.trainable.items())
    assert all(w.dtype == torch.bfloat16 for w in d.weights(torch.bfloat16).values())


def test_train_layers_refuses_what_it_cannot_do(tokenizer):
    with pytest.raises(ValueError, match="train-embeddings"):
        TrainerConfig(train_layers=2, train_embeddings=True)
    with pytest.raises(ValueError, match="train-layers"):
        Distiller(tiny_model("gpt2", 7, layers=2), TrainerConfig(train_layers=1))
    tied = tiny_model("llama", 7, layers=2)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="freeze-head"):
        Distiller(tied, TrainerConfig(train_embeddings=True, freeze_head=True))
