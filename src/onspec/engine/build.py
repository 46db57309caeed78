"""Build an engine (and a pool's further drafters) from the typed configs: the policy, the
reduced draft vocabulary, int8."""

from __future__ import annotations

from torch import nn

from onspec.engine.drafter import Drafter
from onspec.engine.engine import EngineConfig, SpeculativeEngine, _eos_ids
from onspec.engine.policy import PolicyConfig, make_policy
from onspec.engine.suffix import SuffixLearner
from onspec.models.draft_vocab import DraftVocab, calibration_counts
from onspec.models.quant import W8A8, check_w8a8, resolve


def make_engine(target_model: nn.Module, tokenizer, draft_model: nn.Module | None, engine_cfg: EngineConfig,
                policy_cfg: PolicyConfig | None = None) -> SpeculativeEngine:
    """The engine every command decodes with; `draft_model` None = target-only."""
    k = engine_cfg.k if draft_model is not None else 0
    vocab = None
    if draft_model is not None and engine_cfg.draft_vocab:
        vocab = draft_vocab(target_model, tokenizer, engine_cfg.draft_vocab)
    policy = make_policy(k, policy_cfg or PolicyConfig(), draft_model is not None)
    engine = SpeculativeEngine(target_model, tokenizer, draft_model, k=k, policy=policy,
                               draft_vocab=vocab, draft_int8=draft_int8(engine_cfg.draft_quant, draft_model),
                               suffix=suffix_learner(engine_cfg) if policy is not None else None,
                               forward=engine_cfg.forward)
    engine.prefill_chunk = engine_cfg.prefill_chunk
    engine.suffix_extension = engine_cfg.suffix_extension
    return engine


def suffix_learner(engine_cfg: EngineConfig) -> SuffixLearner | None:
    """The suffix learner beside the draft (None with --no-suffix). The controller prices its
    proposals with the draft's measured costs, so it runs with adaptive k only."""
    if engine_cfg.no_suffix:
        return None
    return SuffixLearner(max_tokens=engine_cfg.suffix_tokens, history=engine_cfg.suffix_history)


def make_drafter(target_model: nn.Module, tokenizer, draft_model: nn.Module, name: str, engine_cfg: EngineConfig,
                 policy_cfg: PolicyConfig | None = None) -> Drafter:
    """Another draft for an engine made by `make_engine` (`engine.add_drafter`), configured alike."""
    vocab = draft_vocab(target_model, tokenizer, engine_cfg.draft_vocab) if engine_cfg.draft_vocab else None
    return Drafter(draft_model, k=engine_cfg.k, policy=make_policy(engine_cfg.k, policy_cfg or PolicyConfig(), True),
                   vocab=vocab, int8=draft_int8(engine_cfg.draft_quant, draft_model), name=name,
                   forward=engine_cfg.forward)


def draft_int8(quant: str, draft_model: nn.Module | None) -> bool | str:
    """The running draft's format: `auto`: on a CPU, the first w8a8 kernel path that runs the draft
    here (models/kernels.py), else int8 (torch's weight-only kernel); nothing on other devices.
    `w8a8` (the faster kernel here), `w8a8-vllm`, `w8a8-fbgemm`: that kernel or a clear error."""
    if draft_model is None or quant == "none":
        return False
    if quant in ("w8a8", *W8A8):
        kind = resolve(quant, draft_model, "--draft-quant")
        check_w8a8(draft_model, f"--draft-quant {quant}", kind)
        return kind
    if quant == "int8":
        return True
    if next(draft_model.parameters()).device.type != "cpu":
        return False
    kind = resolve("auto", draft_model)
    return kind if kind in W8A8 else True


def draft_vocab(target_model: nn.Module, tokenizer, n: int) -> DraftVocab:
    """The N most frequent target tokens (calibration counts, then served outputs); every
    end-of-sequence and special id is always in."""
    size = target_model.get_output_embeddings().out_features
    always = set(_eos_ids(target_model, tokenizer)) | set(getattr(tokenizer, "all_special_ids", []) or [])
    return DraftVocab(calibration_counts(tokenizer, size), min(n, size), always={i for i in always if i < size})
