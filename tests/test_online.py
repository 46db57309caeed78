"""The online distiller on tiny models: learning, guard, NaN, atomic swap, checkpoints, buffer."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import torch
from conftest import tiny_model

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.records import RequestOutput, RequestStats
from onspec.engine.sampling import SamplingParams
from onspec.online.buffer import Example, ReplayBuffer
from onspec.online.distiller import TrainerConfig
from onspec.wiring import attach_trainer

TEXTS = ["the cat sat on", "hello world", "once upon a time", "def f(x):", "import numpy", "1, 2, 3,"]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


def make(tokenizer, **cfg):
    target = tiny_model("llama", 0)
    draft = tiny_model("llama", 7, layers=1)
    engine = SpeculativeEngine(target, tokenizer, draft, k=3)
    config = TrainerConfig(**{"background": False, "update_interval": 2, "steps": 8, "lr": 3e-3, "positions": "all",
                              "train_embeddings": True, "probe_every": 0, **cfg})
    return engine, config


def serve(engine, trainer, prompts):
    outs = []
    for p in prompts:
        outs += engine.generate([Request(p, PARAMS)], on_finish=trainer.on_output)
    return outs


def alpha_of(outs) -> float:
    total = RequestStats()
    for o in outs:
        total = total.merge(o.stats)
    return total.alpha


def test_alpha_rises_on_a_repeated_stream(tokenizer):
    """A random draft distilled from the target's served outputs: alpha climbs on the same prompts."""
    engine, cfg = make(tokenizer)
    trainer = attach_trainer(engine, cfg)
    distiller = trainer.distiller
    prompts = [tokenizer.encode(t) for t in TEXTS]
    first = alpha_of(serve(engine, trainer, prompts))
    for _ in range(5):
        serve(engine, trainer, prompts)
    last = alpha_of(serve(engine, trainer, prompts))
    engine.apply_pending_swap()  # the last offer goes live at the next verify step
    assert distiller.updates >= 10 and engine.draft_version == distiller.version
    assert first < 0.2
    assert last > first + 0.3, (first, last)


def test_output_stays_lossless_while_learning(tokenizer):
    """Draft swaps between verify steps never change the target's greedy output."""
    from conftest import plain_greedy

    engine, cfg = make(tokenizer, update_interval=1)
    trainer = attach_trainer(engine, cfg)
    distiller = trainer.distiller
    prompts = [tokenizer.encode(t) for t in TEXTS[:3]] * 2
    outs = serve(engine, trainer, prompts)
    assert distiller.updates >= 3
    for p, o in zip(prompts, outs):
        assert o.token_ids == plain_greedy(engine.target, p, PARAMS.max_new_tokens)


def test_a_worse_update_is_rolled_back(tokenizer, monkeypatch):
    """An update made worse on purpose (gradient ascent) lowers probe alpha and is rolled back:
    weights, version and optimizer state unchanged, the rollback counted."""
    engine, cfg = make(tokenizer, probe_every=2, probe_size=4, lr=1e-2)
    trainer = attach_trainer(engine, cfg)
    distiller = trainer.distiller
    prompts = [tokenizer.encode(t) for t in TEXTS]
    for _ in range(3):  # learn a little first, so there is something to lose
        serve(engine, trainer, prompts)
    before = {n: p.detach().clone() for n, p in distiller.trainable.items()}
    version, rollbacks = distiller.version, distiller.rollbacks
    honest = distiller.loss_on
    monkeypatch.setattr(distiller, "loss_on", lambda ex: -honest(ex))
    entry = trainer.update()
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
    trainer = attach_trainer(engine, cfg)
    distiller = trainer.distiller
    real_update, honest = distiller.update, distiller.loss_on
    fresh_sizes, checked = [], []

    def checked_update(buffer):
        probe = trainer.buffer.probe_examples()
        expected = distiller.probe_alpha(probe) if probe else None
        fresh = [e for e in probe if id(e) not in distiller._probe_cache]
        entry = real_update(buffer)
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
        serve(engine, trainer, prompts)
    assert "accepted" in checked and "rolled_back" in checked, checked
    assert len(checked) >= 8 and max(fresh_sizes[1:]) < cfg.probe_size, fresh_sizes


