"""Measure decoding speed several ways on the same prompts, interleaved prompt by prompt.

`measure` decodes each prompt with every way before the next prompt, in a rotating order (a
machine that speeds up or slows down affects all ways alike) and returns the summary: tokens/s,
each way's ratio against its own target-only way, alpha, tokens per target pass, c, the memory
bandwidth fraction and the verify cost curve. The ways are listed in `onspec bench` (apps/bench.py),
which prints what this measures.
"""


from __future__ import annotations

import contextlib
import dataclasses

import itertools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from onspec.bench.machine import memory_read_bandwidth, speedup_model, verify_cost_curve, weight_bytes
from onspec.config import option
from onspec.data.streams import iter_queries
from onspec.engine.build import make_engine
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.records import RequestStats
from onspec.engine.sampling import SamplingParams
from onspec.models import kernels
from onspec.models.attention import NAME as SHORT_ATTENTION, implementation as attention_implementation
from onspec.models.pair import ModelConfig, load_pair

ALL_WAYS = ("target", "adaptive", "fixed", "floor", "arctic", "target-hf", "adaptive-hf", "target-w8a8", "adaptive-w8a8", "hf-assisted", "hf-assisted-native", "hf-greedy", "llamacpp-target",
            "llamacpp", "llamacpp-ngram", "llamacpp-draft-ngram", "vllm-target", "vllm-spec", "vllm-online")
BASELINE = {"target": "target", "adaptive": "target", "fixed": "target", "floor": "target", "arctic": "target",
            "target-hf": "target-hf",
            "adaptive-hf": "target-hf", "target-w8a8": "target-w8a8",
            "adaptive-w8a8": "target-w8a8", "hf-assisted": "hf-greedy",
            "hf-assisted-native": "hf-greedy",
            "hf-greedy": "hf-greedy", "llamacpp": "llamacpp-target", "llamacpp-target": "llamacpp-target",
            "llamacpp-ngram": "llamacpp-target", "llamacpp-draft-ngram": "llamacpp-target",
            "vllm-target": "vllm-target", "vllm-spec": "vllm-target", "vllm-online": "vllm-target"}

LLAMACPP_SPECULATING = ("llamacpp", "llamacpp-ngram", "llamacpp-draft-ngram")
LLAMACPP_NGRAM = "ngram-mod"
"""llama.cpp's n-gram proposer in the `-ngram` ways: its hash pool is shared by every request the
server serves, so it learns from the stream, as onspec's suffix learner and the reference do."""


@dataclass
class BenchConfig:
    """Benchmark."""

    dataset: str = option("humaneval", "prompts: humaneval (code completions), sharegpt (chat), edits, agent, multiturn "
                          "(streams that repeat: onspec.data.repeating), a .jsonl file, or "
                          "several comma-separated (--prompts from each, alternating; the summary has each one's "
                          "figures too)")
    prompts: int = option(8, "prompts to decode per dataset (the same ones every way)")
    max_new_tokens: int = option(64, "tokens generated per prompt")
    seed: int = option(0, "seed that picks the prompts")
    pool: int = option(2000, "prompts are drawn from the first N queries of the dataset")
    max_prompt_tokens: int = option(512, "skip prompts longer than this (after the chat template)")
    ways: str = option("target,adaptive,fixed,hf-assisted", "comma-separated ways to run, or 'all': "
                       + ", ".join(ALL_WAYS))
    llamacpp_draft_max: int = option(16, "llama.cpp: most draft tokens per step (--spec-draft-n-max)")
    llamacpp_p_min: float = option(0.75, "llama.cpp: stop drafting below this draft probability (--spec-draft-p-min)")
    no_cost_curve: bool = option(False, "skip timing one target pass over 1..9 positions (the verify cost curve)")
    json: bool = option(False, "accepted for symmetry with generate/replay: the last line is JSON either way")

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"--prompts must be >= 1, got {self.prompts}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.pool < self.prompts:
            raise ValueError(f"--pool ({self.pool}) must be >= --prompts ({self.prompts})")
        unknown = [w for w in self.way_list if w not in ALL_WAYS]
        if unknown:
            raise ValueError(f"--ways: unknown way(s) {unknown}; choose from {', '.join(ALL_WAYS)} or 'all'")

    @property
    def way_list(self) -> list[str]:
        if self.ways.strip() == "all":
            return list(ALL_WAYS)
        ways = [w.strip() for w in self.ways.split(",") if w.strip()]
        return ways if "target" in ways else ["target", *ways]


