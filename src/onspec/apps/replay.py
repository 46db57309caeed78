"""`onspec replay`: serve a query stream in order, as a serving log would arrive, and show alpha.

Modes: `online` (the draft learns in the background), `static` (the same engine, no updates),
`both` (static then online, from the same starting draft, on the same stream), `interleaved`
(both side by side, taking turns on every query in a rotating order, so machine drift cancels
out of the tokens/s ratio; it holds two drafts in memory), `ways` (the proposers compared on the
same stream, taking turns the same way, none of them training the draft: `--ways` of `target` (no
speculation), `floor` (the draft alone), `adaptive` (the learning system: the engine's `--proposers`
beside the draft, the suffix learner learning every output) and `arctic` (the SuffixDecoding
reference beside the draft); their curves are tokens per target pass and tokens/s over the stream).
Per query it records the measured alpha (accepted / evaluated over the steps that proposed) and
`alpha_tf`: the serving draft's greedy agreement with the served tokens (teacher-forced, one draft
pass after the request, not counted in tokens/s), which is defined for every query whatever k
the policy chose, and is what the curves and the JSON summary use for greedy streams.
A greedy online run also records `static_alpha_tf`: the *starting* draft's agreement with the same
served tokens. Greedy serving is lossless, so the served tokens are the ones a static run would
serve, and this is exactly the static run's `alpha_tf`, measured without decoding the stream twice
(`--static-baseline tf`, the default; `--mode both` still decodes both, for tokens/s).
Writes `<out>/replay_<mode>.csv`, `<out>/alpha.png` (alpha and tokens/s moving averages, modes on the same axes;
with `--mode ways`, `<out>/ways.png`: tokens per target pass and tokens/s), `<out>/summary.json`; with --json the last line printed is the summary.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onspec.config import option
from onspec.data.streams import DatasetError, Query, iter_queries
from onspec.engine.engine import EngineConfig, Request
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.distiller import TrainerConfig
from onspec.online.forward import greedy_agreement
from onspec.pool.pool import GENERAL, PoolConfig
from onspec.engine.role import BackendConfig
from onspec.wiring import build_pool, build_vllm_pool

STREAM_ALIASES = {
    # code, then chat, then the same code again: adaptation at each boundary, and forgetting
    "shift": "humaneval:0:82+sharegpt:0:164+humaneval:0:82",
    # code and chat interleaved, one of each in turn (the mixed-domain stream of the pool)
    "mixed": "humaneval:0:164|sharegpt:0:164",
}


def _way_config(way: str, cfg: EngineConfig) -> EngineConfig:
    """`--mode ways`: the engine each way runs (target: no draft either, `_Run` leaves it out)."""
    if way in ("target", "floor"):
        return dataclasses.replace(cfg, proposers="none", no_suffix=True)
    if way == "arctic":
        return dataclasses.replace(cfg, proposers="arctic", no_suffix=False)
    if way == "adaptive-probability":
        return dataclasses.replace(cfg, suffix_scoring="probability")
    if way == "adaptive-tree":
        return dataclasses.replace(cfg, suffix_tree_width=cfg.suffix_tree_width if cfg.suffix_tree_width > 1 else 4)
    return cfg  # adaptive: as configured


WAYS = ("target", "floor", "adaptive", "adaptive-probability", "adaptive-tree", "arctic")
"""`--mode ways`: the ways (`_way_config`)."""


@dataclass
class ReplayConfig:
    """Stream replay."""

    dataset: str = option("sharegpt", "sharegpt | humaneval | edits | agent | multiturn | a .jsonl file (prompt or "
                          "messages per line) | shift | "
                          "mixed | segments NAME[:SKIP[:LIMIT]] joined by '+' (one after another) or '|' "
                          "(interleaved)")
    limit: int = option(200, "queries to serve (after --skip)")
    skip: int = option(0, "queries to skip at the start of the stream")
    passes: int = option(1, "serve the stream this many times in a row (e.g. 2 for HumanEval twice)")
    mode: str = option("online", "online: learn; static: no updates; both: static then online; interleaved: static "
                       "and online side by side, taking turns on each query (machine drift cancels); ways: the "
                       "--ways side by side the same way (proposers compared, no draft training)",
                       choices=("online", "static", "both", "interleaved", "ways"))
    ways: str = option("target,floor,adaptive,arctic", "with --mode ways, comma-separated: target (no speculation), "
                       "floor (the draft alone), adaptive (the draft beside --proposers, the suffix learner learning), "
                       "adaptive-probability (the same, --suffix-scoring probability), adaptive-tree (the same with "
                       "tree speculation: --suffix-tree-width, 4 where it is 1), arctic (the draft beside the "
                       "SuffixDecoding reference)")
    max_new_tokens: int = option(64, "tokens generated per query")
    temperature: float = option(0.0, "0 = greedy")
    max_prompt_tokens: int = option(1024, "skip queries whose prompt is longer (counted in the summary)")
    out: str = option("runs/replay", "output directory (CSV, PNG, summary.json, checkpoints)")
    json: bool = option(False, "print the summary as one JSON object on the last line")
    plot_window: int = option(25, "moving-average window of the alpha plot (queries)")
    learn: str | None = option(None, "what the online mode learns: suffix (the draft is the frozen floor, the suffix "
                               "learner learns every served output, the controller picks per step), draft (the draft "
                               "model distils from the target in the background, no suffix learner), or both; "
                               "default: suffix on onspec's engine, draft under --engine vllm",
                               choices=("suffix", "draft", "both"))
    static_baseline: str = option("tf", "greedy online runs: also measure the starting (static) draft teacher-forced on "
                                  "the same served tokens ('tf', one extra draft pass per query) or not ('none')",
                                  choices=("tf", "none"))

    def __post_init__(self) -> None:
        for name in ("limit", "passes", "max_new_tokens", "max_prompt_tokens", "plot_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.skip < 0:
            raise ValueError(f"--skip must be >= 0, got {self.skip}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.mode == "ways":
            unknown = [w for w in self.way_list if w not in WAYS]
            if unknown or not self.way_list or len(set(self.way_list)) < len(self.way_list):
                raise ValueError(f"--ways {self.ways!r}: distinct names among {', '.join(WAYS)}")

    @property
    def way_list(self) -> list[str]:
        return [w.strip() for w in self.ways.split(",") if w.strip()]

    @property
    def learns_suffix(self) -> bool:
        return self.mode != "static" and self.learn in ("suffix", "both")


def load_stream(cfg: ReplayConfig) -> list[Query]:
    """Segments joined by '+' follow one another; segments joined by '|' are interleaved
    (round robin, one query from each in turn, until all are used up)."""
    spec = STREAM_ALIASES.get(cfg.dataset, cfg.dataset)
    queries: list[Query] = []
    for n, part in enumerate(spec.split("+")):
        lanes = [_segment(segment) for segment in part.split("|")]
        queries += [dataclasses.replace(q, segment=n) for group in itertools.zip_longest(*lanes) for q in group
                    if q is not None]
    queries = queries[cfg.skip : cfg.skip + cfg.limit]
    if not queries:
        raise DatasetError(f"the stream {cfg.dataset!r} has no queries after --skip {cfg.skip}")
    return queries * cfg.passes


def _segment(segment: str) -> list[Query]:
    name, *rest = segment.split(":") if not segment.endswith(".jsonl") else [segment]
    try:
        skip, limit = (int(rest[0]) if rest else 0), (int(rest[1]) if len(rest) > 1 else None)
    except ValueError:
        raise DatasetError(f"bad stream segment {segment!r}: expected NAME[:SKIP[:LIMIT]]") from None
    stop = None if limit is None else skip + limit
    return list(itertools.islice(iter_queries(name), skip, stop))


def run_replay(model_cfg: ModelConfig, engine_cfg: EngineConfig, policy_cfg: PolicyConfig,
               trainer_cfg: TrainerConfig, cfg: ReplayConfig, pool_cfg: PoolConfig | None = None,
               backend: BackendConfig | None = None) -> dict:
    pool_cfg = pool_cfg or PoolConfig()
    console = Console(stderr=True)
    if model_cfg.no_draft:
        raise ValueError("replay measures a draft: --no-draft makes no sense here")
    backend = backend or BackendConfig()
    vllm = (model_cfg, backend) if backend.vllm else None
    cfg = dataclasses.replace(cfg, learn=cfg.learn or ("draft" if vllm else "suffix"))
    backend.check(model=model_cfg, engine=engine_cfg, server=cfg, pool=pool_cfg,
                  trainer=trainer_cfg if cfg.learn in ("draft", "both") else None)
    queries = load_stream(cfg)
    console.print(f"loading models ({model_cfg.target}{', vLLM engine' if vllm else ''}) ...")
    if vllm is None:
        target, draft = load_pair(model_cfg)
        tokenizer = target.tokenizer
    else:  # vLLM loads the pair itself (per mode); onspec needs only the tokenizer here
        from transformers import AutoTokenizer

        from onspec.models.loading import resolve_device, resolve_dtype, resolve_spec

        target = draft = None
        dtype = resolve_dtype(model_cfg.dtype, resolve_device(model_cfg.device))
        tokenizer = AutoTokenizer.from_pretrained(resolve_spec(model_cfg.target_name, dtype))
    encoded = [(q, q.encode(tokenizer)) for q in queries]
    kept = [(q, ids) for q, ids in encoded if len(ids) <= cfg.max_prompt_tokens]
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = (["static", "online"] if cfg.mode in ("both", "interleaved") else
             cfg.way_list if cfg.mode == "ways" else [cfg.mode])
    results, tables = {}, {}
    if cfg.mode == "ways" and vllm is not None:
        raise ValueError("--mode ways runs onspec's engine: drop --engine vllm")
    if "arctic" in modes:
        from onspec.peers.arctic import available

        if (why := available()) is not None:
            console.print(f"skipping the way arctic: {why}")
            modes.remove("arctic")

    def run(mode: str) -> _Run:
        if vllm is not None:
            return _Run(mode, None, None, engine_cfg, policy_cfg, trainer_cfg, pool_cfg, cfg, out_dir,
                        vllm=vllm)
        if cfg.mode == "ways":  # nothing trains the draft: the ways share it
            return _Run(mode, target, None if mode == "target" else draft.model, engine_cfg, policy_cfg, trainer_cfg,
                        pool_cfg, cfg, out_dir)
        return _Run(mode, target, copy.deepcopy(draft.model), engine_cfg, policy_cfg, trainer_cfg, pool_cfg, cfg,
                    out_dir)

    groups = [[run(m) for m in modes]] if cfg.mode in ("interleaved", "ways") else [[m] for m in modes]
    for group in groups:
        runs = [r if isinstance(r, _Run) else run(r) for r in group]  # sequential modes: built one at a time
        _serve_stream(runs, kept, console)
        for r in runs:
            _write_csv(out_dir / f"replay_{r.mode}.csv", r.rows)
            (out_dir / f"replay_{r.mode}.partial.csv").unlink(missing_ok=True)
            results[r.mode] = r.finish()
            tables[r.mode] = r.rows
    boundaries = _boundaries(kept, cfg.passes)
    plot_alpha(out_dir, modes, cfg.plot_window, boundaries=boundaries)
    summary = {"dataset": cfg.dataset, "queries": len(kept), "skipped_long_prompts": len(encoded) - len(kept),
               **(results[modes[0]] if len(modes) == 1 else {})}
    if cfg.mode == "ways":
        summary["modes"] = results
        summary.update(_ways_summary(results, tables))
        summary["ways_plot"] = str(plot_ways(out_dir, modes, cfg.plot_window, boundaries))
    elif len(modes) > 1:
        summary["modes"] = results
        summary.update({k: results["online"][k] for k in ("alpha_first", "alpha_last", "alpha_mean", "updates",
                                                          "rollbacks", "tokens", "tokens_per_s")})
        summary["static_alpha_last"] = results["static"]["alpha_last"]
        summary["alpha_last_gain"] = results["online"]["alpha_last"] - results["static"]["alpha_last"]
        summary["tokens_per_s_ratio_online_vs_static"] = results["online"]["tokens_per_s"] / results["static"]["tokens_per_s"]
        summary["tokens_per_s_last_20pct_ratio_online_vs_static"] = _ratio(
            results["online"]["tokens_per_s_last_20pct"], results["static"]["tokens_per_s_last_20pct"])
        summary["interleaved"] = cfg.mode == "interleaved"
        segs = [results[m].get("per_segment") for m in ("static", "online")]
        if all(segs):
            summary["per_segment_tokens_per_s_ratio_online_vs_static"] = [
                {"source": a["source"], "start": a["start"], "ratio": _ratio(b["tokens_per_s"], a["tokens_per_s"])}
                for a, b in zip(*segs)]
    if "static_tf" in results.get("online", {}):
        summary["static_tf_alpha_last"] = results["online"]["static_tf"]["alpha_last"]
    summary["plot"] = str(out_dir / "alpha.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_table(results, console)
    if cfg.json:
        print(json.dumps(summary))
    return summary


class _Run:
    """One mode's pool (and trainer) serving the stream query by query: `serve` decodes one query
    and records its row, `finish` closes the trainer and summarises. Two runs can take turns on the
    same stream (`--mode interleaved`)."""

    def __init__(self, mode, target, draft_model, engine_cfg, policy_cfg, trainer_cfg, pool_cfg, cfg, out_dir,
                 vllm=None) -> None:
        self.mode, self.cfg, self.pool_cfg = mode, cfg, pool_cfg
        self.out_dir = out_dir
        self.ckpt_root = out_dir / "checkpoints"
        online = mode == "online"
        learn_draft = online and cfg.learn in ("draft", "both")
        if cfg.mode == "ways":  # the way's proposers; the suffix learner (adaptive) learns as it serves
            engine_cfg = _way_config(mode, engine_cfg)
        else:  # static: the floor alone; online: the learning system (--learn)
            engine_cfg = dataclasses.replace(engine_cfg, no_suffix=engine_cfg.no_suffix or not online
                                             or cfg.learn == "draft")
        if vllm is not None:  # vLLM decodes (its own pair, from the same directories); onspec learns
            model_cfg, backend = vllm
            self.pool, self.router = build_vllm_pool(model_cfg, engine_cfg, backend,
                                                     trainer_cfg if learn_draft else None,
                                                     self.ckpt_root if learn_draft else None), None
            draft_model = self.pool.general.draft
        else:
            self.pool, self.router = build_pool(target.model, target.tokenizer, draft_model, engine_cfg, policy_cfg,
                                                pool_cfg, trainer_cfg=trainer_cfg if learn_draft else None,
                                                checkpoints=self.ckpt_root if learn_draft else None)
        self.suffix = self.pool.general.engine.suffix
        # the kinds of proposer each row has counts of: the draft, the suffix learner (the summary's
        # columns, 0 where it does not run) and any other model-free proposer this engine runs
        self.kinds = ("draft", "suffix", *(p.kind for p in self.pool.general.engine.proposers if p.kind != "suffix"))
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=0)
        # the starting draft, frozen: its agreement with the (lossless, hence identical) served tokens
        # is the static run's alpha_tf, without decoding the stream a second time
        self.static_draft = (copy.deepcopy(draft_model).eval()
                             if learn_draft and self.params.greedy and cfg.static_baseline == "tf" else None)
        self.rows: list[dict] = []
        self.tokens, self.decode_s, self.route_s = 0, 0.0, 0.0

    def serve(self, i: int, q: Query, ids: list[int]) -> dict:
        pool, router, params = self.pool, self.router, self.params
        t_route = time.perf_counter()
        key = router.route(q, ids) if router is not None else None
        member = pool.pick(key, router.opens_at_once) if router is not None else pool.general
        self.route_s += time.perf_counter() - t_route
        trainer = member.trainer
        t0 = time.perf_counter()
        out = member.generate([Request(ids, params)], on_finish=trainer.on_output if trainer else None)[0]
        seconds = time.perf_counter() - t0
        self.decode_s += seconds
        self.tokens += len(out.token_ids)
        s = out.stats
        tf = (greedy_agreement(member.draft, ids + out.token_ids, len(ids))
              if params.greedy and member.draft is not None else None)
        static_tf = greedy_agreement(self.static_draft, ids + out.token_ids, len(ids)) if self.static_draft else None
        pool.observe(key, member, tf if tf is not None else s.alpha)
        members = pool.all_members
        row = {
            "query": i, "id": q.id, "source": q.source, "segment": q.segment, "route": key or "", "draft": member.name,
            "prompt_tokens": len(ids), "tokens": len(out.token_ids), "seconds": seconds,
            "prefill_seconds": s.prefill_time_s,  # the prompt's (target and draft), within `seconds`
            "alpha": s.alpha, "alpha_tf": tf, "static_alpha_tf": static_tf, "accepted": s.accepted,
            "evaluated": s.evaluated, "proposed": s.proposed, "steps": s.steps,
            "mean_k": s.proposed / s.steps if s.steps else 0, "tokens_per_s": s.tokens_per_s,
            "draft_version": member.version,
            "updates": sum(m.trainer.distiller.updates for m in members if m.trainer),
            "rollbacks": sum(m.trainer.distiller.rollbacks for m in members if m.trainer),
            # each proposer's share of this query's steps and its own acceptance there
            **{f"{kind}_{name}": value for kind in self.kinds for name, value in _counts(s, kind).items()},
            "tokens_per_pass": (s.accepted + s.steps) / s.steps if s.steps else None,
            "learner_version": self.suffix.version if self.suffix is not None else 0,
            "output": hashlib.sha1(str(out.token_ids).encode()).hexdigest()[:12],  # ways compared: equal outputs?
        }
        self.rows.append(row)
        return row

    def recent_alpha(self) -> str:
        recent = [r["alpha_tf"] if r["alpha_tf"] is not None else r["alpha"] for r in self.rows[-self.cfg.plot_window:]]
        recent = [a for a in recent if a is not None]
        return f"{sum(recent) / len(recent):.3f}" if recent else "n/a"

    def finish(self) -> dict:
        pool, router, rows = self.pool, self.router, self.rows
        trainer, per_member = {}, {}
        for m in pool.all_members:
            if m.trainer is None:
                continue
            m.trainer.wait_idle(timeout=600)
            m.trainer.close()
            st = m.trainer.stats()
            st["seconds_per_update"] = st["trainer_time_s"] / max(1, len(m.trainer.distiller.history))
            st["seconds_per_trained_token"] = (st["trainer_time_s"] / max(1, st["trained_tokens"])
                                               if st.get("trained_tokens") else None)
            st["bytes_per_buffered_token"] = st["buffer_bytes"] / max(1, st["buffer_tokens"])
            per_member[m.name] = st
        if per_member:
            trainer = per_member[GENERAL] if len(per_member) == 1 else {"per_draft": per_member}
        if router is not None and self.mode == "online":
            pool.save_manifest(self.ckpt_root, router.state_dict())
        fifth = rows[-max(1, len(rows) // 5):]
        summary = {
            "mode": self.mode, **_alpha_summary(rows), "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.decode_s if self.decode_s else 0.0,
            # after the prompt is cached: what speculation changes (the prompt's prefill it does not)
            "tokens_per_s_decoding": _ratio(self.tokens, sum(r["seconds"] - r["prefill_seconds"] for r in rows)),
            "tokens_per_s_last_20pct": _ratio(sum(r["tokens"] for r in fifth), sum(r["seconds"] for r in fifth)),
            "measured_alpha": _ratio(sum(r["accepted"] for r in rows), sum(r["evaluated"] for r in rows)),
            "mean_k": _ratio(sum(r["proposed"] for r in rows), sum(r["steps"] for r in rows)),
            "updates": sum(st["updates"] for st in per_member.values()),
            "rollbacks": sum(st["rollbacks"] for st in per_member.values()),
            "probing_steps": sum(m.drafter.policy.probing_steps for m in pool.all_members
                                 if m.drafter is not None and m.drafter.policy),
            "per_source": _groups(rows, "source"),
            "trainer": trainer,
            "tokens_per_pass": _ratio(sum(r["tokens"] for r in rows), sum(r["steps"] for r in rows)),
            "tokens_per_pass_last_20pct": _ratio(sum(r["tokens"] for r in fifth), sum(r["steps"] for r in fifth)),
        }
        if self.suffix is not None:
            summary["learner"] = {**_suffix_summary(rows), "last_20pct": _suffix_summary(fifth),
                                  "first_20pct": _suffix_summary(rows[: max(1, len(rows) // 5)]),
                                  **{k: v for k, v in self.suffix.stats().items()
                                     if k in ("version", "history", "contexts", "acceptance_by_depth")},
                                  "controller": self.pool.general.engine.controller.stats()}
        if self.static_draft is not None:
            static = _alpha_summary(_static_rows(rows))
            summary["static_tf"] = static
            summary["alpha_last_gain_vs_static_tf"] = _diff(summary["alpha_last"], static["alpha_last"])
        segments = _segments(rows)
        if len(segments) > 1:  # a "+" stream (shift): adaptation and forgetting, segment by segment
            summary["per_segment"] = [
                {"source": seg[0]["source"], "start": seg[0]["query"], **_alpha_summary(seg),
                 "tokens_per_s": _ratio(sum(r["tokens"] for r in seg), sum(r["seconds"] for r in seg)),
                 **({"static_tf": _alpha_summary(_static_rows(seg))} if self.static_draft is not None else {}),
                 **({"learner": _suffix_summary(seg)} if self.suffix is not None else {})}
                for seg in segments
            ]
        if router is not None:
            summary.update(router=self.pool_cfg.router, router_stats=router.stats(), per_draft=_groups(rows, "draft"),
                           pool=pool.stats(), router_us_per_request=1e6 * self.route_s / max(1, len(rows)))
        summary["engine"] = {"name": pool.engine.name, **pool.engine.stats()}
        pool.engine.close()
        return summary


def _serve_stream(runs: list[_Run], queries, console) -> None:
    """Every run serves every query; with several runs they take turns within each query, in a
    rotating order, so a machine that speeds up or slows down affects them alike."""
    label = "+".join(r.mode for r in runs)
    columns = [TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=len(queries), status="")
        for i, (q, ids) in enumerate(queries):
            for run in runs[i % len(runs):] + runs[: i % len(runs)]:
                run.serve(i, q, ids)
            status = "  ".join(f"{r.mode}: alpha {r.recent_alpha()} v{r.pool.general.version} "
                               f"{r.tokens / r.decode_s if r.decode_s else 0:.1f} tok/s" for r in runs)
            progress.update(task, advance=1, status=status)
            if (i + 1) % max(1, len(queries) // 20) == 0 or i + 1 == len(queries):  # every 5% of the stream
                if i + 1 < len(queries):
                    for r in runs:  # a run cut short (a long stream) still leaves its rows so far
                        _write_csv(r.out_dir / f"replay_{r.mode}.partial.csv", r.rows)
                if not console.is_terminal:  # a log file gets no live bar: a plain line instead
                    console.print(f"{i + 1}/{len(queries)} {status}")


def _ways_summary(results: dict, tables: dict[str, list[dict]]) -> dict:
    """`--mode ways`: each way's tokens/s over the stream and its last 20%, and its ratio against
    every other way (`vs`), from the same queries served in turns; outputs differing from the first
    way's (greedy serving is lossless: 0 in float32; bf16 or quantized weights round differently
    with the pass width)."""
    first = next(iter(tables))
    out = {}
    for way, r in results.items():
        entry = {k: r[k] for k in ("tokens", "tokens_per_s", "tokens_per_s_last_20pct", "tokens_per_s_decoding",
                                   "tokens_per_pass", "tokens_per_pass_last_20pct")}
        entry["vs"] = {other: {"tokens_per_s": _ratio(r["tokens_per_s"], o["tokens_per_s"]),
                               "last_20pct": _ratio(r["tokens_per_s_last_20pct"], o["tokens_per_s_last_20pct"]),
                               "decoding": _ratio(r["tokens_per_s_decoding"], o["tokens_per_s_decoding"])}
                       for other, o in results.items() if other != way}
        entry["outputs_differing_from_" + first] = sum(a["output"] != b["output"]
                                                       for a, b in zip(tables[way], tables[first]))
        out[way] = entry
    return {"ways": out}


def _counts(stats, kind: str) -> dict:
    c = stats.of(kind)
    return {"steps": c.steps, "proposed": c.proposed, "accepted": c.accepted, "evaluated": c.evaluated,
            "share": c.steps / stats.steps if stats.steps else 0.0, "alpha": c.alpha}


def _suffix_summary(rows: list[dict]) -> dict:
    """The suffix learner over these queries: its share of steps, its alpha, tokens per target pass."""
    steps = sum(r["steps"] for r in rows)
    return {"share_of_steps": _ratio(sum(r["suffix_steps"] for r in rows), steps),
            "alpha": _ratio(sum(r["suffix_accepted"] for r in rows), sum(r["suffix_evaluated"] for r in rows)),
            "accepted_per_step": _ratio(sum(r["suffix_accepted"] for r in rows), sum(r["suffix_steps"] for r in rows))}


def _alpha_summary(rows: list[dict]) -> dict:
    alphas = [r["alpha_tf"] if r["alpha_tf"] is not None else r["alpha"] for r in rows]
    fifth = max(1, len(alphas) // 5)
    return {"queries": len(rows), "alpha_first": _mean(alphas[:fifth]), "alpha_last": _mean(alphas[-fifth:]),
            "alpha_mean": _mean(alphas)}


def _static_rows(rows: list[dict]) -> list[dict]:
    """The rows as the starting draft saw them (its teacher-forced alpha), for `_alpha_summary`."""
    return [{"alpha_tf": r["static_alpha_tf"], "alpha": None} for r in rows]


def _segments(rows: list[dict]) -> list[list[dict]]:
    """The stream's "+" parts in stream order (each pass repeats them): runs of one segment index."""
    return [list(run) for _, run in itertools.groupby(rows, key=lambda r: r["segment"])]


