"""The one place that connects the parts: the engine, its drafters, their trainers, the pool and
the router.

serve, replay, the benchmarks and the tests build through here, so a drafter always gets its
trainer the same way (the engine keeps teacher data, the worker publishes into the drafter), every
draft of a pool verifies in the one engine's target passes, and a pool's members always find their
checkpoints in the same places (the general draft in the root, a specialist in a directory of its
own under it, `member_dir`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from torch import nn

from onspec.engine.build import make_drafter, make_engine
from onspec.engine.drafter import Drafter
from onspec.engine.engine import EngineConfig, SpeculativeEngine
from onspec.engine.policy import PolicyConfig
from onspec.online.checkpoint import CheckpointStore
from onspec.online.distiller import Distiller, TrainerConfig
from onspec.online.worker import TrainerWorker
from onspec.pool.pool import GENERAL, DraftPool, Member, PoolConfig
from onspec.pool.routers import Router, make_router


def attach_trainer(engine: SpeculativeEngine, cfg: TrainerConfig, checkpoint_dir: str | Path | None = None,
                   drafter: Drafter | None = None) -> TrainerWorker:
    """A trainer that learns a drafter's draft (the engine's own by default) from the requests it
    serves: the engine keeps the target's top-K per emitted token, the worker publishes accepted
    versions into the drafter. A version resumed from `checkpoint_dir` is live before this returns."""
    drafter = drafter or engine.drafter
    if drafter is None:
        raise ValueError("online distillation needs a draft model")
    target = engine.target
    distiller = Distiller(drafter.draft, cfg, teacher=lambda ids: target(ids).logits)
    engine.teacher_top_k = cfg.teacher_top_k

    def publish(version: int, weights: dict, alpha_hint: float | None) -> None:
        drafter.offer(weights, version, alpha_hint)

    worker = TrainerWorker(distiller, cfg, publish, weights_dtype=next(drafter.draft.parameters()).dtype,
                           store=CheckpointStore(checkpoint_dir) if checkpoint_dir else None,
                           tokenizer=engine.tokenizer)
    drafter.apply_pending_swap()
    return worker


def member_dir(root: Path, name: str) -> Path:
    """A pool member's checkpoint directory. The general draft, named by the pool's `GENERAL`
    constant itself, keeps `root`. A specialist's name is a route key a client can set (`domain`),
    so it never becomes a path as is: `root/<slug>-<sha256 of the key, 16 hex>`, the slug being the
    key's [A-Za-z0-9_-] characters (others -> `_`, at most 40). Nothing escapes root, distinct keys
    never share a directory, no name looks like a checkpoint version (`v000012`) or a temporary
    file; a client's route key "general" never reaches here, the pool serves it with the general draft."""
    if name == GENERAL:  # the pool reserves this key for the general draft (DraftPool.pick)
        return root
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:40] or "route"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return root / f"{slug}-{digest}"


def build_pool(target: nn.Module, tokenizer, draft: nn.Module | None, engine_cfg: EngineConfig,
               policy_cfg: PolicyConfig | None = None, pool_cfg: PoolConfig | None = None, *,
               trainer_cfg: TrainerConfig | None = None, checkpoints: Path | None = None,
               on_member: Callable[[Member], None] | None = None,
               ) -> tuple[DraftPool, Router | None]:
    """The engine and its draft pool (a single draft is a pool of one) and the router (None for
    one draft). Every member is a drafter of the one engine, so the rows of all drafts verify in
    one target pass per step. With `trainer_cfg` every member learns online and resumes from its
    checkpoint directory; without it a member still loads its last checkpoint (served as is). A
    previous run's specialists are re-opened from `checkpoints`. `on_member` sees every member as
    it is made (e.g. to reload its buffered traffic)."""
    pool_cfg = pool_cfg or PoolConfig()
    if draft is None and pool_cfg.drafts > 1:
        raise ValueError("--drafts > 1 needs a draft (drop --no-draft)")
    engine = make_engine(target, tokenizer, draft, engine_cfg, policy_cfg)

    def make_member(name: str, model: nn.Module | None) -> Member:
        """The general draft is the engine's own; a specialist's drafter joins the engine when the
        pool adopts it (on the decoding thread)."""
        drafter = engine.drafter if name == GENERAL else make_drafter(target, tokenizer, model, name, engine_cfg,
                                                                      policy_cfg)
        where = member_dir(checkpoints, name) if checkpoints is not None else None
        trainer = None
        if trainer_cfg is not None and drafter is not None:
            trainer = attach_trainer(engine, trainer_cfg, where, drafter)
        elif drafter is not None and where is not None and (latest := CheckpointStore(where, writer=False).load_latest()):
            state, meta = latest  # served as is: through the drafter's one swap path
            drafter.offer(state, int(meta["version"]))
            drafter.apply_pending_swap()
        member = Member(name, engine, drafter, trainer)
        if on_member is not None:
            on_member(member)
        return member

    seed = trainer_cfg.seed if trainer_cfg is not None else 0
    pool = DraftPool(pool_cfg, make_member(GENERAL, draft), make_member, seed=seed)
    router = None
    if pool_cfg.drafts > 1:
        router = make_router(pool_cfg.router, target, threshold=pool_cfg.cluster_threshold,
                             min_size=pool_cfg.cluster_min_size, max_open=pool_cfg.drafts - 1,
                             language_confidence=pool_cfg.language_confidence)
        state = pool.restore(checkpoints) if checkpoints is not None else None
        if state:
            router.load_state_dict(state)
    return pool, router