@dataclass
class WayResult:
    name: str
    label: str
    tokens: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    stats: RequestStats | None = None
    drafted: int | None = None
    """llama.cpp: tokens drafted / accepted (from its own counters)."""
    draft_accepted: int | None = None
    weight_bytes: int | None = None
    """Bytes of weights one target-only decode step reads (for bandwidth_fraction)."""
    startup_s: float | None = None
    """vLLM: seconds its engine took to start."""

    by_dataset: dict[str, list[float]] = field(default_factory=dict)
    """dataset -> [tokens, seconds]."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, token_ids: list[int], seconds: float, stats: RequestStats | None = None,
            dataset: str | None = None) -> None:
        self.tokens += len(token_ids)
        self.seconds += seconds
        if dataset is not None:
            pair = self.by_dataset.setdefault(dataset, [0, 0.0])
            pair[0] += len(token_ids)
            pair[1] += seconds
        self.outputs.append(token_ids)
        if stats is not None:
            self.stats = stats if self.stats is None else self.stats.merge(stats)

    @property
    def alpha(self) -> float | None:
        if self.stats is not None:
            return self.stats.alpha
        if self.drafted:
            return self.draft_accepted / self.drafted  # llama.cpp counts drafted, not evaluated: a lower bound
        return None

    @property
    def label_alpha(self) -> str:
        return "accepted / drafted" if self.stats is None and self.drafted else "accepted / evaluated"


Decode = Callable[[list[int]], tuple[list[int], float, RequestStats | None]]


def pick_labelled_prompts(tokenizer, cfg: BenchConfig) -> list[tuple[str, list[int]]]:
    """(dataset, prompt ids): --prompts from each dataset of --dataset, alternating between them."""
    picked = []
    for dataset in [d.strip() for d in cfg.dataset.split(",") if d.strip()]:
        pool = [q.encode(tokenizer) for q in itertools.islice(iter_queries(dataset), cfg.pool)]
        pool = [p for p in pool if 0 < len(p) <= cfg.max_prompt_tokens]
        if len(pool) < cfg.prompts:
            raise ValueError(f"only {len(pool)} prompts of <= {cfg.max_prompt_tokens} tokens in {dataset}")
        picked.append([(dataset, p) for p in random.Random(cfg.seed).sample(pool, cfg.prompts)])
    return [pair for group in zip(*picked) for pair in group]


def onspec_way(engine, max_new_tokens: int) -> Decode:
    params = SamplingParams(max_new_tokens=max_new_tokens)

    def decode(prompt: list[int]):
        t0 = time.perf_counter()
        out = engine.generate([Request(prompt, params)])[0]
        return out.token_ids, time.perf_counter() - t0, out.stats
    return decode


@contextlib.contextmanager
def short_attention(model):
    """`model` (if any) on short-query attention inside the block, where it is a CPU model on SDPA."""
    if model is None or next(model.parameters()).device.type != "cpu" or \
            getattr(model.config, "_attn_implementation", None) != "sdpa":
        yield
        return
    with attention_implementation(model, SHORT_ATTENTION):
        yield


def transformers_way(target, max_new_tokens: int, assistant=None, k: int = 0) -> Decode:
    """transformers' generate() with the models' attention switched to onspec's short-query
    attention (models/attention.py) while it runs: the same kernels as onspec's own forward."""
    kwargs = {}
    if assistant is not None:
        gc = assistant.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = k, "constant", 0.0
        kwargs["assistant_model"] = assistant
    eos = target.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    def decode(prompt: list[int]):
        ids = torch.tensor([prompt], device=target.device)
        t0 = time.perf_counter()
        with torch.no_grad(), short_attention(target), short_attention(assistant):
            out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)
        return out[0, len(prompt):].tolist(), time.perf_counter() - t0, None
    return decode