def _groups(rows: list[dict], column: str) -> dict:
    """alpha_first / alpha_last / alpha_mean within each value of `column` (source, draft)."""
    names = sorted({r[column] for r in rows})
    return {name: _alpha_summary([r for r in rows if r[column] == name]) for name in names}


def plot_alpha(out_dir: Path, modes: list[str], window: int, boundaries: list[int]) -> Path:
    """alpha over the stream (moving averages, modes on the same axes), and below it tokens/s (over
    the same window: its tokens over its seconds); when the stream has several sources or the pool
    several drafts, a third panel draws each source's and each draft's own alpha moving average
    (over its own queries, placed at their stream positions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {}
    for mode in modes:
        with open(out_dir / f"replay_{mode}.csv") as f:
            tables[mode] = list(csv.DictReader(f))
    groups = _plot_groups(tables)
    learner = {mode: rows for mode, rows in tables.items() if any(float(r.get("suffix_steps") or 0) for r in rows)}
    heights = [2, 1] + ([2] if groups else []) + ([2] if learner else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, 3.8 * sum(heights) / 2 + 0.5), squeeze=False,
                             height_ratios=heights)
    ax = axes[0][0]
    for mode, rows in tables.items():
        ax.plot(range(len(rows)), _moving_average(_alphas(rows), window), label=mode)
        if mode == "online" and "static" not in modes and any(r.get("static_alpha_tf") for r in rows):
            static = [float(r["static_alpha_tf"] or "nan") for r in rows]
            ax.plot(range(len(static)), _moving_average(static, window), label="static (starting draft, teacher-forced)",
                    color="tab:blue", linestyle="--")
        if mode == "online":
            changes = [i for i in range(1, len(rows)) if rows[i]["draft_version"] != rows[i - 1]["draft_version"]]
            ax.plot(changes, [0.02] * len(changes), "|", color="gray", alpha=0.4, label="draft update")
    tx = axes[1][0]
    for mode, rows in tables.items():
        tx.plot(range(len(rows)), _windowed_rate(rows, window), label=mode)
    tx.set_ylabel(f"tokens/s ({window} queries)")
    tx.set_xlabel("query (stream order)")
    tx.set_ylim(bottom=0)
    tx.grid(alpha=0.3)
    tx.legend(loc="lower left", fontsize=8)
    for b in boundaries:
        tx.axvline(b, color="black", linestyle=":", linewidth=1)
    panels = [ax]
    if learner:  # each proposer's own alpha, and the share of steps the suffix learner proposed
        lx = axes[-1][0]
        for mode, rows in learner.items():
            col = lambda name: [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]  # noqa: E731
            lx.plot(range(len(rows)), _moving_average(col("suffix_alpha"), window), label=f"{mode}: suffix learner alpha")
            lx.plot(range(len(rows)), _moving_average(col("draft_alpha"), window), label=f"{mode}: draft (floor) alpha")
            lx.plot(range(len(rows)), _moving_average(col("suffix_share"), window), linestyle="--",
                    label=f"{mode}: share of steps the suffix learner proposed")
        lx.set_title(f"proposers ({window}-query moving averages)", fontsize=10)
        panels.append(lx)
    if groups:
        gx = axes[2][0]
        for label, (xs, values) in groups.items():
            gx.plot(xs, _moving_average(values, window), label=label, linestyle="--" if " source " in f" {label}" else "-")
        gx.set_title(f"alpha per source (dashed) and per draft ({window}-query moving average within each)", fontsize=10)
        panels.append(gx)
    for a in panels:
        for b in boundaries:
            a.axvline(b, color="black", linestyle=":", linewidth=1)
        a.set_xlabel("query (stream order)")
        a.set_ylabel(f"alpha (moving average, {window} queries)")
        a.set_ylim(0, 1)
        a.grid(alpha=0.3)
        a.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out_dir / "alpha.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ways(out_dir: Path, ways: list[str], window: int, boundaries: list[int]) -> Path:
    """`--mode ways`: tokens per target pass (its tokens over its target passes in each query's
    trailing window) and tokens/s (the same window) over the stream, one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {}
    for way in ways:
        with open(out_dir / f"replay_{way}.csv") as f:
            tables[way] = list(csv.DictReader(f))
    fig, (px, tx) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for way, rows in tables.items():
        px.plot(range(len(rows)), _windowed_rate(rows, window, over="steps"), label=way)
        tx.plot(range(len(rows)), _windowed_rate(rows, window), label=way)
    px.set_ylabel(f"tokens per target pass ({window} queries)")
    tx.set_ylabel(f"tokens/s ({window} queries)")
    tx.set_xlabel("query (stream order)")
    for a in (px, tx):
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
        a.legend(loc="upper left", fontsize=8)
        for b in boundaries:
            a.axvline(b, color="black", linestyle=":", linewidth=1)
    fig.tight_layout()
    path = out_dir / "ways.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _alphas(rows: list[dict]) -> list[float]:
    return [float(r["alpha_tf"] or r["alpha"] or "nan") for r in rows]