def test_nan_loss_is_discarded(tokenizer, monkeypatch):
    engine, cfg = make(tokenizer)
    trainer = attach_trainer(engine, cfg)
    distiller = trainer.distiller
    serve(engine, trainer, [tokenizer.encode(t) for t in TEXTS[:1]])  # one request: no update yet
    before = {n: p.detach().clone() for n, p in distiller.trainable.items()}
    monkeypatch.setattr(distiller, "loss_on", lambda ex: torch.tensor(float("nan"), requires_grad=True))
    entry = trainer.update()
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
    trainer = attach_trainer(engine, cfg)
    distiller = trainer.distiller
    prompts = [tokenizer.encode(t) for t in TEXTS]
    serve(engine, trainer, prompts * 2)
    trainer.wait_idle(timeout=60)
    trainer.close()
    assert distiller.updates >= 1
    engine.apply_pending_swap()
    assert engine.draft_version == distiller.version


def test_checkpoint_restart_resumes_the_draft_version(tokenizer, tmp_path):
    engine, cfg = make(tokenizer, checkpoint_every=1)
    trainer = attach_trainer(engine, cfg, str(tmp_path))
    distiller = trainer.distiller
    serve(engine, trainer, [tokenizer.encode(t) for t in TEXTS])
    trainer.close()
    assert distiller.updates >= 2 and (tmp_path / "LATEST").is_file()
    trained = {n: p.detach().clone() for n, p in distiller.student.named_parameters()}

    engine2, cfg2 = make(tokenizer)  # a fresh process would start from the untrained draft
    resumed = attach_trainer(engine2, cfg2, str(tmp_path)).distiller
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


def test_saved_traffic_is_owner_only_whatever_the_umask_and_reloads(tmp_path):
    """`--persist-traffic` (serve and the cluster's trainer share it): user traffic is 0600 from its
    first byte, even under umask 0 and over a leftover temporary file that was world-readable."""
    buf = ReplayBuffer(capacity_tokens=100, probe_every=2, probe_size=4)
    for i in range(4):
        buf.add(example(3, f"r{i}"))
    path = tmp_path / "traffic.pt"
    leftover = tmp_path / ".traffic.pt.tmp"
    leftover.write_bytes(b"old")
    leftover.chmod(0o666)
    old = os.umask(0)
    try:
        assert buf.save(path) == 4
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not leftover.exists()
    again = ReplayBuffer(capacity_tokens=100, probe_every=2, probe_size=4)
    assert again.load(path) == 4
    assert [e.request_id for e in again.examples] == ["r0", "r2"] and [e.request_id for e in again.probe] == ["r1", "r3"]


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


def test_engine_keeps_one_target_distribution_per_generated_token(tokenizer):
    """The Example the engine builds at the source: the target's top-K at every generated position,
    equal to a plain forward over the whole output."""
    target = tiny_model("llama", 0)
    engine = SpeculativeEngine(target, tokenizer, tiny_model("llama", 7, layers=1), k=3)
    engine.teacher_top_k = 5
    prompt = tokenizer.encode("hello world")
    finals = []
    out: RequestOutput = engine.generate([Request(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))],
                                         on_finish=finals.append)[0]
    ex = finals[0].example
    assert ex.num_positions == len(out.token_ids) == 10 and ex.start == len(prompt)
    with torch.no_grad():
        full = target(torch.tensor([prompt + out.token_ids])).logits[0].softmax(-1)  # [T, vocab]
    ref = full[ex.start - 1 : ex.start - 1 + ex.num_positions].topk(5, dim=-1)
    assert torch.equal(ex.top_ids.long(), ref.indices)
    assert torch.allclose(ex.top_probs.float(), ref.values, atol=1e-3)
    assert ex.top_ids[:, 0].tolist() == out.token_ids  # greedy: the target's top-1 was emitted


