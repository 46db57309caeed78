"""The online distiller: learns the draft from the target on served traffic, in the background.

Wiring: pass `distiller.on_record` and `distiller.on_finish` to `SpeculativeEngine.generate`.
Every `update_interval` finished requests it takes `steps` AdamW steps on the buffer, on a
private training copy of the draft, in a background thread (decoding never waits). Then:
- a NaN or infinite loss discards the update (weights and optimizer state restored);
- the guard measures alpha (greedy agreement of draft and target) on the held-back probe before
  and after; a drop beyond `guard_tolerance` rolls the update back;
- otherwise the version number goes up and the new weights are offered to the engine, which
  swaps them in between two verify steps (`SpeculativeEngine.offer_draft`).
Checkpoints (safetensors + optimizer state) are written every `checkpoint_every` updates; a new
distiller with the same checkpoint directory resumes the last good version.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from onspec.config import option
from onspec.engine.records import RequestOutput, StepRecord
from onspec.online.buffer import Example, ExampleBuilder, ReplayBuffer
from onspec.online.checkpoint import CheckpointStore
from onspec.online.forward import logits_at_generated
from onspec.online.losses import LOSSES, bucket, distill_loss

log = logging.getLogger("onspec.trainer")


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
    max_train_tokens: int = option(512, "context window per training example (longer prompts are cut from the left)")
    train_budget: float = option(1.0, "largest fraction of wall-clock time the trainer may be busy (it sleeps the rest)")
    grad_clip: float = option(1.0, "gradient norm clip (0 disables)")
    trainer_threads: int = option(0, "intra-op threads of the trainer thread (thread-local; 0 = torch's default). "
                                  "On 2 cores, 1 learned faster but slowed decoding more (0.54x vs 0.66x)")
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
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"trainer option out of range: {', '.join('--' + b.replace('_', '-') for b in bad)}")
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


class OnlineDistiller:
    def __init__(self, engine, config: TrainerConfig, checkpoint_dir: str | None = None) -> None:
        if engine.draft is None:
            raise ValueError("online distillation needs a draft model")
        self.engine = engine
        self.cfg = config
        # frozen float32 embedding tables are shared with the serving draft, not copied
        self.student = copy.deepcopy(engine.draft, memo=frozen_tables(engine.draft, config.train_embeddings)).float().train()
        self.trainable = {
            name: p for name, p in self.student.named_parameters()
            if config.train_embeddings or not _is_embedding(self.student, p)
        }
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in self.trainable)
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.builder = ExampleBuilder(config.teacher_top_k)
        self.buffer = ReplayBuffer(config.buffer_tokens, config.probe_every, config.probe_size, seed=config.seed,
                                   capacity_requests=config.max_buffer_records)
        self.store = CheckpointStore(checkpoint_dir) if checkpoint_dir else None
        self.version = engine.draft_version
        self.requests = 0
        self.updates = 0
        self.rollbacks = 0
        self.discarded = 0
        self.trainer_time_s = 0.0
        self.history: list[UpdateLog] = []
        self._probe_cache: dict[int, tuple[Example, int, int]] = {}  # probe counts under the current weights
        self._generator = torch.Generator().manual_seed(config.seed)
        self._due = 0
        self._cond = threading.Condition()
        self._closing = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._resume()
        if config.background:
            self._thread = threading.Thread(target=self._worker, name="onspec-trainer", daemon=True)
            self._thread.start()

    # -- the engine's callbacks -----------------------------------------------------------------

    def on_record(self, rec: StepRecord) -> None:
        self.builder.on_record(rec)

    def on_finish(self, out: RequestOutput) -> None:
        example = self.builder.finish(out, draft_version=self.engine.draft_version)
        if example is not None:
            self.buffer.add(example)
        self.requests += 1
        if self.requests % self.cfg.update_interval == 0:
            if self._thread is None:
                self.update()
            else:
                with self._cond:
                    self._due += 1
                    self._cond.notify()

    # -- one update -------------------------------------------------------------------------------

    def update(self) -> UpdateLog | None:
        """Take `steps` optimizer steps, guard, publish or roll back."""
        if len(self.buffer) == 0:
            return None
        t0 = time.perf_counter()
        probe = self.buffer.probe_examples()
        before_counts = self._probe_counts(probe, reuse=True)
        before = _ratio(before_counts, probe)
        snapshot = self._snapshot(before_counts)
        self._probe_cache = {}  # the steps below change the weights; _restore brings the counts back with them
        losses = []
        for _ in range(self.cfg.steps):
            loss = self.train_step(self._batch())
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
        self.version += 1
        self.updates += 1
        self.engine.offer_draft(self._published_state(), self.version, alpha_hint=after)
        entry = self._log(UpdateLog(self.version, "accepted", mean_loss, before, after, time.perf_counter() - t0))
        if self.store is not None and self.cfg.checkpoint_every and self.updates % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        return entry

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
        with torch.set_grad_enabled(grad):
            logits, skipped = logits_at_generated(
                self.student, [(e.tokens, e.start) for e in examples], self.cfg.max_train_tokens
            )
        device = logits.device
        t_ids = torch.cat([e.top_ids[s:].long() for e, s in zip(examples, skipped)]).to(device)
        t_probs = torch.cat([e.top_probs[s:].float() for e, s in zip(examples, skipped)]).to(device)
        return logits, t_ids, t_probs, [len(e.top_ids) - s for e, s in zip(examples, skipped)]

    def _batch(self) -> list[Example]:
        batch = self.buffer.take_batch(self.cfg.batch_size, self.cfg.replay_share)
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
        logits = self.engine.target(seq[None, :-1]).logits[0, e.start - 1 :]  # [n, vocab]
        top = logits.float().softmax(-1).topk(self.cfg.teacher_top_k, dim=-1)
        return Example(e.request_id + "+student", seq.to(torch.int32), e.start,
                       top.indices.to(torch.int32), top.values.to(torch.float16), self.version, "student")

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

    def _published_state(self) -> dict:
        """A private copy of the trained weights, in the serving draft's dtype."""
        dtype = next(self.engine.draft.parameters()).dtype
        return {n: p.detach().to(dtype).clone() for n, p in self.trainable.items()}

    def _log(self, entry: UpdateLog) -> UpdateLog:
        self.history.append(entry)
        self.trainer_time_s += entry.seconds
        level = logging.INFO if entry.outcome == "accepted" else logging.WARNING
        log.log(level, "update -> v%d %s loss=%.4f probe %s -> %s (%.2fs)", entry.version, entry.outcome, entry.loss,
                _fmt(entry.probe_before), _fmt(entry.probe_after), entry.seconds)
        return entry

    def _worker(self) -> None:
        if self.cfg.trainer_threads:
            torch.set_num_threads(self.cfg.trainer_threads)  # thread-local: decoding keeps its own count
        while True:
            with self._cond:
                while not self._due and not self._closing:
                    self._cond.wait()
                if self._closing and not self._due:
                    return
                self._due = 0
            t0 = time.perf_counter()
            self._running = True
            try:
                self.update()
            except Exception:  # the trainer must never take serving down
                log.exception("trainer update failed; serving continues with draft v%d", self.version)
            finally:
                self._running = False
            busy = time.perf_counter() - t0
            if self.cfg.train_budget < 1.0:
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, timeout=busy * (1 / self.cfg.train_budget - 1))

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until no update is due or running (for tests and end-of-stream reporting)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and (self._due or self._running):
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def checkpoint(self) -> None:
        if self.store is None:
            return
        self.store.save(self.student, self.engine.tokenizer, self.optimizer, self.version,
                        {"updates": self.updates, "rollbacks": self.rollbacks, "discarded": self.discarded,
                         "requests": self.requests})

    def close(self) -> None:
        """Finish pending work, stop the thread, write a final checkpoint."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()
            self._thread = None
        if self.store is not None and self.updates:
            self.checkpoint()

    def _resume(self) -> None:
        if self.store is None:
            return
        meta = self.store.load_into(self.student, self.optimizer)
        if meta is None:
            return
        self.version = int(meta["version"])
        self.updates = int(meta.get("updates", 0))
        self.rollbacks = int(meta.get("rollbacks", 0))
        self.engine.offer_draft(self._published_state(), self.version)
        self.engine.apply_pending_swap()
        log.info("resumed draft v%d from %s", self.version, self.store.latest())

    def stats(self) -> dict:
        return {
            "draft_version": self.version, "updates": self.updates, "rollbacks": self.rollbacks,
            "discarded_nan": self.discarded, "requests": self.requests, "buffer_requests": len(self.buffer),
            "buffer_tokens": self.buffer.tokens, "buffer_bytes": self.buffer.nbytes, "evicted": self.buffer.evicted,
            "trainer_time_s": self.trainer_time_s,
        }


def frozen_tables(model, train_embeddings: bool) -> dict:
    """A deepcopy memo that shares the (tied) float32 embedding table instead of copying it, when
    training leaves it frozen: drafts cloned with it, and their students, cost only their layers."""
    if train_embeddings:
        return {}
    return {id(p): p for p in model.parameters() if _is_embedding(model, p) and p.dtype == torch.float32}


def _is_embedding(model, p: torch.nn.Parameter) -> bool:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return p is emb or (out is not None and p is out.weight and out.weight is emb)


def _ratio(counts: dict[int, tuple[Example, int, int]], examples: list[Example]) -> float | None:
    """Probe alpha over `examples` from per-example counts (None: no probe positions)."""
    total = sum(counts[id(e)][2] for e in examples)
    return sum(counts[id(e)][1] for e in examples) / total if total else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
