"""The distiller: the draft's trainable copy and how it learns from buffered examples.

It knows nothing of engines, threads or files: `update(buffer)` takes `steps` AdamW steps on a
private training copy of the draft and guards them:
- a NaN or infinite loss (or weights) discards the update (weights and optimizer state restored);
- the guard measures alpha (greedy agreement of draft and target) on the buffer's held-back probe
  before and after; a drop beyond `guard_tolerance` rolls the update back;
- otherwise the version number goes up and `weights()` is the new draft to publish.
With `train_layers` N > 0 only the top N decoder layers (with the final norm, and the head when it
is not the tied embedding table) are trained: the layers below never change, so their output at
the boundary is computed once per buffered request (`online/forward.py`, `boundary_states`) and
kept, and a training step runs only the layers above it (forward and backward). What lies below
the boundary (the embedding table and the frozen layers) is the serving draft's own, in its dtype,
not a float32 copy: it never gets a gradient, and it computes the boundary states as serving does.
With `freeze_head` the output head is not trained either (it still runs, in float32, and passes
the gradient down to the trained layers).
With `lora_rank` R > 0 the trained layers' linear projections learn through rank-R adapters (LoRA,
injected by peft) while their own weights stay frozen; the norms (and the head, unless frozen) train
as before. What is published, checkpointed and adopted is always the merged draft (each projection's
weight plus its adapter's B @ A x scale), under the served draft's own names, so the engine, the
checkpoint directory (`--draft DIR`) and a rollback never see an adapter. Adopting weights (a
rollback, a resumed checkpoint) writes them into the frozen projections and zeroes the adapters.
The worker (online/worker.py) decides when to call it and publishes what it accepts.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from onspec.config import option
from onspec.engine.records import Example
from onspec.models.draft import frozen_tables, is_embedding
from onspec.online.buffer import ReplayBuffer
from onspec.online.forward import (boundary_states, cast_from_boundary, decoder_layers, logits_at_generated,
                                   logits_from_boundary)
from onspec.online.losses import LOSSES, bucket, distill_loss

log = logging.getLogger("onspec.trainer")

Teacher = Callable[[torch.Tensor], torch.Tensor]
"""Token ids [1, T] -> the target's logits [1, T, vocab] (student-sampled data only)."""


