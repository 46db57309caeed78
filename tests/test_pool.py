"""Draft pool and routers: language ids on fixed strings, clustering opens a cluster only past
its threshold and never beyond the cap, field routing; a pool of tiny drafts in which each draft
learns its own domain of a synthetic two-domain stream better than one shared draft does; pool
checkpoints restored with every draft's version; `onspec replay --drafts N --router ...`."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import noisy_copy, save_tiny_pair, tiny_model

from onspec.data.streams import Query
from onspec.engine.engine import Request
from onspec.engine.sampling import SamplingParams
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.online.distiller import TrainerConfig
from onspec.pool.pool import GENERAL, PoolConfig
from onspec.wiring import build_pool
from onspec.pool.routers import ClusterRouter, FieldRouter, LanguageRouter

# -- routers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, lang", [
    ("The weather is lovely today and we are going to the park.", "en"),
    ("Le temps est magnifique aujourd'hui et nous allons au parc.", "fr"),
    ("Das Wetter ist heute wunderschön und wir gehen in den Park.", "de"),
    ("El tiempo está precioso hoy y vamos al parque con los niños.", "es"),
    ("오늘 날씨가 정말 좋아서 우리는 공원에 갑니다.", "ko"),
    ("今天天气很好，我们一起去公园散步吧。", "zh"),
])
def test_language_router_identifies_fixed_strings(text, lang):
    assert LanguageRouter().route(Query("q", "t", text=text), []) == lang


def test_language_router_abstains_without_confidence():
    router = LanguageRouter(min_confidence=0.9)
    assert router.route(Query("q", "t", text="ok"), []) is None  # too short to tell
    assert router.route(Query("q", "t", text="x = f(y) + 3 * z[i] // 2"), []) is None  # code: no confident language


def test_field_router_uses_the_named_domain_then_the_source():
    router = FieldRouter()
    assert router.route(Query("q", "humaneval", text="def f"), []) == "humaneval"
    assert router.route(Query("q", "log", text="x", domain="legal"), []) == "legal"
    assert FieldRouter(use_source=False).route(Query("q", "log", text="x"), []) is None


def _two_blobs(dim=8, seed=0):
    """An embedding table whose tokens 0..9 point one way and 10..19 another (two topics)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(20, dim, generator=g) * 0.05
    table[:10, 0] += 1.0
    table[10:, 1] += 1.0
    return table


def test_cluster_router_opens_only_past_the_threshold_and_never_beyond_the_cap():
    router = ClusterRouter(_two_blobs(), threshold=0.5, min_size=5, max_open=1)
    q = Query("q", "t", text="")
    a = [[1, 2, 3], [2, 3, 4], [5, 6, 1], [7, 8, 9], [0, 1, 2], [3, 4, 5], [6, 7, 8]]
    b = [[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 10]]
    routes = []
    for x, y in zip(a, b):
        routes.append((router.route(q, x), router.route(q, y)))
    assert [r[0] for r in routes[:4]] == [None] * 4  # below min_size: the general draft
    opened = {r for pair in routes for r in pair if r is not None}
    assert len(opened) == 1  # the cap: one cluster opens, the other topic stays with the general draft
    assert sum(c.opened for c in router.clusters) == 1
    assert router.stats()["clusters"] >= 2


def test_cluster_router_separates_topics_and_state_round_trips():
    router = ClusterRouter(_two_blobs(), threshold=0.5, min_size=3, max_open=3)
    q = Query("q", "t", text="")
    for _ in range(4):
        ra = router.route(q, [1, 2, 3])
        joined_a = router.last_cluster
        rb = router.route(q, [11, 12, 13])
    assert ra is not None and rb is not None and ra != rb
    assert (f"cluster{joined_a}", f"cluster{router.last_cluster}") == (ra, rb)
    clone = ClusterRouter(_two_blobs(), threshold=0.5, min_size=3, max_open=3)
    clone.load_state_dict(router.state_dict())
    assert clone.route(q, [1, 2, 4]) == ra and clone.route(q, [11, 12, 14]) == rb


