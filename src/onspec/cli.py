"""`onspec` command line: generate, bench, replay, distill, serve, derive-draft. Flags come from the typed configs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onspec.config import add_arguments, from_args
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.models.pair import ModelConfig


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.run(args)
    except ValueError as e:  # config range checks, model specs, datasets: all say what is wrong
        print(f"onspec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode one prompt speculatively and print the text and stats")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) as the last line")
    add_arguments(gen, ModelConfig)
    add_arguments(gen, EngineConfig)
    add_arguments(gen, PolicyConfig)
    add_arguments(gen, SamplingParams)
    gen.set_defaults(run=cmd_generate)

    models = sub.add_parser("models", help="list the models that run offline (short names for --target / --draft)")
    models.set_defaults(run=cmd_models)

    from onspec.apps.bench import BenchConfig, run_bench
    from onspec.apps.distill import DistillConfig, run_distill
    from onspec.apps.replay import ReplayConfig, run_replay
    from onspec.online.distiller import TrainerConfig
    from onspec.pool.pool import PoolConfig

    models = (ModelConfig, ("no_draft",))
    _config_command(sub, "bench", "the same prompts decoded target-only, by onspec (adaptive and fixed k), transformers assisted generation and llama.cpp, interleaved",
                    run_bench, [models, (EngineConfig, ()), (PolicyConfig, ()), (BenchConfig, ())])
    from onspec.engine.role import BackendConfig

    _config_command(sub, "replay", "serve a query stream in order, online (learning) and/or static; plot alpha",
                    run_replay, [models, (EngineConfig, ()), (PolicyConfig, ()), (TrainerConfig, ()), (ReplayConfig, ()),
                                 (PoolConfig, ()), (BackendConfig, ())])
    _config_command(sub, "distill", "offline: the target answers a dataset, the draft distills from it",
                    run_distill, [models, (TrainerConfig, ()), (DistillConfig, ())])

    from onspec.cluster.config import ClusterConfig
    from onspec.serve.config import ServerConfig

    def run_serve(model, engine, policy, trainer, server, pool, cluster, backend):
        server = server.resolved(backend.engine)
        backend.check(model=model, engine=engine, trainer=trainer, server=server, pool=pool, cluster=cluster)
        if backend.vllm:
            from onspec.apps.serve import run_serve as serve

            serve(model, engine, policy, trainer, server, pool, backend,
                  (cluster.rollback_tolerance, cluster.rollback_min_tokens))
            return
        if cluster.replicas:  # Ray is imported only here
            try:
                from onspec.cluster.launch import run_cluster_serve
            except ImportError as e:
                raise ValueError(f"--replicas needs Ray ({e}): pip install -e '.[ray]' (scripts/setup.sh does)") from None

            run_cluster_serve(model, engine, policy, trainer, server, cluster, pool)
            return
        if cluster.ray_address is not None:
            raise ValueError("--ray-address needs --replicas N")
        from onspec.apps.serve import run_serve as serve

        serve(model, engine, policy, trainer, server, pool)

    _config_command(sub, "serve", "OpenAI-compatible server; the draft keeps learning from the served traffic",
                    run_serve, [models, (EngineConfig, ()), (PolicyConfig, ()), (TrainerConfig, ()), (ServerConfig, ()),
                                (PoolConfig, ()), (ClusterConfig, ()), (BackendConfig, ())])

    derive = sub.add_parser("derive-draft", help="write the derived draft (first N target layers) as safetensors")
    derive.add_argument("--out", required=True, type=Path, help="output directory")
    add_arguments(derive, ModelConfig, exclude=("draft", "no_draft"))
    derive.set_defaults(run=cmd_derive_draft)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from onspec.data.streams import Query
    from onspec.engine.build import make_engine
    from onspec.engine.engine import Request
    from onspec.models.pair import load_pair

    model_cfg, engine_cfg, params = from_args(ModelConfig, args), from_args(EngineConfig, args), from_args(SamplingParams, args)
    policy_cfg = from_args(PolicyConfig, args)
    if not args.prompt:
        raise ValueError("--prompt is empty")
    target, draft = load_pair(model_cfg)
    if args.chat and not getattr(target.tokenizer, "chat_template", None):
        raise ValueError(f"--chat: the target {target.source} has no chat template")
    query = (Query("cli", "cli", messages=({"role": "user", "content": args.prompt},)) if args.chat
             else Query("cli", "cli", text=args.prompt))
    engine = make_engine(target.model, target.tokenizer, draft.model if draft else None, engine_cfg, policy_cfg)
    out = engine.generate([Request(query.encode(target.tokenizer), params)])[0]
    s = out.stats
    if args.json:
        print(json.dumps(out.to_dict()))
    else:
        print(out.text)
        alpha = f"{s.alpha:.3f}" if s.alpha is not None else "n/a"
        c = f"{s.cost_ratio:.3f}" if s.cost_ratio is not None else "n/a"
        print(f"[{len(out.token_ids)} tokens, {s.tokens_per_s:.1f} tok/s, alpha {alpha} ({s.accepted}/{s.evaluated}), "
              f"{s.mean_accepted_length:.2f} tokens/target pass, accepted-length histogram {s.accepted_hist}, c {c}, "
              f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from onspec.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS, available, cache_dir

    print(f"{'name':<22} {'installed':<10} {'converted (cache)':<26} summary")
    for m in MODELS.values():
        converted = sorted(p.name.rsplit("-", 1)[-1] for p in (cache_dir() / "models").glob(f"{m.name}-*")
                           if (p / "config.json").is_file())
        role = " [default target]" if m.name == DEFAULT_TARGET else (
            " [default draft]" if m.name in DEFAULT_DRAFT.values() else "")
        print(f"{m.name:<22} {'yes' if available(m) else 'no':<10} {', '.join(converted) or '-':<26} {m.summary}{role}")
    print(f"\nwheels: ./scripts/setup.sh installs them (--no-deps); cache: {cache_dir()} (ONSPEC_CACHE overrides)")
    from onspec.models import kernels

    host = kernels.host()
    print(f"\nthis CPU: {host.machine}, {host.vector}; kernel paths (models/kernels.py), first that runs is the default:")
    for path, why in kernels.table():
        print(f"  {path.name:<12} {'runs here' if why is None else 'no: ' + why}   needs {path.needs}")
    print("also accepted by --target/--draft: a .gguf file, a model directory, or an HF model id")
    return 0


def _config_command(sub, name: str, help: str, run, configs: list[tuple[type, tuple[str, ...]]]) -> None:
    """A subcommand whose flags come from typed configs; `run` takes the configs in that order."""
    parser = sub.add_parser(name, help=help)
    for cls, exclude in configs:
        add_arguments(parser, cls, exclude=exclude)

    def run_command(args: argparse.Namespace) -> int:
        run(*(from_args(cls, args) for cls, _ in configs))
        return 0

    parser.set_defaults(run=run_command)


def cmd_derive_draft(args: argparse.Namespace) -> int:
    from onspec.models.draft import derive_draft, save_draft
    from onspec.models.loading import load_model, resolve_device

    cfg = from_args(ModelConfig, args)
    target = load_model(cfg.target, device=resolve_device(cfg.device), dtype=cfg.dtype)
    out = save_draft(derive_draft(target, cfg.draft_layers), args.out, {"derived_from": target.source, "layers": cfg.draft_layers})
    print(f"wrote {out} (first {cfg.draft_layers} layers of {target.source}); use it with --draft {out}")
    return 0


def _quiet_libraries() -> None:
    import warnings

    import transformers

    # transformers 5.2x renames `past_key_values` to `cache`; onspec passes the name every 5.x accepts
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