def measure(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig, cfg: BenchConfig,
            log: Callable[[str], None] = lambda message: None) -> dict:
    """Decode the prompts every way, interleaved, and return the summary (what `onspec bench`
    prints as its JSON line); `log` gets progress lines. Prints nothing."""
    log(f"loading models ({model_cfg.target_name}, draft {model_cfg.draft_spec or 'derived'}) ...")
    target, draft = load_pair(model_cfg)
    if draft is None:
        raise ValueError("bench compares speculation against target-only: it needs a draft (drop --no-draft)")
    labelled = pick_labelled_prompts(target.tokenizer, cfg)
    prompts = [ids for _, ids in labelled]
    device = next(target.model.parameters()).device
    dtype = next(target.model.parameters()).dtype
    ways, decoders, servers = _build_ways(cfg, model_cfg, engine_cfg, policy_cfg, target, draft, log)
    try:
        for name in ways:  # warm-up: first calls allocate, compile kernels, fill caches
            decoders[name](prompts[0][:16])
        for i, (dataset, prompt) in enumerate(labelled):
            order = list(ways)[i % len(ways):] + list(ways)[: i % len(ways)]
            for name in order:
                ways[name].add(*decoders[name](prompt), dataset=dataset)
            log(f"[{i + 1}/{len(prompts)}] " + "  ".join(f"{n} {w.tok_s:.1f}" for n, w in ways.items()) + " tok/s")
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    for name in LLAMACPP_SPECULATING:
        if name in ways:
            ways[name].drafted, ways[name].draft_accepted = decoders[name].drafted, decoders[name].accepted
    bandwidth = memory_read_bandwidth(device)
    curve = verify_cost_curve(target.model, prompts[0], range(1, 10)) if not cfg.no_cost_curve else {}
    return _summarise(cfg, ways, prompts, bandwidth, engine_cfg.k, device, dtype, curve, model_cfg, target.quant)


def _build_ways(cfg, model_cfg, engine_cfg, policy_cfg, target, draft, log):
    ways: dict[str, WayResult] = {}
    decoders: dict[str, Decode] = {}
    servers = []
    k = engine_cfg.k
    tbytes = weight_bytes(target.model)
    quantized = None
    fmt = target.format  # for the labels
    for name in cfg.way_list:
        if name == "target":
            engine = make_engine(target.model, target.tokenizer, None, engine_cfg)
            label = "target only (onspec)" if target.quant == "none" else f"target only (onspec, {fmt} target)"
            ways[name], decoders[name] = WayResult(name, label, weight_bytes=tbytes), \
                onspec_way(engine, cfg.max_new_tokens)
        elif name in ("adaptive", "fixed"):
            pc = PolicyConfig(**{**policy_cfg.__dict__, "fixed_k": name == "fixed"})
            engine = make_engine(target.model, target.tokenizer, draft.model, engine_cfg, pc)
            label = f"onspec, {'adaptive k <= ' if name == 'adaptive' else 'fixed k = '}{k}"
            label += "" if target.quant == "none" else f", {fmt} target"
            ways[name], decoders[name] = WayResult(name, label), onspec_way(engine, cfg.max_new_tokens)
        elif name in ("floor", "arctic"):  # the draft alone; the draft with the SuffixDecoding reference beside it
            from onspec.peers.arctic import available

            if name == "arctic" and (why := available()) is not None:
                log(f"skipping arctic: {why}")
                continue
            proposers = "none" if name == "floor" else "arctic"
            engine = make_engine(target.model, target.tokenizer, draft.model,
                                 dataclasses.replace(engine_cfg, proposers=proposers), policy_cfg)
            label = "onspec, the draft alone (the floor)" if name == "floor" else "onspec, the SuffixDecoding reference beside the draft"
            ways[name], decoders[name] = WayResult(name, label), onspec_way(engine, cfg.max_new_tokens)
        elif name in ("target-hf", "adaptive-hf"):  # the same engines calling transformers' forward (SDPA)
            ways[name], decoders[name] = _variant(name, target.model, "transformers' forward", target, draft,
                                                  dataclasses.replace(engine_cfg, forward="transformers"),
                                                  policy_cfg, cfg.max_new_tokens)
        elif name in ("target-w8a8", "adaptive-w8a8"):  # the same pair, --target-quant w8a8 --bf16-head
            if quantized is None:
                quantized = _w8a8_target(model_cfg, log)
            ways[name], decoders[name] = _variant(name, quantized, "w8a8 target, bf16 head", target, draft, engine_cfg,
                                                  policy_cfg, cfg.max_new_tokens)
        elif name == "hf-assisted":  # the draft exactly as onspec runs it (int8 where onspec uses int8)
            fast = make_engine(target.model, target.tokenizer, draft.model, engine_cfg).fast
            running = draft.model if fast.reduced else fast.model  # transformers needs the full head
            ways[name], decoders[name] = WayResult(name, f"transformers assisted, k = {k}"), \
                transformers_way(target.model, cfg.max_new_tokens, running, k)
        elif name == "hf-assisted-native":
            ways[name], decoders[name] = WayResult(name, f"transformers assisted, bf16 draft, k = {k}"), \
                transformers_way(target.model, cfg.max_new_tokens, draft.model, k)
        elif name == "hf-greedy":
            ways[name], decoders[name] = WayResult(name, "transformers greedy", weight_bytes=tbytes), \
                transformers_way(target.model, cfg.max_new_tokens)
        elif name in ("llamacpp-target", *LLAMACPP_SPECULATING):
            server = _llamacpp_server(name, cfg, model_cfg, log)
            if server is None:
                continue
            servers.append(server)
            decoders[name] = _llamacpp_decode(server, cfg.max_new_tokens)
            label = {"llamacpp": "llama.cpp, draft", "llamacpp-target": "llama.cpp, target only",
                     "llamacpp-ngram": f"llama.cpp, {LLAMACPP_NGRAM} (no draft)",
                     "llamacpp-draft-ngram": f"llama.cpp, draft + {LLAMACPP_NGRAM}"}[name]
            ways[name] = WayResult(name, label, weight_bytes=server.model_bytes if name == "llamacpp-target" else None)
        elif name == "vllm-online":
            online = _vllm_online(model_cfg, engine_cfg, log)
            if online is None:
                continue
            servers.append(online)
            decoders[name] = online.decode(cfg.max_new_tokens)
            ways[name] = WayResult(name, f"vLLM, draft_model k = {online.engine.k}, learning")
            ways[name].startup_s = online.engine.startup_s
        elif name in ("vllm-target", "vllm-spec"):
            engine = _vllm_engine(name, model_cfg, engine_cfg, dtype=next(target.model.parameters()).dtype, log=log)
            if engine is None:
                continue
            servers.append(engine)
            decoders[name] = onspec_way(engine, cfg.max_new_tokens)
            ways[name] = WayResult(name, "vLLM, target only" if name == "vllm-target"
                                   else f"vLLM, draft_model k = {engine.k}",
                                   weight_bytes=tbytes if name == "vllm-target" else None)
            ways[name].startup_s = engine.startup_s
    return ways, decoders, servers