# -- a pool of tiny drafts ------------------------------------------------------------------------------------

PARAMS = SamplingParams(max_new_tokens=16, ignore_eos=True)
DOMAINS = {"letters": ["abc ab", "cab ba", "bca ac", "acb cb"], "digits": ["12 31", "3 21 2", "231 13", "1 3 2"]}


def _small_draft():
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import EOS, VOCAB

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      eos_token_id=EOS, pad_token_id=EOS + 1, bos_token_id=EOS, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _pool(tokenizer, drafts: int, tmp=None):
    target = tiny_model("llama", 0)
    trainer_cfg = TrainerConfig(background=False, update_interval=2, steps=6, lr=1e-2, positions="all",
                                probe_every=0, batch_size=4, train_embeddings=True)
    cfg = PoolConfig(drafts=drafts, router="field", general_share=0.0, open_after=1)
    pool, _ = build_pool(target, tokenizer, _small_draft(), EngineConfig(k=3, draft_quant="none"),
                         PolicyConfig(fixed_k=True), pool_cfg=cfg, trainer_cfg=trainer_cfg, checkpoints=tmp)
    return pool, FieldRouter()


def _serve(pool, router, tokenizer, rounds: int) -> dict[str, list[float]]:
    alphas = {d: [] for d in DOMAINS}
    for _ in range(rounds):
        for domain, texts in DOMAINS.items():
            for t in texts:
                q = Query(t, domain, text=t)
                ids = tokenizer.encode(t)
                key = router.route(q, ids) if pool.cfg.drafts > 1 else None
                m = pool.pick(key)
                out = m.generate([Request(ids, PARAMS)], on_finish=m.trainer.on_output)[0]
                pool.observe(key, m, out.stats.alpha)
                alphas[domain].append(out.stats.alpha)
    return alphas


def test_each_specialist_learns_its_domain_and_one_shared_draft_does_worse(tokenizer):
    pool, router = _pool(tokenizer, drafts=3)
    multi = _serve(pool, router, tokenizer, rounds=12)
    assert set(pool.members) == set(DOMAINS)
    single_pool, _ = _pool(tokenizer, drafts=1)
    single = _serve(single_pool, router, tokenizer, rounds=12)
    last = lambda xs: sum(xs[-8:]) / 8  # noqa: E731
    for d in DOMAINS:  # every specialist's alpha rises on its own domain
        assert last(multi[d]) > sum(multi[d][:4]) / 4 + 0.2, (d, multi[d])
        assert pool.members[d].trainer.distiller.updates >= 5
    assert any(last(single[d]) < last(multi[d]) - 0.02 for d in DOMAINS), (
        {d: last(single[d]) for d in DOMAINS}, {d: last(multi[d]) for d in DOMAINS})


def test_pool_checkpoints_restore_every_drafts_version(tokenizer, tmp_path):
    pool, router = _pool(tokenizer, drafts=3, tmp=tmp_path)
    _serve(pool, router, tokenizer, rounds=2)
    versions = {m.name: m.trainer.version for m in pool.all_members}
    for m in pool.all_members:
        m.trainer.checkpoint()
    pool.save_manifest(tmp_path, router.state_dict())
    assert len(versions) == 3 and all(versions[d] >= 1 for d in DOMAINS)

    restored, _ = _pool(tokenizer, drafts=3, tmp=tmp_path)
    restored.restore(tmp_path)
    assert {m.name: m.trainer.version for m in restored.all_members} == versions
    assert {m.name: m.version for m in restored.all_members} == versions
    for name, m in restored.members.items():  # the weights came back, not just the numbers
        pool.members[name].drafter.apply_pending_swap()  # the last update goes live at the next step
        a = dict(pool.members[name].draft.named_parameters())
        for n, p in m.draft.named_parameters():
            assert torch.equal(p, a[n]), (name, n)


