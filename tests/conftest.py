"""Tiny randomly initialised models and a real byte-level tokenizer, built in the test."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 260  # 256 byte tokens + <eos> + <pad> + 2 spare ids
EOS = 256
SHARPEN = 4.0


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with no merges: one token per byte, exact round trip."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda ch: _unicode_byte(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    assert fast.eos_token_id == EOS
    return fast


def _unicode_byte(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(cs, bs))[ord(ch)]


def tiny_model(arch: str, seed: int, layers: int = 2, dtype=torch.float32):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=EOS + 1, bos_token_id=EOS, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # random init is nearly uniform over the vocab; sharpen it so greedy paths are far from ties
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(SHARPEN)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


def plain_greedy(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Reference: greedy decoding with no KV cache at all, one full forward per token."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if eos is not None and nxt == eos:
                break
    return out


# -- shared helpers for the engine tests -------------------------------------------------------

ARCHS = ("llama", "gpt2", "qwen2")


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_pair(root, noise: float = 0.2, context: int | None = None):
    """The tiny target (llama, seed 0) and a noisy copy of it as its draft, saved with the byte
    tokenizer (and a chat template) as two local model directories; returns (target dir, draft dir)."""
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    target = tiny_model("llama", 0)
    if context is not None:
        target.config.max_position_embeddings = context
    for name, model in (("target", target), ("draft", noisy_copy(target, noise, seed=1))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "target", root / "draft"


def tiny_qwen(seed: int = 0, layers: int = 2):
    """A tiny Qwen2 (the default pair's architecture) of shapes vLLM's CPU attention runs (head
    dim 64; it has no kernel for tiny_model's 16)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=EOS + 1, bos_token_id=EOS,
                      tie_word_embeddings=False, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(2 * SHARPEN)
    return model.eval()


def save_tiny_qwen_pair(root, noise: float = 0.2):
    """`tiny_qwen` and a noisy copy of it as its draft (noise 0: an exact copy), saved with the
    byte tokenizer and a chat template; returns (target dir, draft dir)."""
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    target = tiny_qwen()
    draft = noisy_copy(target, noise, seed=1) if noise else copy.deepcopy(target)
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "target", root / "draft"


def noisy_copy(model, scale: float, seed: int):
    """A draft that agrees with `model` only partly: a deep copy with Gaussian noise of
    `scale` x (each tensor's std) added to every weight. Mixed accept/reject steps."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.add_(noise * scale * p.std().clamp_min(1e-3))
    return draft.eval()


@functools.cache
def cached_model(arch: str, seed: int = 0, layers: int = 2, dtype=torch.float32):
    """tiny_model, built once per session. Shared: never mutate it (deepcopy first)."""
    return tiny_model(arch, seed, layers=layers, dtype=dtype)


@functools.cache
def cached_draft(arch: str, kind: str, dtype=torch.float32):
    """Drafts for the target cached_model(arch, 0, dtype=dtype):
    'random' = an unrelated 1-layer model (other seed); 'noisy' = noisy_copy of the target."""
    if kind == "random":
        return tiny_model(arch, 1, layers=1, dtype=dtype)
    if kind == "noisy":
        return noisy_copy(cached_model(arch, dtype=dtype), 0.2, seed=1)
    raise ValueError(kind)


@functools.cache
def _cached_plain_greedy(model_key, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(plain_greedy(cached_model(*model_key), list(prompt), n))


def reference_greedy(arch: str, prompt: list[int], n: int, dtype=torch.float32, stop_ids=()) -> list[int]:
    """plain_greedy of cached_model(arch, dtype=dtype), cached; cut after the first id in stop_ids."""
    out = list(_cached_plain_greedy((arch, 0, 2, dtype), tuple(prompt), n))
    for i, t in enumerate(out):
        if t in stop_ids:
            return out[: i + 1]
    return out


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of one plain forward pass with no cache, no mask, default positions. [len(ids), vocab]"""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]