def _variant(name: str, model, what: str, target, draft, engine_cfg, policy_cfg, max_new_tokens: int):
    """`target-*` (target only) or `adaptive-*` (adaptive k) decoding on `model` with `engine_cfg`:
    (its WayResult, its decoder)."""
    only = name.startswith("target-")
    pc = PolicyConfig(**{**policy_cfg.__dict__, "fixed_k": False})
    engine = make_engine(model, target.tokenizer, None if only else draft.model, engine_cfg, pc)
    label = f"target only, {what}" if only else f"adaptive k <= {engine_cfg.k}, {what}"
    return (WayResult(name, label, weight_bytes=weight_bytes(model) if only else None),
            onspec_way(engine, max_new_tokens))


def _w8a8_target(model_cfg: ModelConfig, log) -> torch.nn.Module:
    """A second copy of the target as `--target-quant w8a8 --bf16-head` loads it (the w8a8 target
    before its head was quantized too), to compare the main ways against."""
    t0 = time.perf_counter()
    model = load_pair(dataclasses.replace(model_cfg, draft=None, no_draft=True, target_quant="w8a8",
                                          quant_head=False, bf16_head=True))[0].model
    log(f"w8a8 target (bf16 head) built in {time.perf_counter() - t0:.0f} s")
    return model