def _plot_groups(tables: dict[str, list[dict]]) -> dict[str, tuple[list[int], list[float]]]:
    """{label: (stream positions, alphas)} for each source and each draft of each mode, when the
    stream has more than one source or the pool more than one draft; else empty."""
    out = {}
    for mode, rows in tables.items():
        alphas = _alphas(rows)
        for column in ("source", "draft"):
            names = sorted({r[column] for r in rows})
            if len(names) < 2:
                continue
            for name in names:
                picked = [(i, a) for i, a in enumerate(alphas) if rows[i][column] == name]
                label = f"{mode}: {column} {name}" if len(tables) > 1 else f"{column} {name}"
                out[label] = ([i for i, _ in picked], [a for _, a in picked])
    return out


def _boundaries(queries, passes: int) -> list[int]:
    """Query indices where the source changes or a new pass starts (vertical lines on the plot)."""
    n = len(queries) // passes if passes else len(queries)
    out = [i for i in range(1, len(queries)) if queries[i][0].source != queries[i - 1][0].source]
    return sorted(set(out + [n * p for p in range(1, passes)]))


def _windowed_rate(rows: list[dict], window: int, over: str = "seconds") -> list[float]:
    """tokens/s over each query's trailing window: the window's tokens over its seconds (or over
    another column: `steps` gives tokens per target pass)."""
    tokens = [float(r["tokens"]) for r in rows]
    seconds = [float(r[over]) for r in rows]
    out = []
    for i in range(len(rows)):
        lo = max(0, i - window + 1)
        s = sum(seconds[lo: i + 1])
        out.append(sum(tokens[lo: i + 1]) / s if s > 0 else float("nan"))
    return out


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _print_table(results: dict, console: Console) -> None:
    from rich.table import Table

    table = Table(title="replay")
    for col in ("mode", "queries", "tokens", "tok/s", "tokens/pass", "alpha first 20%", "alpha last 20%", "alpha mean",
                "updates", "rollbacks"):
        table.add_column(col)
    for mode, r in results.items():
        table.add_row(mode, str(r["queries"]), str(r["tokens"]), f"{r['tokens_per_s']:.1f}", _f(r["tokens_per_pass"]),
                      _f(r["alpha_first"]),
                      _f(r["alpha_last"]), _f(r["alpha_mean"]), str(r["updates"]), str(r["rollbacks"]))
    Console(file=sys.stdout, width=130).print(table)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _diff(a, b):
    return None if a is None or b is None else a - b


def _ratio(a, b):
    return a / b if b else None


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"