def build_vllm_pool(model_cfg, engine_cfg: EngineConfig, backend, trainer_cfg: TrainerConfig | None = None,
                    checkpoints: Path | None = None, *, rollback_tolerance: float = 0.05,
                    rollback_min_tokens: int = 512) -> DraftPool:
    """vLLM as the engine (engine/vllm_engine.py) with onspec's draft as its speculator, as a pool
    of one for the scheduler. With `trainer_cfg` the draft learns online: the trainer keeps its own
    copy of the draft (loaded here from the same directory vLLM loads), learns from the examples
    built of vLLM's log-probabilities, and each accepted version is written into the running vLLM
    between two steps; vLLM's counters judge it live (rollback). Without it a checkpoint in
    `checkpoints` is still served. vLLM is imported only here."""
    from onspec.engine.vllm_engine import VllmEngine
    from onspec.models.loading import load_model, resolve_device, resolve_dtype, resolve_spec

    backend.check(model=model_cfg, engine=engine_cfg, trainer=trainer_cfg)
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    target_dir = resolve_spec(model_cfg.target_name, dtype)
    draft_dir = None
    if not model_cfg.no_draft and engine_cfg.k:
        if model_cfg.draft_spec is None:
            raise ValueError("--engine vllm serves a draft model from a directory: this target has no paired draft; "
                             "write a derived one with `onspec derive-draft --out DIR` and pass --draft DIR")
        draft_dir = resolve_spec(model_cfg.draft_spec, dtype)
    engine = VllmEngine(target_dir, draft_dir, k=engine_cfg.k, dtype=str(dtype).removeprefix("torch."),
                        teacher_top_k=trainer_cfg.teacher_top_k if trainer_cfg is not None and draft_dir else 0,
                        cfg=backend, rollback_tolerance=rollback_tolerance, rollback_min_tokens=rollback_min_tokens)
    drafter, trainer = engine.drafter, None
    if drafter is not None:  # onspec's mirror of the draft vLLM serves (the trainer starts from it)
        drafter.draft = load_model(draft_dir, device=device, dtype=model_cfg.dtype).model
    if drafter is not None and trainer_cfg is not None:
        distiller = Distiller(drafter.draft, trainer_cfg)

        def publish(version: int, weights: dict, alpha_hint: float | None) -> None:
            drafter.offer(weights, version, alpha_hint)

        trainer = TrainerWorker(distiller, trainer_cfg, publish, weights_dtype=dtype,
                                store=CheckpointStore(checkpoints) if checkpoints is not None else None,
                                tokenizer=engine.tokenizer)
        drafter.on_rollback = lambda weights, version: trainer.adopt(weights, version,
                                                                     floor=max(trainer.published, default=0))
        drafter.apply_pending_swap()  # a resumed version is live before serving starts
    elif drafter is not None and checkpoints is not None and (
            latest := CheckpointStore(checkpoints, writer=False).load_latest()):
        state, meta = latest
        drafter.offer(state, int(meta["version"]))
        drafter.apply_pending_swap()

    def no_specialists(name: str, model) -> Member:
        raise ValueError("--engine vllm serves one draft (--drafts 1)")

    return DraftPool(PoolConfig(), Member(GENERAL, engine, drafter, trainer), no_specialists)