def _vllm_engine(name: str, model_cfg: ModelConfig, engine_cfg: EngineConfig, dtype: torch.dtype, log):
    """vLLM in this process on the same converted model directories onspec loads (a `close`-able
    peer, ended with the llama.cpp servers)."""
    try:
        from onspec.engine.role import BackendConfig
        from onspec.engine.vllm_engine import VllmEngine
    except ImportError as e:
        log(f"skipping {name}: vLLM is not installed ({e})")
        return None
    from onspec.models.loading import resolve_spec

    draft = None
    if name == "vllm-spec":
        if model_cfg.draft_spec is None:
            log(f"skipping {name}: vLLM's draft_model needs a draft directory (this target has no paired draft)")
            return None
        draft = resolve_spec(model_cfg.draft_spec, dtype)
    log(f"starting vLLM ({name}) ...")
    engine = VllmEngine(resolve_spec(model_cfg.target_name, dtype), draft, k=engine_cfg.k or 4,
                        dtype=str(dtype).removeprefix("torch."),
                        cfg=BackendConfig(engine="vllm", vllm_kv_cache_gib=1, vllm_max_model_len=4096))
    log(f"vLLM ({name}) started in {engine.startup_s:.0f} s")
    return engine


class _VllmOnline:
    """The `vllm-online` way: vLLM with the draft, and onspec's trainer learning it from every
    prompt the bench decodes (the top 2 layers, head frozen, in the background, as `onspec serve
    --engine vllm --train-layers 2 --freeze-head` would); each version is written into the running
    vLLM between steps. Closed with the other peers (the trainer first)."""

    def __init__(self, pool) -> None:
        self.member = pool.general
        self.engine, self.trainer = self.member.engine, self.member.trainer

    def decode(self, max_new_tokens: int) -> Decode:
        params = SamplingParams(max_new_tokens=max_new_tokens)

        def decode(prompt: list[int]):
            t0 = time.perf_counter()
            out = self.engine.generate([Request(prompt, params)], on_finish=self.trainer.on_output)[0]
            return out.token_ids, time.perf_counter() - t0, out.stats
        return decode

    def __exit__(self, *exc) -> None:
        self.trainer.close()
        self.engine.close()


def _vllm_online(model_cfg: ModelConfig, engine_cfg: EngineConfig, log):
    try:
        from onspec.engine.role import BackendConfig
    except ImportError as e:
        log(f"skipping vllm-online: vLLM is not installed ({e})")
        return None
    if model_cfg.draft_spec is None:
        log("skipping vllm-online: vLLM's draft_model needs a draft directory (this target has no paired draft)")
        return None
    from onspec.online.distiller import TrainerConfig
    from onspec.wiring import build_vllm_pool

    log("starting vLLM (vllm-online) ...")
    pool = build_vllm_pool(model_cfg, dataclasses.replace(engine_cfg, k=engine_cfg.k or 4),
                           BackendConfig(engine="vllm", vllm_kv_cache_gib=1, vllm_max_model_len=4096),
                           TrainerConfig(train_layers=2, freeze_head=True))
    return _VllmOnline(pool)


def _gguf_for(spec: str | None) -> Path | None:
    from onspec.models.registry import MODELS, gguf_path

    if spec in MODELS:
        return gguf_path(MODELS[spec])
    if spec and spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    return None


def _llamacpp_server(name: str, cfg: BenchConfig, model_cfg: ModelConfig, log):
    from onspec.bench.llamacpp import LlamaServer, PeerUnavailable, ensure_llama_server

    target_gguf, draft_gguf = _gguf_for(model_cfg.target_name), _gguf_for(model_cfg.draft_spec)
    with_draft = name in ("llamacpp", "llamacpp-draft-ngram")
    if target_gguf is None or (with_draft and draft_gguf is None):
        log(f"skipping {name}: llama.cpp needs the pair as GGUF files (a named model or a .gguf)")
        return None
    try:
        binary = ensure_llama_server(log=lambda m: log(f"llama.cpp: {m}"))
        server = LlamaServer(binary, target_gguf, draft_gguf if with_draft else None,
                             threads=torch.get_num_threads(), draft_max=cfg.llamacpp_draft_max,
                             draft_p_min=cfg.llamacpp_p_min, ngram=LLAMACPP_NGRAM if "ngram" in name else None)
        server.__enter__()
    except PeerUnavailable as e:
        log(f"skipping {name}: {e}")
        return None
    server.model_bytes = target_gguf.stat().st_size
    return server


def _llamacpp_decode(server, max_new_tokens: int) -> Decode:
    def decode(prompt: list[int]):
        out = server.generate(prompt, max_new_tokens)
        decode.drafted += out.draft_n or 0
        decode.accepted += out.draft_accepted or 0
        return out.token_ids, out.seconds, None
    decode.drafted = decode.accepted = 0
    return decode