def test_specialists_are_built_off_the_calling_thread(tokenizer):
    """With open_in_background (what the server's scheduler sets): the clone is taken on the calling
    thread, the member is built on another; `pick` answers None meanwhile, `ready` hands the member
    over once built, `on_opened` fires; a failed build falls back to the general draft."""
    import threading

    pool, _ = _pool(tokenizer, drafts=3)
    build_threads, woken = [], threading.Event()
    make, gate = pool.make_member, threading.Event()

    def slow_make(name, model):
        build_threads.append(threading.current_thread())
        gate.wait(30)
        if name == "bad":
            raise RuntimeError("no memory for another draft")
        return make(name, model)

    pool.make_member, pool.open_in_background, pool.on_opened = slow_make, True, woken.set
    assert pool.pick("letters", opens_at_once=True) is None
    assert pool.ready("letters") is None and pool.pick("letters") is None  # still being built
    gate.set()
    assert woken.wait(30)
    member = pool.ready("letters")
    assert member is pool.members["letters"] and member.name == "letters"
    assert build_threads[0] is not threading.current_thread()
    assert pool.pick("letters") is member
    woken.clear()
    assert pool.pick("bad", opens_at_once=True) is None and woken.wait(30)
    assert pool.ready("bad") is pool.general and "bad" not in pool.members


def test_a_specialist_worse_than_the_general_draft_is_degraded(tokenizer):
    pool, _ = _pool(tokenizer, drafts=2)
    pool.cfg.check_window = 8
    spec = pool.pick("letters")
    assert spec.name == "letters"
    for _ in range(4):
        pool.observe("letters", spec, 0.1)
        pool.observe("letters", pool.general, 0.6)
    assert spec.degraded and pool.pick("letters") is pool.general


def test_clones_share_the_frozen_embedding_table(tokenizer):
    target = tiny_model("llama", 0)
    cfg = TrainerConfig(background=False)  # embeddings frozen by default
    draft = noisy_copy(tiny_model("llama", 0), 0.1, seed=2)
    pool, _ = build_pool(target, tokenizer, draft, EngineConfig(k=2, draft_quant="none"), PolicyConfig(fixed_k=True),
                         pool_cfg=PoolConfig(drafts=3, router="field", open_after=1), trainer_cfg=cfg)
    one = pool.memory_bytes()
    pool.pick("a"), pool.pick("b")
    emb = draft.get_input_embeddings().weight
    for m in pool.members.values():
        assert m.draft.get_input_embeddings().weight.data_ptr() == emb.data_ptr()
        assert m.trainer.distiller.student.get_input_embeddings().weight.data_ptr() == emb.data_ptr()
    per_extra = pool.memory_per_extra_draft()
    assert per_extra < one  # an extra draft costs less than the first (the table is shared)


# -- replay with a pool ------------------------------------------------------------------------------------------


