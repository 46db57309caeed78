"""The online distiller on tiny models: learning, guard, NaN, atomic swap, checkpoints, buffer."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import tiny_model

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.records import RequestOutput, RequestStats
from onspec.engine.sampling import SamplingParams
from onspec.online.buffer import Example, ExampleBuilder, ReplayBuffer
from onspec.online.trainer import OnlineDistiller, TrainerConfig

TEXTS = ["the cat sat on", "hello world", "once upon a time", "def f(x):", "import numpy", "1, 2, 3,"]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


def make(tokenizer, **cfg):
    target = tiny_model("llama", 0)
    draft = tiny_model("llama", 7, layers=1)
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    config = TrainerConfig(**{"background": False, "update_interval": 2, "steps": 8, "lr": 3e-3, "positions": "all",
                              "train_embeddings": True, "probe_every": 0, **cfg})
    return engine, config


def serve(engine, distiller, prompts):
    outs = []
    for p in prompts:
        outs += engine.generate([Request(p, PARAMS)], on_record=distiller.on_record, on_finish=distiller.on_finish)
    return outs


def alpha_of(outs) -> float:
    total = RequestStats()
    for o in outs:
        total = total.merge(o.stats)
    return total.alpha


def test_alpha_rises_on_a_repeated_stream(tokenizer):
    """A random draft distilled from the target's served outputs: alpha climbs on the same prompts."""
    engine, cfg = make(tokenizer)
    distiller = OnlineDistiller(engine, cfg)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    first = alpha_of(serve(engine, distiller, prompts))
    for _ in range(5):
        serve(engine, distiller, prompts)
    last = alpha_of(serve(engine, distiller, prompts))
    engine.apply_pending_swap()  # the last offer goes live at the next verify step
    assert distiller.updates >= 10 and engine.draft_version == distiller.version
    assert first < 0.2
    assert last > first + 0.3, (first, last)


def test_output_stays_lossless_while_learning(tokenizer):
    """Draft swaps between verify steps never change the target's greedy output."""
    from conftest import plain_greedy

    engine, cfg = make(tokenizer, update_interval=1)
    distiller = OnlineDistiller(engine, cfg)
    prompts = [tokenizer.encode(t) for t in TEXTS[:3]] * 2
    outs = serve(engine, distiller, prompts)
    assert distiller.updates >= 3
    for p, o in zip(prompts, outs):
        assert o.token_ids == plain_greedy(engine.target, p, PARAMS.max_new_tokens)


def test_a_worse_update_is_rolled_back(tokenizer, monkeypatch):
    """An update made worse on purpose (gradient ascent) lowers probe alpha and is rolled back:
    weights, version and optimizer state unchanged, the rollback counted."""
    engine, cfg = make(tokenizer, probe_every=2, probe_size=4, lr=1e-2)
    distiller = OnlineDistiller(engine, cfg)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    for _ in range(3):  # learn a little first, so there is something to lose
        serve(engine, distiller, prompts)
    before = {n: p.detach().clone() for n, p in distiller.trainable.items()}
    version, rollbacks = distiller.version, distiller.rollbacks
    honest = distiller.loss_on
    monkeypatch.setattr(distiller, "loss_on", lambda ex: -honest(ex))
    entry = distiller.update()
    assert entry.outcome == "rolled_back", entry
    assert entry.probe_after < entry.probe_before - cfg.guard_tolerance
    assert distiller.rollbacks == rollbacks + 1 and distiller.version == version
    for n, p in distiller.trainable.items():
        assert torch.equal(p, before[n])


def test_guard_reuses_probe_counts_only_under_the_same_weights(tokenizer, monkeypatch):
    """The guard's "before" reuses the per-probe counts last measured under the same weights (an
    accepted update's "after", or a rolled-back update's restored "before") and evaluates only the
    probe examples added since; it must equal a full probe pass every time."""
    engine, cfg = make(tokenizer, probe_every=2, probe_size=4, update_interval=2)
    distiller = OnlineDistiller(engine, cfg)
    real_update, honest = distiller.update, distiller.loss_on
    fresh_sizes, checked = [], []

    def checked_update():
        probe = distiller.buffer.probe_examples()
        expected = distiller.probe_alpha(probe) if probe else None
        fresh = [e for e in probe if id(e) not in distiller._probe_cache]
        entry = real_update()
        if entry is not None and probe:
            assert entry.probe_before == pytest.approx(expected, abs=1e-6)  # float32 mean vs exact ratio
            fresh_sizes.append(len(fresh))
            checked.append(entry.outcome)
        return entry

    monkeypatch.setattr(distiller, "update", checked_update)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    for round_ in range(4):
        # round 2: updates made worse on purpose, rolled back, so the restored "before" counts are reused
        monkeypatch.setattr(distiller, "loss_on", (lambda ex: -honest(ex)) if round_ == 2 else honest)
        serve(engine, distiller, prompts)
    assert "accepted" in checked and "rolled_back" in checked, checked
    assert len(checked) >= 8 and max(fresh_sizes[1:]) < cfg.probe_size, fresh_sizes