def _summarise(cfg, ways, prompts, bandwidth, k, device, dtype, curve, model_cfg, quant: str) -> dict:
    per_way = {}
    for name, w in ways.items():
        base = ways.get(BASELINE[name]) or ways["target"]
        st = w.stats
        entry = {
            "label": w.label,
            "tokens": w.tokens,
            "seconds": round(w.seconds, 3),
            "tok_s": w.tok_s,
            "baseline": base.name,
            "ratio_to_own_target_only": w.tok_s / base.tok_s if base.tok_s else None,
            "ratio_to_onspec_target_only": w.tok_s / ways["target"].tok_s,
            "alpha": w.alpha,
            "tokens_per_target_pass": st.mean_accepted_length if st else None,
            "cost_ratio_c": st.cost_ratio if st else None,
            "accepted_hist": st.accepted_hist if st else None,
            "mean_k": (st.proposed / st.steps) if st and st.steps else None,
            "outputs_differing_from_own_target_only": sum(a != b for a, b in zip(w.outputs, base.outputs)),
        }
        if w.startup_s is not None:
            entry["startup_s"] = round(w.startup_s, 1)
        if w.weight_bytes:
            entry["weight_bytes"] = w.weight_bytes
            entry["bandwidth_fraction"] = w.tok_s * w.weight_bytes / bandwidth
        per_way[name] = entry
    for name in LLAMACPP_SPECULATING:
        if name in ways:
            d = ways[name]
            per_way[name]["drafted"], per_way[name]["draft_accepted"] = d.drafted, d.draft_accepted
    datasets = list(ways["target"].by_dataset)
    if len(datasets) > 1:
        for name, w in ways.items():
            base = ways.get(BASELINE[name]) or ways["target"]
            per_way[name]["by_dataset"] = {}
            for d in datasets:
                tok, sec = w.by_dataset.get(d, (0, 0.0))
                btok, bsec = base.by_dataset.get(d, (0, 0.0))
                otok, osec = ways["target"].by_dataset[d]
                rate = tok / sec if sec else 0.0
                per_way[name]["by_dataset"][d] = {
                    "tok_s": rate, "ratio_to_own_target_only": rate / (btok / bsec) if bsec and btok else None,
                    "ratio_to_onspec_target_only": rate / (otok / osec) if osec and otok else None}
    tgt = ways["target"]
    best = max((n for n in per_way if n in ("adaptive", "fixed")), key=lambda n: per_way[n]["tok_s"], default=None)
    result = {
        "dataset": cfg.dataset,
        "prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "k": k,
        "target": model_cfg.target_name,
        "draft": model_cfg.draft_spec or "derived",
        "dtype": str(dtype).removeprefix("torch."),
        "target_quant": quant,
        "host": kernels.describe(quant),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "target_only_tok_s": tgt.tok_s,
        "ways": per_way,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_fraction": per_way["target"]["bandwidth_fraction"],
        "verify_cost_curve": curve,
    }
    for name in ("adaptive", "fixed"):
        if name in per_way:
            result[f"speedup_{name}"] = per_way[name]["ratio_to_onspec_target_only"]
    if best is not None:
        result["speedup_vs_target"] = per_way[best]["ratio_to_onspec_target_only"]
        for hf in ("hf-assisted", "hf-assisted-native"):
            if hf in per_way and per_way[hf]["tok_s"]:
                result["speedup_vs_" + hf.replace("-", "_")] = per_way[best]["tok_s"] / per_way[hf]["tok_s"]
    if "llamacpp" in per_way and "llamacpp-target" in per_way:
        result["llamacpp_speedup"] = per_way["llamacpp"]["ratio_to_own_target_only"]
    if "llamacpp-target" in per_way and "adaptive" in per_way and per_way["llamacpp-target"]["tok_s"]:
        result["adaptive_vs_llamacpp_target"] = per_way["adaptive"]["tok_s"] / per_way["llamacpp-target"]["tok_s"]
    if "adaptive" in per_way and per_way["adaptive"]["alpha"] is not None:
        st = ways["adaptive"].stats
        result["speedup_model_adaptive"] = speedup_model(st.alpha, round(st.proposed / max(st.steps, 1)),
                                                         st.cost_ratio or 0.0)
    return result