def _examples_from_full_logits(records, out, top_k: int) -> Example:
    """The examples as onspec built them before: per step record, the full-vocabulary target logits,
    softmax and top-K on the listener's side, joined in order and cut to the kept output."""
    ids, probs = [], []
    for rec in records:
        top = rec.target_logits.float().softmax(-1).topk(top_k, dim=-1)
        ids.append(top.indices.to(torch.int32))
        probs.append(top.values.to(torch.float16))
    g = len(out.token_ids)
    return Example(out.request_id, torch.tensor(out.prompt_ids + out.token_ids, dtype=torch.int32), len(out.prompt_ids),
                   torch.cat(ids)[:g], torch.cat(probs)[:g])


@pytest.mark.parametrize("sampling", [False, True])
def test_examples_at_the_source_equal_the_ones_from_full_logits(sampling, tokenizer):
    """A batch with rows of different lengths, budgets, a stop string and (parametrised) sampling:
    each finished request's Example equals, bit for bit, the one built from full logits."""
    target = tiny_model("llama", 0)
    engine = SpeculativeEngine(target, tokenizer, tiny_model("llama", 7, layers=1), k=3)
    engine.teacher_top_k, engine.record_logits = 8, True
    extra = dict(temperature=0.9, seed=3) if sampling else {}
    requests = [Request(tokenizer.encode(t), SamplingParams(max_new_tokens=n, ignore_eos=True, **extra))
                for t, n in zip(TEXTS, (12, 30, 7, 21))]
    requests.append(Request(tokenizer.encode("hello"), SamplingParams(max_new_tokens=30, stop=("e",), **extra)))
    records, finals = {}, {}
    outs = engine.generate(requests, on_record=lambda r: records.setdefault(r.request_id, []).append(r),
                           on_finish=lambda o: finals.__setitem__(o.request_id, o.example))
    for out in outs:
        got, ref = finals[out.request_id], _examples_from_full_logits(records[out.request_id], out, 8)
        assert got.start == ref.start and torch.equal(got.tokens, ref.tokens)
        assert torch.equal(got.top_ids, ref.top_ids) and torch.equal(got.top_probs, ref.top_probs), out.request_id


def test_worker_publishes_exactly_the_versions_the_distiller_accepted(tokenizer, monkeypatch):
    """Accepted updates are published (in order, with their weights); rolled-back and discarded
    ones are not; the engine serves the last published version."""
    engine, cfg = make(tokenizer, probe_every=2, probe_size=4)
    published = []
    trainer = attach_trainer(engine, cfg)
    offer = trainer.publish
    trainer.publish = lambda v, w, a: (published.append((v, {n: t.clone() for n, t in w.items()})), offer(v, w, a))
    honest = trainer.distiller.loss_on
    prompts = [tokenizer.encode(t) for t in TEXTS]
    for round_ in range(4):
        # round 2: made worse on purpose (rolled back); round 3: NaN (discarded)
        bad = {2: lambda ex: -honest(ex), 3: lambda ex: torch.tensor(float("nan"), requires_grad=True)}
        monkeypatch.setattr(trainer.distiller, "loss_on", bad.get(round_, honest))
        serve(engine, trainer, prompts)
    outcomes = [h.outcome for h in trainer.distiller.history]
    assert {"accepted", "rolled_back", "discarded_nan"} <= set(outcomes), outcomes
    accepted = [h.version for h in trainer.distiller.history if h.outcome == "accepted"]
    assert [v for v, _ in published] == accepted == trainer.published == list(range(1, len(accepted) + 1))
    engine.apply_pending_swap()
    assert engine.draft_version == accepted[-1]
    for n, p in engine.draft.named_parameters():
        if n in published[-1][1]:
            assert torch.equal(p, published[-1][1][n]), n