def test_nan_loss_is_discarded(tokenizer, monkeypatch):
    engine, cfg = make(tokenizer)
    distiller = OnlineDistiller(engine, cfg)
    serve(engine, distiller, [tokenizer.encode(t) for t in TEXTS[:1]])  # one request: no update yet
    before = {n: p.detach().clone() for n, p in distiller.trainable.items()}
    monkeypatch.setattr(distiller, "loss_on", lambda ex: torch.tensor(float("nan"), requires_grad=True))
    entry = distiller.update()
    assert entry.outcome == "discarded_nan" and distiller.discarded == 1 and distiller.version == 0
    for n, p in distiller.trainable.items():
        assert torch.equal(p, before[n])


def test_swap_is_atomic_under_concurrent_decoding(tokenizer):
    """Weights offered from another thread while decoding: at every verify step the draft equals
    exactly the weights of the version it reports (never a mix of two versions)."""
    engine, _ = make(tokenizer)
    states = {}
    for v in range(1, 40):
        torch.manual_seed(v)
        states[v] = {n: torch.randn_like(p) * 0.02 for n, p in engine.draft.named_parameters()}
    stop = threading.Event()

    def offer():
        v = 1
        while not stop.is_set():
            engine.offer_draft(states[v], v)
            v = v % 39 + 1
            time.sleep(0.001)  # yield the GIL: a real trainer offers far less often

    seen = set()

    def check(rec):
        if rec.draft_version:
            seen.add(rec.draft_version)
            for n, p in engine.draft.named_parameters():
                assert torch.equal(p, states[rec.draft_version][n]), (rec.draft_version, n)

    thread = threading.Thread(target=offer)
    thread.start()
    try:
        for t in TEXTS:
            engine.generate([Request(tokenizer.encode(t), PARAMS)], on_record=check)
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 3


def test_background_trainer_never_blocks_and_publishes(tokenizer):
    engine, cfg = make(tokenizer, background=True)
    distiller = OnlineDistiller(engine, cfg)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    serve(engine, distiller, prompts * 2)
    distiller.wait_idle(timeout=60)
    distiller.close()
    assert distiller.updates >= 1
    engine.apply_pending_swap()
    assert engine.draft_version == distiller.version


def test_checkpoint_restart_resumes_the_draft_version(tokenizer, tmp_path):
    engine, cfg = make(tokenizer, checkpoint_every=1)
    distiller = OnlineDistiller(engine, cfg, checkpoint_dir=str(tmp_path))
    serve(engine, distiller, [tokenizer.encode(t) for t in TEXTS])
    distiller.close()
    assert distiller.updates >= 2 and (tmp_path / "LATEST").is_file()
    trained = {n: p.detach().clone() for n, p in distiller.student.named_parameters()}

    engine2, cfg2 = make(tokenizer)  # a fresh process would start from the untrained draft
    resumed = OnlineDistiller(engine2, cfg2, checkpoint_dir=str(tmp_path))
    assert resumed.version == distiller.version == engine2.draft_version
    assert resumed.updates == distiller.updates
    for n, p in resumed.student.named_parameters():
        assert torch.equal(p, trained[n]), n
    for n, p in engine2.draft.named_parameters():
        assert torch.equal(p, trained[n].to(p.dtype)), n
    assert resumed.optimizer.state_dict()["state"], "optimizer moments restored"


def test_config_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="--lr"):
        TrainerConfig(lr=0)
    with pytest.raises(ValueError, match="--beta"):
        TrainerConfig(beta=1.5)
    with pytest.raises(ValueError, match="--train-budget"):
        TrainerConfig(train_budget=0)


# -- buffer ---------------------------------------------------------------------------------------


def example(n: int, name: str = "r") -> Example:
    return Example(name, torch.zeros(4 + n, dtype=torch.int32), 4, torch.zeros(n, 2, dtype=torch.int32),
                   torch.full((n, 2), 0.5, dtype=torch.float16))


