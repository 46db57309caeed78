"""Build an engine (and a pool's further drafters) from the typed configs: the policy, the
reduced draft vocabulary, int8."""

from __future__ import annotations

from torch import nn

from onspec.engine.budget import PrefillBudget
from onspec.engine.drafter import Drafter
from onspec.engine.engine import PROPOSERS, EngineConfig, SpeculativeEngine, eos_ids
from onspec.engine.policy import PolicyConfig, make_policy
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
    engine = SpeculativeEngine(target_model, tokenizer, draft_model, k=k, policy=policy, draft_vocab=vocab,
                               draft_quant=draft_quant(engine_cfg.draft_quant, draft_model), forward=engine_cfg.forward)
    # model-free proposers beside the draft (engine/proposer.py), priced by the controller with the
    # draft's measured costs: with adaptive k only
    if policy is not None:
        engine.proposers += [PROPOSERS[name](engine_cfg) for name in engine_cfg.proposer_list]
    engine.budget = PrefillBudget(cap=engine_cfg.prefill_chunk, target=engine_cfg.step_latency)
    engine.long_prefills = engine_cfg.long_prefills
    return engine


def make_drafter(target_model: nn.Module, tokenizer, draft_model: nn.Module, name: str, engine_cfg: EngineConfig,
                 policy_cfg: PolicyConfig | None = None) -> Drafter:
    """Another draft for an engine made by `make_engine` (`engine.add_drafter`), configured alike."""
    vocab = draft_vocab(target_model, tokenizer, engine_cfg.draft_vocab) if engine_cfg.draft_vocab else None
    return Drafter(draft_model, k=engine_cfg.k, policy=make_policy(engine_cfg.k, policy_cfg or PolicyConfig(), True),
                   vocab=vocab, quant=draft_quant(engine_cfg.draft_quant, draft_model), name=name,
                   forward=engine_cfg.forward)


def draft_quant(quant: str, draft_model: nn.Module | None) -> str:
    """The running draft's format, a quant kind: `auto`: on a CPU, the first w8a8 kernel path that
    runs the draft here (models/kernels.py), else int8 (torch's weight-only kernel); none on other
    devices. `w8a8` (the faster kernel here), `w8a8-vllm`, `w8a8-fbgemm`: that kernel or a clear error."""
    if draft_model is None:
        return "none"
    if quant in ("none", "int8"):
        return quant
    if quant in ("w8a8", *W8A8):
        kind = resolve(quant, draft_model, "--draft-quant")
        check_w8a8(draft_model, f"--draft-quant {quant}", kind)
        return kind
    if next(draft_model.parameters()).device.type != "cpu":
        return "none"
    kind = resolve("auto", draft_model)
    return kind if kind in W8A8 else "int8"


def draft_vocab(target_model: nn.Module, tokenizer, n: int) -> DraftVocab:
    """The N most frequent target tokens (calibration counts, then served outputs); every
    end-of-sequence and special id is always in."""
    size = target_model.get_output_embeddings().out_features
    always = set(eos_ids(target_model, tokenizer)) | set(getattr(tokenizer, "all_special_ids", []) or [])
    return DraftVocab(calibration_counts(tokenizer, size), min(n, size), always={i for i in always if i < size})
