"""The default pair (Qwen2.5-Coder 1.5B target, 0.5B draft, from the part wheels), marked
`real_model`, in CI: float32 speculative greedy output equals target-only output, 32 tokens.

float32, not the bf16 the CLI picks on this CPU: exact equality is a float32 property; the bf16
divergence is measured by experiments/bf16_divergence.py and stated in the README.
The first run converts both GGUF files to float32 safetensors in the cache (~2-3 minutes).
"""

from __future__ import annotations

import pytest

from onspec.data.streams import Query
from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair

pytestmark = pytest.mark.real_model


def test_qwen_pair_float32_speculative_equals_target_only():
    target, draft = load_pair(ModelConfig(dtype="float32"))
    assert target.name == "qwen2.5-coder-1.5b" and draft.name == "qwen2.5-coder-0.5b"
    assert set(target.model.generation_config.eos_token_id) == {151645, 151643}
    tok = target.tokenizer
    prompts = [Query("c", "test", text="def is_prime(n: int) -> bool:\n").encode(tok),
               Query("q", "test", messages=({"role": "user", "content": "Name three sorting algorithms."},)).encode(tok)]
    params = SamplingParams(max_new_tokens=32)
    base = make_engine(target.model, tok, None, EngineConfig())
    reference = [base.generate([Request(p, params)])[0].token_ids for p in prompts]
    for policy in (PolicyConfig(), PolicyConfig(fixed_k=True)):  # adaptive (default) and fixed k = 4
        spec = make_engine(target.model, tok, draft.model, EngineConfig(k=4), policy)
        outs = [spec.generate([Request(p, params)])[0] for p in prompts]
        assert [o.token_ids for o in outs] == reference
        assert sum(o.stats.accepted for o in outs) > 0  # the pretrained draft agrees often