@pytest.mark.parametrize("mode", ["both", "interleaved"])
def test_replay_static_baseline_tf_equals_a_static_run(tmp_path, mode):
    """The online run's `static_alpha_tf` (the starting draft teacher-forced on the served tokens)
    is exactly the static run's `alpha_tf`: greedy serving is lossless, so both served the same
    tokens, and the static draft never changes; static then online, or taking turns per query."""
    import csv
    import json

    from conftest import save_tiny_pair

    from onspec.engine.engine import EngineConfig
    from onspec.engine.policy import PolicyConfig
    from onspec.models.pair import ModelConfig
    from onspec.apps.replay import ReplayConfig, run_replay

    save_tiny_pair(tmp_path, noise=0.3)
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"prompt": f"query {i % 3} says hello"}) + "\n" for i in range(12)))
    summary = run_replay(ModelConfig(target=str(tmp_path / "target"), draft=str(tmp_path / "draft")),
                         EngineConfig(k=2), PolicyConfig(), TrainerConfig(update_interval=2, steps=2, lr=1e-2,
                                                                          background=False, probe_every=0),
                         ReplayConfig(dataset=str(stream), limit=12, max_new_tokens=8, mode=mode, out=str(tmp_path / "o"),
                                      learn="draft"))
    static = list(csv.DictReader(open(tmp_path / "o" / "replay_static.csv")))
    online = list(csv.DictReader(open(tmp_path / "o" / "replay_online.csv")))
    assert [float(r["static_alpha_tf"]) for r in online] == pytest.approx([float(r["alpha_tf"]) for r in static])
    assert summary["modes"]["online"]["updates"] >= 1
    assert summary["modes"]["online"]["static_tf"]["alpha_last"] == pytest.approx(summary["static_alpha_last"])
    assert summary["interleaved"] == (mode == "interleaved") and summary["tokens_per_s_last_20pct_ratio_online_vs_static"] > 0
    assert [r["query"] for r in online] == [r["query"] for r in static] == [str(i) for i in range(12)]


def test_replay_learning_system_beside_the_floor(tmp_path):
    """`replay --mode interleaved` on its defaults: static is the floor alone (no suffix learner, no
    trainer), online the learning system (the floor frozen, the suffix learner learning every served
    output). On a stream that repeats its queries both serve the same tokens (greedy is lossless)
    and the learning system needs fewer target passes per token once it has seen them."""
    import csv
    import json

    from conftest import save_tiny_pair

    from onspec.engine.engine import EngineConfig
    from onspec.engine.policy import PolicyConfig
    from onspec.models.pair import ModelConfig
    from onspec.apps.replay import ReplayConfig, run_replay

    save_tiny_pair(tmp_path, noise=0.3)
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"prompt": f"query {i % 3} says hello"}) + "\n" for i in range(15)))
    summary = run_replay(ModelConfig(target=str(tmp_path / "target"), draft=str(tmp_path / "draft")),
                         EngineConfig(k=2), PolicyConfig(), TrainerConfig(),
                         ReplayConfig(dataset=str(stream), limit=15, max_new_tokens=16, mode="interleaved",
                                      out=str(tmp_path / "o")))
    static = list(csv.DictReader(open(tmp_path / "o" / "replay_static.csv")))
    online = list(csv.DictReader(open(tmp_path / "o" / "replay_online.csv")))
    assert all(int(r["suffix_steps"]) == 0 for r in static) and "learner" not in summary["modes"]["static"]
    assert summary["modes"]["online"]["updates"] == 0 and summary["modes"]["online"]["learner"]["version"] == 15
    assert [r["tokens"] for r in online] == [r["tokens"] for r in static]
    on, st = summary["modes"]["online"], summary["modes"]["static"]
    assert on["tokens_per_pass_last_20pct"] > st["tokens_per_pass_last_20pct"]
    assert on["learner"]["last_20pct"]["share_of_steps"] > 0
    assert on["learner"]["controller"]["suffix_steps"] > 0
    assert all(0 <= a <= 1 for a in on["learner"]["controller"]["draft_acceptance_by_depth"].values())
    assert (tmp_path / "o" / "alpha.png").is_file()