def test_replay_with_field_and_cluster_routers(tmp_path):
    from onspec.engine.engine import EngineConfig
    from onspec.engine.policy import PolicyConfig
    from onspec.models.pair import ModelConfig
    from onspec.apps.replay import ReplayConfig, run_replay

    save_tiny_pair(tmp_path, noise=0.3)
    stream = tmp_path / "mixed.jsonl"
    with open(stream, "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"def f{i}(x): return x", "domain": "code"}) + "\n")
            f.write(json.dumps({"prompt": f"Dear friend number {i}, how are you", "domain": "chat"}) + "\n")
    models = ModelConfig(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"))
    trainer = TrainerConfig(update_interval=4, steps=1, batch_size=2)
    for router in ("field", "cluster"):
        out = tmp_path / router
        summary = run_replay(models, EngineConfig(k=2), PolicyConfig(), trainer,
                             ReplayConfig(dataset=str(stream), limit=24, max_new_tokens=8, out=str(out), learn="draft"),
                             PoolConfig(drafts=3, router=router, open_after=2, cluster_min_size=4,
                                        cluster_threshold=0.3))
        rows = list(csv.DictReader(open(out / "replay_online.csv")))
        assert len(rows) == 24 and {"route", "draft"} <= set(rows[0])
        assert summary["per_draft"] and summary["pool"]["drafts"] >= 2, summary.get("pool")
        assert summary["router_us_per_request"] > 0 and (out / "alpha.png").is_file()
        assert (out / "checkpoints" / "pool.json").is_file()
        if router == "field":
            assert set(summary["per_draft"]) == {GENERAL, "code", "chat"}
            assert {r["route"] for r in rows} == {"code", "chat"}


def test_interleaved_and_concatenated_stream_segments(tmp_path):
    from onspec.apps.replay import ReplayConfig, load_stream

    for name, n in (("a", 2), ("b", 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{name}{i}"}) + "\n" for i in range(n)))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    got = [q.text for q in load_stream(ReplayConfig(dataset=f"{a}|{b}+{a}", limit=100))]
    assert got == ["a0", "b0", "a1", "b1", "b2", "b3", "a0", "a1"]


def test_replay_reports_alpha_per_segment_of_a_shift_stream(tmp_path):
    """A '+' stream (code, then chat, then code) gets one summary entry per segment, in stream
    order, with the starting draft's alpha beside it; an interleaved stream gets none."""
    from onspec.engine.engine import EngineConfig
    from onspec.engine.policy import PolicyConfig
    from onspec.models.pair import ModelConfig
    from onspec.apps.replay import ReplayConfig, run_replay

    save_tiny_pair(tmp_path, noise=0.3)
    code, chat = tmp_path / "code.jsonl", tmp_path / "chat.jsonl"
    code.write_text("".join(json.dumps({"prompt": f"def f{i}(x): return x"}) + "\n" for i in range(4)))
    chat.write_text("".join(json.dumps({"prompt": f"Dear friend {i}, how are you"}) + "\n" for i in range(6)))
    models = ModelConfig(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"))
    trainer = TrainerConfig(update_interval=4, steps=1, batch_size=2, background=False)
    shift = run_replay(models, EngineConfig(k=2), PolicyConfig(), trainer,
                       ReplayConfig(dataset=f"{code}+{chat}+{code}", limit=100, max_new_tokens=6, out=str(tmp_path / "s"),
                                    learn="draft"))
    segments = shift["per_segment"]
    assert [(s["source"], s["start"], s["queries"]) for s in segments] == [("code", 0, 4), ("chat", 4, 6), ("code", 10, 4)]
    rows = list(csv.DictReader(open(tmp_path / "s" / "replay_online.csv")))
    last_chat = [float(r["alpha_tf"]) for r in rows[4:10]][-1:]
    assert segments[1]["alpha_last"] == pytest.approx(sum(last_chat) / len(last_chat))
    assert all(s["static_tf"]["alpha_mean"] is not None for s in segments)
    mixed = run_replay(models, EngineConfig(k=2), PolicyConfig(), trainer,
                       ReplayConfig(dataset=f"{code}|{chat}", limit=100, max_new_tokens=6, out=str(tmp_path / "m"),
                                    learn="draft"))
    assert "per_segment" not in mixed


def test_route_key_general_is_the_general_draft(tokenizer):
    """A client's `domain: "general"` is the general draft itself: never a specialist that would
    share the general draft's name (its metrics label) or its checkpoint directory."""
    pool, _ = _pool(tokenizer, drafts=3)
    for _ in range(3):
        assert pool.pick("general", opens_at_once=True) is pool.general
        assert pool.pick("".join(["gen", "eral"])) is pool.general  # equal, not the same object
    assert not pool.members


def test_a_corrupt_pool_manifest_is_skipped_with_a_warning(tokenizer, tmp_path, caplog):
    for bad in ("{not json", '{"members": 3}', "[]"):
        (tmp_path / "pool.json").write_text(bad)
        (tmp_path / "router.pt").write_bytes(b"\x00garbage")
        pool, _ = _pool(tokenizer, drafts=3)
        with caplog.at_level("WARNING", logger="onspec.pool"):
            state = pool.restore(tmp_path)
        assert not pool.members and state in (None, {}) and "unreadable" in caplog.text, bad
