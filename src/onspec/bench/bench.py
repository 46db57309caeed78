"""`onspec bench`: the same ShareGPT prompts decoded several ways in one run, as ratios.

Ways (greedy, batch size 1, one prompt after another):
- target only (onspec's engine with no draft): the baseline every ratio is taken against;
- speculative (onspec, draft + target, k proposals per step);
- transformers `generate(assistant_model=draft)` with the same draft and the same fixed k;
- transformers plain greedy `generate()` (context: onspec's own overhead against transformers).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from onspec.bench.machine import memory_read_bandwidth, speedup_model, weight_bytes
from onspec.config import option
from onspec.data.streams import iter_sharegpt
from onspec.engine.engine import EngineConfig, Request, SpeculativeEngine
from onspec.engine.records import RequestStats
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair


@dataclass
class BenchConfig:
    """Benchmark."""

    prompts: int = option(32, "ShareGPT prompts to decode (the same ones every way)")
    max_new_tokens: int = option(64, "tokens generated per prompt")
    seed: int = option(0, "seed that picks the prompts")
    pool: int = option(2000, "prompts are drawn from the first N ShareGPT conversations")
    max_prompt_tokens: int = option(256, "skip prompts longer than this (after the chat template)")
    skip_hf: bool = option(False, "skip the two transformers ways")
    breakdown: bool = option(True, "time the modules of the target's verify pass (attention, MLP, LM head, other)")

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"--prompts must be >= 1, got {self.prompts}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.pool < self.prompts:
            raise ValueError(f"--pool ({self.pool}) must be >= --prompts ({self.prompts})")


@dataclass
class WayResult:
    name: str
    tokens: int
    seconds: float
    outputs: list[list[int]]
    stats: RequestStats | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def pick_prompts(tokenizer, cfg: BenchConfig) -> list[list[int]]:
    pool = [q.encode(tokenizer) for q in itertools.islice(iter_sharegpt(), cfg.pool)]
    pool = [p for p in pool if len(p) <= cfg.max_prompt_tokens]
    if len(pool) < cfg.prompts:
        raise ValueError(f"only {len(pool)} ShareGPT prompts of <= {cfg.max_prompt_tokens} tokens in the pool")
    return random.Random(cfg.seed).sample(pool, cfg.prompts)


def run_onspec(name, engine: SpeculativeEngine, prompts, max_new_tokens, progress) -> WayResult:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    engine.generate([Request(prompts[0], SamplingParams(max_new_tokens=8))])  # warm-up
    task = progress.add_task(name, total=len(prompts))
    total, outputs, seconds = RequestStats(k=engine.k), [], 0.0
    for p in prompts:
        t0 = time.perf_counter()
        out = engine.generate([Request(p, params)])[0]
        seconds += time.perf_counter() - t0
        total = total.merge(out.stats)
        outputs.append(out.token_ids)
        progress.advance(task)
    return WayResult(name, sum(map(len, outputs)), seconds, outputs, total)


def run_transformers(name, target, prompts, max_new_tokens, progress, assistant=None, k: int = 0) -> WayResult:
    kwargs = {}
    if assistant is not None:
        gc = assistant.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = k, "constant", 0.0
        kwargs["assistant_model"] = assistant
    eos = target.generation_config.eos_token_id

    def gen(p, n):
        ids = torch.tensor([p], device=target.device)
        with torch.no_grad():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  pad_token_id=eos, **kwargs)
        return out[0, len(p):].tolist()

    gen(prompts[0], 8)  # warm-up
    task = progress.add_task(name, total=len(prompts))
    outputs, seconds = [], 0.0
    for p in prompts:
        t0 = time.perf_counter()
        outputs.append(gen(p, max_new_tokens))
        seconds += time.perf_counter() - t0
        progress.advance(task)
    return WayResult(name, sum(map(len, outputs)), seconds, outputs)


def verify_breakdown(engine: SpeculativeEngine, prompts, max_new_tokens: int) -> dict[str, float]:
    """Share of the target's verify-pass time spent in attention, MLP, the LM head, and the rest
    (embedding, norms, mask building, cache bookkeeping, Python), from module hooks."""
    spent = {"attention": 0.0, "mlp": 0.0, "lm_head": 0.0}
    kinds = {}
    for mod_name, module in engine.target.named_modules():
        if re.search(r"\.\d+\.(self_attn|attn|attention)$", mod_name):
            kinds[module] = "attention"
        elif re.search(r"\.\d+\.(mlp|feed_forward)$", mod_name):
            kinds[module] = "mlp"
    kinds[engine.target.get_output_embeddings()] = "lm_head"
    starts, handles = {}, []
    for module, kind in kinds.items():
        handles.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(m, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, kind=kind: spent.__setitem__(kind, spent[kind] + time.perf_counter() - starts[m])))
    try:
        total = 0.0
        for p in prompts:
            out = engine.generate([Request(p, SamplingParams(max_new_tokens=max_new_tokens))])[0]
            total += out.stats.target_time_s
    finally:
        for h in handles:
            h.remove()
    shares = {k: v / total for k, v in spent.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def run_bench(model_cfg: ModelConfig, engine_cfg: EngineConfig, cfg: BenchConfig) -> dict:
    console = Console(stderr=True)
    console.print(f"loading models ({model_cfg.target}) ...")
    target, draft = load_pair(model_cfg)
    prompts = pick_prompts(target.tokenizer, cfg)
    device = next(target.model.parameters()).device
    k = engine_cfg.k
    ways: list[WayResult] = []
    with Progress(console=console, transient=True) as progress:
        baseline = SpeculativeEngine(target.model, target.tokenizer, None)
        spec = SpeculativeEngine(target.model, target.tokenizer, draft.model, k=k)
        ways.append(run_onspec("target only (onspec)", baseline, prompts, cfg.max_new_tokens, progress))
        ways.append(run_onspec(f"speculative (onspec, k={k})", spec, prompts, cfg.max_new_tokens, progress))
        if not cfg.skip_hf:
            ways.append(run_transformers(f"assisted (transformers, k={k})", target.model, prompts, cfg.max_new_tokens,
                                         progress, assistant=draft.model, k=k))
            ways.append(run_transformers("greedy (transformers)", target.model, prompts, cfg.max_new_tokens, progress))
    base, sp = ways[0], ways[1]
    hf_assisted = ways[2] if not cfg.skip_hf else None
    hf_greedy = ways[3] if not cfg.skip_hf else None
    s = sp.stats
    alpha = s.alpha or 0.0
    c = s.cost_ratio or 0.0
    bandwidth = memory_read_bandwidth(device)
    bytes_per_token = weight_bytes(target.model)
    limit_tok_s = bandwidth / bytes_per_token
    mismatches = sum(a != b for a, b in zip(sp.outputs, base.outputs))
    shares = verify_breakdown(spec, prompts[:4], cfg.max_new_tokens) if cfg.breakdown else {}

    table = Table(title=f"{len(prompts)} ShareGPT prompts x {cfg.max_new_tokens} new tokens, greedy, batch 1")
    for col in ("way", "tokens", "tok/s", "vs target only", "alpha", "tokens/target pass"):
        table.add_column(col, justify="right" if col != "way" else "left")
    for w in ways:
        st = w.stats
        table.add_row(w.name, str(w.tokens), f"{w.tok_s:.1f}", f"{w.tok_s / base.tok_s:.2f}x",
                      f"{st.alpha:.3f}" if st and st.alpha is not None else "",
                      f"{st.mean_accepted_length:.2f}" if st and st.mean_accepted_length else "")
    out = Console(file=sys.stdout, width=120)
    out.print(table)
    out.print(f"accepted-length histogram (steps accepting 0..{k}): {s.accepted_hist}")
    out.print(f"cost ratio c (draft forward / target verify forward): {c:.3f}; "
              f"speedup model at alpha={alpha:.3f}, k={k}: {speedup_model(alpha, k, c):.2f}x, measured {sp.tok_s / base.tok_s:.2f}x")
    best_k = max(range(0, 9), key=lambda kk: speedup_model(alpha, kk, c))
    out.print(f"best k under the model for this alpha and c: {best_k} ({speedup_model(alpha, best_k, c):.2f}x)")
    out.print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s, target weights {bytes_per_token / 1e6:.0f} MB/token "
              f"-> limit {limit_tok_s:.1f} tok/s; target only reaches {base.tok_s / limit_tok_s:.0%} of it")
    out.print(f"speculative vs target-only greedy outputs differing: {mismatches}/{len(prompts)}")
    if hf_greedy is not None:
        hf_mis = sum(a != b for a, b in zip(hf_greedy.outputs, base.outputs))
        out.print(f"onspec target-only vs transformers greedy outputs differing: {hf_mis}/{len(prompts)}")
    if shares:
        out.print("verify pass time: " + ", ".join(f"{k_} {v:.0%}" for k_, v in shares.items()))
    result = {
        "prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "k": k,
        "target_only_tok_s": base.tok_s,
        "speculative_tok_s": sp.tok_s,
        "hf_assisted_tok_s": hf_assisted.tok_s if hf_assisted else None,
        "hf_greedy_tok_s": hf_greedy.tok_s if hf_greedy else None,
        "speedup_vs_target": sp.tok_s / base.tok_s,
        "speedup_vs_hf_assisted": sp.tok_s / hf_assisted.tok_s if hf_assisted else None,
        "speedup_model": speedup_model(alpha, k, c),
        "alpha": alpha,
        "mean_accepted_length": s.mean_accepted_length,
        "accepted_hist": s.accepted_hist,
        "cost_ratio_c": c,
        "greedy_mismatches": mismatches,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "target_weight_mb": bytes_per_token / 1e6,
        "bandwidth_limit_tok_s": limit_tok_s,
        "bandwidth_fraction": base.tok_s / limit_tok_s,
        "verify_time_shares": shares,
        "device": str(device),
    }
    print(json.dumps(result))
    return result