def test_buffer_is_bounded_and_evicts_the_oldest_first():
    buf = ReplayBuffer(capacity_tokens=25, probe_every=0, probe_size=0)
    for i in range(6):
        buf.add(example(10, f"r{i}"))
        assert buf.tokens <= 25
    assert [e.request_id for e in buf.examples] == ["r4", "r5"]
    assert buf.evicted == 4


def test_buffer_bounded_in_requests_too():
    buf = ReplayBuffer(capacity_tokens=1000, probe_every=0, probe_size=0, capacity_requests=3)
    for i in range(7):
        buf.add(example(2, f"r{i}"))
        assert len(buf) <= 3
    assert [e.request_id for e in buf.examples] == ["r4", "r5", "r6"]
    assert buf.evicted == 4


def test_buffer_holds_back_every_nth_request_as_probe():
    buf = ReplayBuffer(capacity_tokens=1000, probe_every=3, probe_size=2)
    routes = [buf.add(example(2, f"r{i}")) for i in range(9)]
    assert routes == ["train", "train", "probe"] * 3
    assert [e.request_id for e in buf.probe_examples()] == ["r5", "r8"]  # bounded, most recent
    assert all(e.request_id not in {"r2", "r5", "r8"} for e in buf.examples)


def test_take_batch_prefers_fresh_requests_and_mixes_in_replay():
    buf = ReplayBuffer(capacity_tokens=1000, probe_every=0, probe_size=0, seed=1)
    for i in range(8):
        buf.add(example(2, f"old{i}"))
    buf.take_batch(8)
    for i in range(4):
        buf.add(example(2, f"new{i}"))
    batch = [e.request_id for e in buf.take_batch(4, replay_share=0.5)]
    assert len(batch) == 4 and sum(b.startswith("new") for b in batch) == 2 and len(set(batch)) == 4


def test_example_builder_keeps_one_target_distribution_per_generated_token(tokenizer):
    target = tiny_model("llama", 0)
    engine = SpeculativeEngine(target, tokenizer, tiny_model("llama", 7, layers=1), k=3)
    builder = ExampleBuilder(top_k=5)
    prompt = tokenizer.encode("hello world")
    out: RequestOutput = engine.generate([Request(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))],
                                         on_record=builder.on_record)[0]
    ex = builder.finish(out)
    assert ex.num_positions == len(out.token_ids) == 10 and ex.start == len(prompt)
    with torch.no_grad():
        full = target(torch.tensor([prompt + out.token_ids])).logits[0].softmax(-1)  # [T, vocab]
    ref = full[ex.start - 1 : ex.start - 1 + ex.num_positions].topk(5, dim=-1)
    assert torch.equal(ex.top_ids.long(), ref.indices)
    assert torch.allclose(ex.top_probs.float(), ref.values, atol=1e-3)
    assert ex.top_ids[:, 0].tolist() == out.token_ids  # greedy: the target's top-1 was emitted


def test_replay_static_baseline_tf_equals_a_static_run(tmp_path):
    """The online run's `static_alpha_tf` (the starting draft teacher-forced on the served tokens)
    is exactly the static run's `alpha_tf`: greedy serving is lossless, so both served the same
    tokens, and the static draft never changes."""
    import csv
    import json

    from conftest import byte_tokenizer, noisy_copy

    from onspec.engine.engine import EngineConfig
    from onspec.engine.policy import PolicyConfig
    from onspec.models.pair import ModelConfig
    from onspec.online.replay import ReplayConfig, run_replay

    tok = byte_tokenizer()
    target = tiny_model("llama", 0)
    for name, model in (("target", target), ("draft", noisy_copy(target, 0.3, seed=1))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"prompt": f"query {i % 3} says hello"}) + "\n" for i in range(12)))
    summary = run_replay(ModelConfig(target=str(tmp_path / "target"), draft=str(tmp_path / "draft")),
                         EngineConfig(k=2), PolicyConfig(), TrainerConfig(update_interval=2, steps=2, lr=1e-2,
                                                                          background=False, probe_every=0),
                         ReplayConfig(dataset=str(stream), limit=12, max_new_tokens=8, mode="both", out=str(tmp_path / "o")))
    static = list(csv.DictReader(open(tmp_path / "o" / "replay_static.csv")))
    online = list(csv.DictReader(open(tmp_path / "o" / "replay_online.csv")))
    assert [float(r["static_alpha_tf"]) for r in online] == pytest.approx([float(r["alpha_tf"]) for r in static])
    assert summary["modes"]["online"]["updates"] >= 1
    assert summary["modes"]["online"]["static_tf"]["alpha_last"] == pytest.approx(summary["static_alpha_last"])
