"""The small named pair (smollm2-135m: SmolLM2-135M-Instruct target, derived 4-layer draft), in float32,
marked `real_model` (the Qwen default pair has its own test, test_real_pair.py).

Runs in CI: the first load converts the wheel's GGUF (~25 s), later loads read safetensors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from onspec.data.streams import Query
from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair

pytestmark = pytest.mark.real_model
SMALL = ("--target", "smollm2-135m", "--dtype", "float32")

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain in two sentences what a hash table is.",
    "Give me three tips for learning to program in Python.",
]


@pytest.fixture(scope="module")
def pair():
    return load_pair(ModelConfig(target="smollm2-135m", dtype="float32"))


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _margin(model, ids: list[int]) -> float:
    """Gap between the target's top two logits for the next token after `ids`."""
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def test_speculative_greedy_equals_target_only(pair):
    """Speculative greedy output equals target-only greedy output on chat prompts, batched too.
    A mismatch fails and says whether a float near-tie flipped the token: never loosened."""
    target, draft = pair
    tok = target.tokenizer
    prompts = [Query(str(i), "test", messages=({"role": "user", "content": p},)).encode(tok)
               for i, p in enumerate(CHAT_PROMPTS)]
    params = SamplingParams(max_new_tokens=40)
    baseline = SpeculativeEngine(target.model, tok, None)
    reference = [baseline.generate([Request(p, params)])[0].token_ids for p in prompts]
    for k in (1, 4):
        spec = SpeculativeEngine(target.model, tok, draft.model, k=k)
        single = [spec.generate([Request(p, params)])[0] for p in prompts]
        batched = spec.generate([Request(p, params) for p in prompts])
        for name, outs in (("batch 1", single), ("batch 4", batched)):
            for p, ref, out in zip(prompts, reference, outs):
                if out.token_ids != ref:
                    i = _first_divergence(out.token_ids, ref)
                    margin = _margin(target.model, p + ref[:i])
                    pytest.fail(
                        f"k={k} {name}: speculative output diverges from target-only at token {i} "
                        f"({out.token_ids[i:i + 1]} vs {ref[i:i + 1]}); the target's top-2 logit margin there is "
                        f"{margin:.2e} ({'a float near-tie flipped it' if margin < 1e-3 else 'NOT a near-tie: a bug'})"
                    )
            assert sum(o.stats.steps for o in outs) < sum(len(o.token_ids) for o in outs) or k == 1


def test_default_draft_is_derived_and_shares_the_vocabulary(pair):
    target, draft = pair
    assert draft.model.config.num_hidden_layers == 4
    assert target.model.config.num_hidden_layers == 30
    assert draft.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    emb_t = target.model.get_input_embeddings().weight
    emb_d = draft.model.get_input_embeddings().weight
    assert torch.equal(emb_t, emb_d)


def test_cli_generate_json():
    """`onspec generate --json` prints one JSON object, last, with the documented keys."""
    proc = subprocess.run(
        [sys.executable, "-m", "onspec.cli", "generate", *SMALL, "--chat", "--prompt", "Name a color.",
         "--max-new-tokens", "16", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("text", "token_ids", "alpha", "accepted", "evaluated", "mean_accepted_length", "tokens_per_s"):
        assert key in result
    assert 1 <= len(result["token_ids"]) <= 16
    assert result["evaluated"] >= result["accepted"]


def test_cli_rejects_a_mismatched_draft(tmp_path, tokenizer):
    """A draft whose tokenizer differs from the target's gets a clear error and exit code 2."""
    from conftest import tiny_model  # a random tiny model with a 260-token byte vocabulary

    draft_dir = tmp_path / "byte-draft"
    tiny_model("llama", 0).save_pretrained(draft_dir)
    tokenizer.save_pretrained(draft_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "onspec.cli", "generate", *SMALL, "--prompt", "hi", "--draft", str(draft_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert "does not share the target's tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
