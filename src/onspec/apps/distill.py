"""`onspec distill`: offline distillation of a draft on target responses (the paper's warm start
and its offline baseline). The target answers the dataset's queries (target-only decoding; the
engine keeps each answer's teacher distributions, as online), then the draft trains on them for
some epochs with the same loss code as the online trainer, and is written as a model directory
that `--draft DIR` loads.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from onspec.config import option
from onspec.data.streams import iter_queries
from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.sampling import SamplingParams
from onspec.models.draft import save_draft
from onspec.models.loading import LoadedModel
from onspec.models.pair import ModelConfig, load_pair
from onspec.online.distiller import Distiller, TrainerConfig


@dataclass
class DistillConfig:
    """Offline distillation."""

    dataset: str = option("sharegpt", "sharegpt | humaneval | a .jsonl file")
    limit: int = option(520, "queries the target answers")
    skip: int = option(0, "queries to skip first (e.g. to keep a replay stream unseen)")
    max_new_tokens: int = option(64, "tokens of each target response")
    epochs: int = option(2, "passes over the responses")
    holdout: int = option(20, "responses held out to measure alpha before and after")
    max_prompt_tokens: int = option(1024, "skip longer prompts")
    out: str | None = option(None, "output model directory (required)")

    def __post_init__(self) -> None:
        for name in ("limit", "max_new_tokens", "epochs", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.holdout < self.limit:
            raise ValueError("--holdout must be in [0, --limit)")
        if not self.out:
            raise ValueError("--out DIR is required")


def run_distill(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, cfg: DistillConfig) -> dict:
    console = Console(stderr=True)
    target, draft = load_pair(model_cfg)
    queries = list(itertools.islice(iter_queries(cfg.dataset), cfg.skip, cfg.skip + cfg.limit))
    engine = SpeculativeEngine(target.model, target.tokenizer, None, k=0)  # target-only answers
    engine.teacher_top_k = trainer_cfg.teacher_top_k  # each answer comes back as an Example
    distiller = Distiller(draft.model, trainer_cfg)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    examples = []
    with Progress(console=console) as progress:
        task = progress.add_task("target answers", total=len(queries))
        for q in queries:
            ids = q.encode(target.tokenizer)
            if len(ids) <= cfg.max_prompt_tokens:
                engine.generate([Request(ids, params)], on_finish=lambda o: examples.append(o.example))
            progress.advance(task)
        examples = [e for e in examples if e is not None]
        random.Random(trainer_cfg.seed).shuffle(examples)
        holdout, train = examples[: cfg.holdout], examples[cfg.holdout :]
        before = distiller.probe_alpha(holdout) if holdout else None
        batches = [train[i : i + trainer_cfg.batch_size] for i in range(0, len(train), trainer_cfg.batch_size)]
        task = progress.add_task("distilling", total=len(batches) * cfg.epochs)
        losses = []
        for _ in range(cfg.epochs):
            for batch in batches:
                loss = distiller.train_step(batch)
                if loss is not None:
                    losses.append(loss)
                progress.advance(task)
        after = distiller.probe_alpha(holdout) if holdout else None
    meta = {"distilled_from": target.source, "dataset": cfg.dataset, "responses": len(train), "epochs": cfg.epochs,
            "loss": trainer_cfg.loss, "holdout_alpha_before": before, "holdout_alpha_after": after}
    student = distiller.student
    if distiller.adapted:  # written as a plain model: the draft with its adapters merged
        student = draft.model
        student.load_state_dict(distiller.served_state_dict(), strict=False)
    out = save_draft(LoadedModel(student, target.tokenizer, "distilled"), Path(cfg.out), meta)
    result = {**meta, "out": str(out), "final_loss": losses[-1] if losses else None}
    console.print(f"held-out greedy alpha {before} -> {after}; wrote {out} (use --draft {out})")
    print(json.dumps(result), file=sys.stdout)
    return result