@dataclass
class TrainerConfig:
    """Online distillation of the draft."""

    update_interval: int = option(8, "take an update every N finished requests (the paper's I)")
    steps: int = option(4, "optimizer steps per update")
    batch_size: int = option(8, "requests (examples) per optimizer step")
    lr: float = option(3e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    loss: str = option("fkl", "distillation loss", choices=tuple(LOSSES))
    beta: float = option(0.5, "JSD beta (0 = forward KL, 1 = reverse KL, as TRL)")
    positions: str = option("wrong", "train on positions where the draft disagrees with the target ('wrong', the paper) "
                            "or on every served position ('all')", choices=("wrong", "all"))
    data_source: str = option("teacher", "teacher: the served outputs (free); student: the draft generates and the target "
                              "scores (costs target passes); mix: student with probability --lam per request",
                              choices=("teacher", "student", "mix"))
    lam: float = option(0.5, "probability of a student-sampled request when --data-source mix")
    teacher_top_k: int = option(32, "target probabilities kept per position (plus the leftover mass)")
    buffer_tokens: int = option(200_000, "buffer capacity in generated tokens; the oldest requests are evicted first")
    max_buffer_records: int = option(0, "buffer capacity in requests as well (0: bounded by --buffer-tokens only); "
                                     "the oldest are evicted first")
    replay_share: float = option(0.25, "share of each batch drawn from older buffered requests (against forgetting)")
    probe_every: int = option(8, "hold back every N-th request as a probe for the guard (never trained on)")
    probe_size: int = option(16, "probe requests kept (most recent)")
    guard_tolerance: float = option(0.02, "roll back an update that lowers probe alpha by more than this")
    train_embeddings: bool = option(False, "also train the (tied) embedding matrix; off: layers and norms only")
    train_layers: int = option(0, "train only the top N decoder layers (with the final norm, and an untied head); "
                               "the layers below stay frozen and their output is computed once per buffered "
                               "request and kept (one hidden vector per token), so training never runs them. "
                               "0 = every layer")
    freeze_head: bool = option(False, "keep the output head frozen (an untied head: Qwen2.5-0.5B's is 136M of the "
                               "166M parameters trained with --train-layers 2); it still runs, in float32, and "
                               "passes the gradient down to the trained layers")
    lora_rank: int = option(0, "train the trained layers' linear projections through rank-R adapters (LoRA, peft) "
                            "instead of their full weights; the published draft has them merged. 0 = full weights")
    lora_alpha: float = option(0.0, "LoRA scale numerator (an adapter adds alpha/rank x B @ A); 0 = 2 x rank")
    max_train_tokens: int = option(512, "context window per training example (longer prompts are cut from the left)")
    train_budget: float = option(1.0, "largest fraction of wall-clock time the trainer may be busy (it sleeps the rest)")
    grad_clip: float = option(1.0, "gradient norm clip (0 disables)")
    trainer_threads: int = option(0, "intra-op threads of the trainer thread (thread-local; 0 = torch's default): "
                                  "fewer leave decoding more of the cores (docs/results.md measures the trade)")
    checkpoint_every: int = option(10, "write a checkpoint every N accepted updates (0: only at the end)")
    background: bool = option(True, "train in a background thread (off: inline, for tests and debugging)", cli=False)
    seed: int = option(0, "seed of the trainer's sampling (replay batches, student sampling, mixing)")

    def __post_init__(self) -> None:
        checks = {
            "update_interval": self.update_interval >= 1, "steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0, "beta": 0 <= self.beta <= 1, "lam": 0 <= self.lam <= 1,
            "teacher_top_k": self.teacher_top_k >= 1, "buffer_tokens": self.buffer_tokens >= 1,
            "replay_share": 0 <= self.replay_share <= 1, "guard_tolerance": self.guard_tolerance >= 0,
            "max_train_tokens": self.max_train_tokens >= 2, "train_budget": 0 < self.train_budget <= 1,
            "trainer_threads": self.trainer_threads >= 0, "max_buffer_records": self.max_buffer_records >= 0,
            "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
            "train_layers": self.train_layers >= 0, "lora_rank": self.lora_rank >= 0, "lora_alpha": self.lora_alpha >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"trainer option out of range: {', '.join('--' + b.replace('_', '-') for b in bad)}")
        if self.train_layers and self.train_embeddings:
            raise ValueError("--train-embeddings needs --train-layers 0 (the embeddings lie below any frozen boundary)")
        if self.lora_rank and self.train_embeddings:
            raise ValueError("--lora-rank adapts the linear projections only: it cannot be combined with --train-embeddings")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {sorted(LOSSES)}")


@dataclass
class UpdateLog:
    version: int
    outcome: str
    """'accepted', 'rolled_back' or 'discarded_nan'."""
    loss: float
    probe_before: float | None
    probe_after: float | None
    seconds: float
    at: float = field(default_factory=time.time)


class Distiller:
    def __init__(self, draft: nn.Module, config: TrainerConfig, teacher: Teacher | None = None) -> None:
        self.cfg = config
        self.teacher = teacher
        self.boundary: int | None = None
        """With `train_layers`: the first trained decoder layer (the ones below are frozen)."""
        # a deepcopy memo: the serving draft's parameters the student uses as they are (never written by either)
        shared = frozen_tables(draft, config.train_embeddings)
        head = draft.get_output_embeddings()
        if config.freeze_head and config.train_embeddings and head is not None and is_embedding(draft, head.weight):
            raise ValueError("--freeze-head contradicts --train-embeddings: this draft's head is its embedding table")
        if config.train_layers:
            layers = decoder_layers(draft)
            self.boundary = max(0, len(layers) - config.train_layers)
            below = [p for layer in layers[: self.boundary] for p in layer.parameters()]
            if head is None or not is_embedding(draft, head.weight):  # a tied table is the head, above the boundary
                below += list(draft.get_input_embeddings().parameters())
            shared.update({id(p): p for p in below})  # in the draft's dtype: they only compute the boundary states
        if config.freeze_head and head is not None:  # on the gradient path: shared only when already float32
            shared.update({id(p): p for p in head.parameters() if p.dtype == torch.float32})
        self.student = _float32_except(copy.deepcopy(draft, memo=shared), set(shared)).train()
        if self.boundary is not None:
            cast_from_boundary(self.student, self.boundary)
        self.adapted = _add_adapters(self.student, self.boundary, config) if config.lora_rank else {}
        """With `lora_rank`: the served name of each adapted projection's weight -> its peft LoRA layer."""
        frozen = set(shared) | {id(p) for layer in self.adapted.values() for p in layer.base_layer.parameters()}
        if self.boundary is not None:
            frozen |= {id(p) for layer in decoder_layers(self.student)[: self.boundary] for p in layer.parameters()}
        if config.freeze_head and self.student.get_output_embeddings() is not None:
            frozen |= {id(p) for p in self.student.get_output_embeddings().parameters()}
        self.trainable = {
            name: p for name, p in self.student.named_parameters()
            if (config.train_embeddings or not is_embedding(self.student, p)) and id(p) not in frozen
        }
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in self.trainable)
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.version = 0
        """The version of the student's weights: +1 per accepted update (the one source of truth)."""
        self.version_floor = 0
        """The next accepted update is numbered above this too (after `adopt`: numbers already
        published elsewhere, e.g. a version rolled back across a cluster, are never reused)."""
        self.updates = 0
        self.rollbacks = 0
        self.discarded = 0
        self.trainer_time_s = 0.0
        self.trained_tokens = 0
        """Generated positions in the batches of every step taken (each counted once per step)."""
        self.history: list[UpdateLog] = []
        self._probe_cache: dict[int, tuple[Example, int, int]] = {}  # probe counts under the current weights
        self._states: dict[int, tuple[Example, torch.Tensor, tuple[int, int], int]] = {}
        """With `train_layers`: per buffered example, its boundary states, (first kept row, rows), skipped."""
        self._generator = torch.Generator().manual_seed(config.seed)

    def update(self, buffer: ReplayBuffer) -> UpdateLog | None:
        """Take `steps` optimizer steps on batches from `buffer`, then guard: accept (version + 1),
        roll back or discard. None when there was nothing to learn."""
        if len(buffer) == 0:
            return None
        t0 = time.perf_counter()
        if self.boundary is not None:  # forget the states of examples the buffer no longer holds
            held = {id(e) for e in buffer.held()}
            self._states = {k: v for k, v in self._states.items() if k in held}
        probe = buffer.probe_examples()
        before_counts = self._probe_counts(probe, reuse=True)
        before = _ratio(before_counts, probe)
        snapshot = self._snapshot(before_counts)
        self._probe_cache = {}  # the steps below change the weights; _restore brings the counts back with them
        losses = []
        for _ in range(self.cfg.steps):
            batch = self._batch(buffer)
            self.trained_tokens += sum(e.num_positions for e in batch)
            loss = self.train_step(batch)
            if loss is None:
                continue
            if not math.isfinite(loss):
                self._restore(snapshot)
                self.discarded += 1
                return self._log(UpdateLog(self.version, "discarded_nan", loss, before, None, time.perf_counter() - t0))
            losses.append(loss)
        if not losses:
            self._probe_cache = before_counts  # no step was taken: the weights are unchanged
            return None
        self._probe_cache = self._probe_counts(probe, reuse=False)
        after = _ratio(self._probe_cache, probe)
        mean_loss = sum(losses) / len(losses)
        if not all(bool(torch.isfinite(p).all()) for p in self.trainable.values()):
            self._restore(snapshot)
            self.discarded += 1
            return self._log(UpdateLog(self.version, "discarded_nan", mean_loss, before, after, time.perf_counter() - t0))
        if before is not None and after is not None and after < before - self.cfg.guard_tolerance:
            self._restore(snapshot)
            self.rollbacks += 1
            return self._log(UpdateLog(self.version, "rolled_back", mean_loss, before, after, time.perf_counter() - t0))
        self.version = max(self.version, self.version_floor) + 1
        self.updates += 1
        return self._log(UpdateLog(self.version, "accepted", mean_loss, before, after, time.perf_counter() - t0))

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A private copy of the trained weights in `dtype` (what is published to the servers), by
        the served draft's names: with adapters, each adapted projection merged."""
        out = {n: p.detach().to(dtype).clone() for n, p in self.trainable.items() if not _is_adapter(n)}
        out.update({n: _merged(layer).to(dtype) for n, layer in self.adapted.items()})
        return out

    @property
    def published_names(self) -> list[str]:
        """The served draft's names of what `weights` publishes."""
        return [n for n in self.trainable if not _is_adapter(n)] + list(self.adapted)

    def served_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole student as the served draft (what a checkpoint holds): its state dict under the
        served names, each adapted projection merged, no adapter tensors."""
        if not self.adapted:
            return self.student.state_dict()
        out = {}
        for name, t in self.student.state_dict().items():
            if _is_adapter(name):
                continue
            served = name.replace(".base_layer.", ".")
            out[served] = _merged(self.adapted[served]) if served in self.adapted else t
        return out

    def train_step(self, examples: list[Example]) -> float | None:
        """One optimizer step on `examples`; returns the loss (None: nothing to learn; a
        non-finite loss is returned without stepping, for the caller to discard the update)."""
        loss = self.loss_on(examples)
        if loss is None:
            return None
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable.values(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def loss_on(self, examples: list[Example]) -> torch.Tensor | None:
        """Mean distillation loss of the student over the chosen positions of `examples`."""
        logits, top_ids, top_probs, _ = self._student_logits(examples, grad=True)
        if logits is None:
            return None
        if self.cfg.positions == "wrong":
            wrong = logits.argmax(-1) != top_ids[:, 0]
            if not wrong.any():
                return None
            logits, top_ids, top_probs = logits[wrong], top_ids[wrong], top_probs[wrong]
        teacher_logp, student_logp = bucket(top_ids, top_probs, logits)
        return distill_loss(self.cfg.loss, teacher_logp, student_logp, beta=self.cfg.beta).mean()

    @torch.no_grad()
    def probe_alpha(self, examples: list[Example]) -> float | None:
        """Greedy acceptance on held-back requests: the share of positions where the draft's
        argmax (teacher-forced on the served context) equals the target's."""
        return _ratio(self._probe_counts(examples, reuse=False), examples)

    # -- internals ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _probe_counts(self, examples: list[Example], reuse: bool) -> dict[int, tuple[Example, int, int]]:
        """(example, matching positions, positions) per probe example under the current weights.
        With `reuse`, examples already measured under these same weights (the previous update's
        accepted "after", or its restored "before") are not evaluated again: only the probe
        examples added since are, which saves most of a probe pass per update."""
        cached = self._probe_cache if reuse else {}
        counts = {id(e): cached[id(e)] for e in examples if id(e) in cached and cached[id(e)][0] is e}
        fresh = [e for e in examples if id(e) not in counts]
        logits, top_ids, _, sizes = self._student_logits(fresh, grad=False)
        if logits is not None:
            hits = (logits.argmax(-1) == top_ids[:, 0]).long()
            for e, part in zip(fresh, hits.split(sizes)):
                counts[id(e)] = (e, int(part.sum()), len(part))
        return counts

    def _student_logits(self, examples: list[Example], grad: bool):
        """Student logits at every generated position of `examples` (teacher-forced), with the
        matching teacher top-K, and how many of the M positions each example contributed.
        Returns ([M, vocab], [M, K] long, [M, K] float, sizes) or Nones."""
        if not examples:
            return None, None, None, None
        if self.boundary is not None:
            states = self._boundary_states(examples)
            with torch.set_grad_enabled(grad):
                logits = logits_from_boundary(self.student, self.boundary, [st for _, st, _, _ in states],
                                              [off for _, _, off, _ in states])
            skipped = [sk for *_, sk in states]
        else:
            with torch.set_grad_enabled(grad):
                logits, skipped = logits_at_generated(
                    self.student, [(e.tokens, e.start) for e in examples], self.cfg.max_train_tokens
                )
        device = logits.device
        t_ids = torch.cat([e.top_ids[s:].long() for e, s in zip(examples, skipped)]).to(device)
        t_probs = torch.cat([e.top_probs[s:].float() for e, s in zip(examples, skipped)]).to(device)
        return logits, t_ids, t_probs, [len(e.top_ids) - s for e, s in zip(examples, skipped)]

    def _boundary_states(self, examples: list[Example]) -> list[tuple[Example, torch.Tensor, tuple[int, int], int]]:
        """The kept boundary states of `examples`, computing the missing ones in one pass through
        the frozen layers (exact: those layers never change)."""
        missing = [e for e in examples if self._states.get(id(e), (None,))[0] is not e]
        if missing:
            computed = boundary_states(self.student, [(e.tokens, e.start) for e in missing], self.boundary,
                                       self.cfg.max_train_tokens)
            for e, (states, offsets, skipped) in zip(missing, computed):
                self._states[id(e)] = (e, states, offsets, skipped)
        return [self._states[id(e)] for e in examples]

    @property
    def boundary_bytes(self) -> int:
        """Bytes of boundary states kept (with `train_layers`)."""
        return sum(st.numel() * st.element_size() for _, st, _, _ in self._states.values())

    def _batch(self, buffer: ReplayBuffer) -> list[Example]:
        batch = buffer.take_batch(self.cfg.batch_size, self.cfg.replay_share)
        if self.cfg.data_source == "teacher":
            return batch
        out = []
        for e in batch:
            use_student = self.cfg.data_source == "student" or float(torch.rand(1, generator=self._generator)) < self.cfg.lam
            out.append(self._student_sampled(e) if use_student else e)
        return out

    @torch.no_grad()
    def _student_sampled(self, e: Example) -> Example:
        """Student-sampled data: the draft continues the prompt (sampling at temperature 1), the
        target scores the continuation in one forward pass (this costs a target pass)."""
        prompt = e.tokens[: e.start].long()[None]
        n = e.num_positions
        self.student.eval()
        try:
            out = self.student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                        pad_token_id=0)
        finally:
            self.student.train()
        generated = out[0, e.start :]
        if len(generated) == 0:
            return e
        seq = torch.cat([prompt[0], generated])
        if self.teacher is None:
            raise RuntimeError("student-sampled data needs the target: pass `teacher` to the Distiller")
        logits = self.teacher(seq[None, :-1])[0, e.start - 1 :]  # [n, vocab]
        top = logits.float().softmax(-1).topk(self.cfg.teacher_top_k, dim=-1)
        return Example(e.request_id + "+student", seq.to(torch.int32), e.start,
                       top.indices.to(torch.int32), top.values.to(torch.float16), self.version, "student")

    def adopt(self, weights: dict[str, torch.Tensor], version: int, floor: int = 0) -> None:
        """Make published weights the student's (a global rollback, or the version serving when a
        restarted trainer's checkpoint is older): the trained parameters are copied in, the
        optimizer's moments (earned on other weights) dropped, the probe re-measured at the next
        update; the next accepted version is numbered above `floor`."""
        own = {n: p for n, p in self.trainable.items() if not _is_adapter(n)}
        own.update({n: layer.base_layer.weight for n, layer in self.adapted.items()})
        wrong = [f"{n} {tuple(w.shape)} (the draft's: {tuple(own[n].shape)})"
                 for n, w in weights.items() if n in own and own[n].shape != w.shape]
        if wrong:
            raise ValueError(f"weights of another draft model ({len(wrong)} tensors differ, e.g. {wrong[0]})")
        with torch.no_grad():
            for n, p in own.items():
                if n in weights:
                    p.copy_(weights[n])
                    if n in self.adapted:  # the adopted weight is the whole projection: its adapter starts over
                        _reset_adapter(self.adapted[n])
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        self._probe_cache = {}
        self.version = version
        self.version_floor = max(self.version_floor, floor)

    def _snapshot(self, probe_counts: dict):
        """The weights, the optimizer state, and the probe counts measured under those weights."""
        return ({n: p.detach().clone() for n, p in self.trainable.items()}, copy.deepcopy(self.optimizer.state_dict()),
                probe_counts)

    def _restore(self, snapshot) -> None:
        params, opt_state, self._probe_cache = snapshot
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(params[n])
        self.optimizer.load_state_dict(opt_state)
        self.optimizer.zero_grad(set_to_none=True)

    def _log(self, entry: UpdateLog) -> UpdateLog:
        self.history.append(entry)
        self.trainer_time_s += entry.seconds
        level = logging.INFO if entry.outcome == "accepted" else logging.WARNING
        log.log(level, "update -> v%d %s loss=%.4f probe %s -> %s (%.2fs)", entry.version, entry.outcome, entry.loss,
                _fmt(entry.probe_before), _fmt(entry.probe_after), entry.seconds)
        return entry


def _float32_except(model: nn.Module, keep: set[int]) -> nn.Module:
    """`model.float()` except for the parameters whose id is in `keep` (the serving draft's own,
    shared with it: converting them would convert the served draft)."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in keep and p.is_floating_point():
                p.data = p.data.float()
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(module, name, b.float())
    return model


def _add_adapters(student: nn.Module, boundary: int | None, config: TrainerConfig) -> dict[str, nn.Module]:
    """Inject rank-`lora_rank` LoRA adapters (peft) into the linear projections of the trained
    decoder layers (every layer without a boundary), never into the head; returns the served name
    of each adapted weight -> its LoRA layer. No dropout: the probe and the gradients stay exact."""
    from peft import LoraConfig, inject_adapter_in_model

    head = student.get_output_embeddings()
    if boundary is not None:
        scope = [m for layer in decoder_layers(student)[boundary:] for m in layer.modules()]
    else:
        scope = [m for m in student.base_model.modules() if m is not head]
    in_scope = {id(m) for m in scope}
    targets = [name for name, m in student.named_modules()
               if id(m) in in_scope and type(m) is nn.Linear and m is not head]
    if not targets:
        raise ValueError("--lora-rank found no linear projections to adapt in this draft's trained layers "
                         "(use --lora-rank 0 to train the full weights)")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=targets, bias="none")
    inject_adapter_in_model(lora, student)
    modules = dict(student.named_modules())
    return {f"{t}.weight": modules[t] for t in targets}


def _is_adapter(name: str) -> bool:
    return ".lora_" in name


def _merged(layer: nn.Module) -> torch.Tensor:
    """An adapted projection's weight as served: its frozen weight plus the adapter's delta."""
    with torch.no_grad():
        return (layer.base_layer.weight + layer.get_delta_weight("default")).detach().clone()


def _reset_adapter(layer: nn.Module) -> None:
    """The adapter's delta back to zero (B = 0, peft's own initialisation of B)."""
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()


def _ratio(counts: dict[int, tuple[Example, int, int]], examples: list[Example]) -> float | None:
    """Probe alpha over `examples` from per-example counts (None: no probe positions)."""
    total = sum(counts[id(e)][2] for e in examples)
    return sum(counts[id(e)][1] for e in examples) / total if total else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
