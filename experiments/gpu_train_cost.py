"""What online learning costs on a GPU: the distiller's time per optimizer step, per full update and
per trained token, by how much of the draft is trained (`--train-layers`) and in which precision,
with the decoding side beside it for scale. For the device machine, which has no network and no
weights: the models are *randomly initialised with the real shapes* (Qwen2.5-Coder-0.5B as the draft,
1.5B as the target; FLOPs and time do not depend on the weight values), and the buffered examples
are synthetic, shaped like the served ones (prompt + 64 generated tokens, the target's top-32 per
generated position, as the engine's `Example`).

- train: `Distiller.train_step` on batches of the default 8 examples, and `Distiller.update` (the
  TrainerConfig defaults: 4 steps x batch 8, with its probe guard and snapshot) after each
  `update_interval` new examples, for each `--layers` value (0 = every layer) with the head
  trained and/or frozen (`--freeze-head`), in float32 (the distiller's own precision: the trained
  part of the student is float32) and with a bf16 autocast wrapped around the call here (not a
  distiller option). With random teachers nearly every position is "wrong", so
  `positions='wrong'` trains on about all of them.
- decode: one request (`--prompt-max` prompt tokens, 64 new, greedy, EOS ignored) target-only and
  speculative (k = 4): ms per target step and per draft forward. Acceptance is meaningless with
  random weights and is not reported.

    PYTHONPATH=src python experiments/gpu_train_cost.py --device cuda          # the real shapes
    PYTHONPATH=src python experiments/gpu_train_cost.py --device cpu --shape tiny  # a quick check

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.records import Example
from onspec.engine.sampling import SamplingParams
from onspec.online.buffer import ReplayBuffer
from onspec.online.distiller import Distiller, TrainerConfig

SHAPES = {  # read from the converted models' config.json (tie_word_embeddings is false there)
    "real": {
        "draft": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936),
        "target": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936),
    },
    "tiny": {
        "draft": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=4096),
        "target": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=192, vocab_size=4096),
    },
}
TOP_K = 32


class Tok:
    """Enough of a tokenizer for the engine: decode for stop checks."""
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def random_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      eos_token_id=1, pad_token_id=0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


def synthetic_examples(n: int, vocab: int, prompt: tuple[int, int], generated: int, seed: int) -> list[Example]:
    """Served-request-shaped examples: random tokens, a prompt length in `prompt`, and per generated
    position K distinct teacher ids (the served token first) with decreasing probabilities summing
    to about 0.9."""
    g = torch.Generator().manual_seed(seed)
    stride = max(1, (vocab - 1) // TOP_K)  # K distinct ids per row: first + i * stride (mod vocab)
    out = []
    for i in range(n):
        start = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        tokens = torch.randint(2, vocab, (start + generated,), generator=g, dtype=torch.int32)
        first = tokens[start:, None].long()  # the served token is the target's top-1 (greedy)
        top_ids = ((first + torch.arange(TOP_K) * stride) % vocab).to(torch.int32)
        probs = torch.rand(generated, TOP_K, generator=g).sort(-1, descending=True).values ** 4
        top_probs = (0.9 * probs / probs.sum(-1, keepdim=True)).to(torch.float16)
        out.append(Example(f"synthetic-{i}", tokens, start, top_ids, top_probs, 0, "teacher"))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def measure_training(draft, examples, layers: int, freeze_head: bool, precision: str, args, device) -> dict:
    """One way: steps on fixed batches, then full updates on a growing buffer."""
    cfg = TrainerConfig(background=False, train_layers=layers, freeze_head=freeze_head)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-autocast"
           else contextlib.nullcontext())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_bytes = torch.cuda.memory_allocated(device)
    d = Distiller(draft, cfg)
    batches = [examples[i: i + cfg.batch_size] for i in range(0, args.step_rounds * cfg.batch_size + cfg.batch_size,
                                                               cfg.batch_size)]
    with amp:
        first, _ = timed(device, lambda: d.train_step(batches[0]))  # warm-up (and batch 0's boundary)
        steps, boundary = [], 0.0
        for batch in batches[1:]:
            if d.boundary is not None:  # a new example's one-time pass through the frozen layers, apart
                boundary += timed(device, lambda: d._boundary_states(batch))[0]
            steps.append(timed(device, lambda: d.train_step(batch))[0])
        # full updates, as the worker calls them: every update_interval new requests
        buffer = ReplayBuffer(cfg.buffer_tokens, cfg.probe_every, cfg.probe_size, seed=0)
        stream = iter(examples)
        for e in [next(stream) for _ in range(4 * cfg.update_interval)]:
            buffer.add(e)
        timed(device, lambda: d.update(buffer))  # warm-up update
        updates, outcomes = [], []
        for _ in range(args.update_rounds):
            for _ in range(cfg.update_interval):
                buffer.add(next(stream))
            s, entry = timed(device, lambda: d.update(buffer))
            updates.append(s)
            outcomes.append(entry.outcome if entry else "none")
    step_tokens = statistics.mean(sum(len(e.tokens) for e in b) for b in batches[1:])
    step_positions = statistics.mean(sum(e.num_positions for e in b) for b in batches[1:])
    new_tokens = sum(len(e.tokens) for b in batches[1:] for e in b)
    row = {
        "train_layers": layers, "freeze_head": freeze_head, "precision": precision,
        "trained_parameters": sum(p.numel() for p in d.trainable.values()),
        "first_step_s": first, "seconds_per_step": statistics.median(steps),
        "ms_per_fed_token": 1e3 * statistics.median(steps) / step_tokens,
        "ms_per_trained_position": 1e3 * statistics.median(steps) / step_positions,
        "boundary_ms_per_new_token": 1e3 * boundary / new_tokens if d.boundary is not None else None,
        "seconds_per_update": statistics.median(updates), "update_outcomes": outcomes,
        "tokens_per_step": step_tokens, "positions_per_step": step_positions,
    }
    if device.type == "cuda":
        row["trainer_peak_gb"] = (torch.cuda.max_memory_allocated(device) - base_bytes) / 1e9
    del d
    return row


def measure_decoding(target, draft, args, device) -> dict:
    """ms per step target-only and speculative (k = 4), one request; random weights accept ~nothing."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, target.config.vocab_size, (args.prompt_max,), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.generated, ignore_eos=True)
    out = {}
    for name, engine in (("target_only", SpeculativeEngine(target, Tok(), None)),
                         ("speculative_k4", SpeculativeEngine(target, Tok(), draft, k=4))):
        engine.generate([Request(prompt, params)])  # warm-up
        walls, stats = [], []
        for _ in range(args.decode_rounds):
            wall, outs = timed(device, lambda: engine.generate([Request(prompt, params)]))
            walls.append(wall)
            stats.append(outs[0].stats)
        s = stats[-1]
        wall = statistics.median(walls)
        out[name] = {
            "ms_per_token": 1e3 * wall / s.generated, "ms_per_step_wall": 1e3 * (wall - s.prefill_time_s) / s.steps,
            "prefill_ms": 1e3 * s.prefill_time_s, "steps": s.steps,
            "ms_per_target_forward": 1e3 * s.target_time_s / max(1, s.target_forwards),
            "ms_per_draft_forward": 1e3 * s.draft_time_s / s.draft_forwards if s.draft_forwards else None,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="real")
    ap.add_argument("--layers", default="0,4,2", help="train-layers values (0 = every layer)")
    ap.add_argument("--freeze-head", choices=("off", "on", "both"), default="both",
                    help="each --layers value with the head trained (off), frozen (on) or both")
    ap.add_argument("--precisions", default="float32,bf16-autocast")
    ap.add_argument("--draft-dtype", default="bfloat16", help="the serving draft's dtype (the student is float32)")
    ap.add_argument("--prompt-min", type=int, default=100)
    ap.add_argument("--prompt-max", type=int, default=200)
    ap.add_argument("--generated", type=int, default=64)
    ap.add_argument("--step-rounds", type=int, default=5, help="timed train steps per way (after a warm-up)")
    ap.add_argument("--update-rounds", type=int, default=3, help="timed full updates per way (after a warm-up)")
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.draft_dtype)
    shape = SHAPES[args.shape]
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": args.shape, "draft_dtype": args.draft_dtype}
    print(f"# {info}", flush=True)
    draft = random_model(shape["draft"], dtype, device, seed=7)
    cfg = TrainerConfig()
    n = (args.step_rounds + 1) * cfg.batch_size + (4 + 1 + args.update_rounds) * cfg.update_interval
    examples = synthetic_examples(n, shape["draft"]["vocab_size"], (args.prompt_min, args.prompt_max),
                                  args.generated, seed=0)
    rows = []
    heads = {"off": (False,), "on": (True,), "both": (False, True)}[args.freeze_head]
    for precision in args.precisions.split(","):
        for m in (int(x) for x in args.layers.split(",")):
            for frozen in heads:
                row = measure_training(draft, examples, m, frozen, precision, args, device)
                rows.append(row)
                print(f"# train_layers={m} {'frozen' if frozen else 'trained'} head, {precision}: "
                      f"step {row['seconds_per_step']:.3f} s, update {row['seconds_per_update']:.3f} s", flush=True)
    decode = None
    if not args.no_decode:
        target = random_model(shape["target"], dtype, device, seed=0)
        decode = measure_decoding(target, draft, args, device)
        del target
    r0 = rows[0]
    print(f"\none update = {cfg.steps} AdamW steps x {cfg.batch_size} examples "
          f"(~{r0['tokens_per_step']:.0f} tokens fed, ~{r0['positions_per_step']:.0f} trained positions per step), "
          f"{args.draft_dtype} draft, trained part in float32 (frozen part shared in {args.draft_dtype} with "
          f"--train-layers); {info['device']}")
    head = ("train layers", "head", "precision", "trained params", "s / step", "ms / fed token", "ms / trained pos",
            "boundary ms / new tok", "s / update", "peak GB")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join((
            "all" if r["train_layers"] == 0 else str(r["train_layers"]), "frozen" if r["freeze_head"] else "trained",
            r["precision"],
            f"{r['trained_parameters'] / 1e6:.1f}M", f"{r['seconds_per_step']:.3f}", f"{r['ms_per_fed_token']:.3f}",
            f"{r['ms_per_trained_position']:.3f}",
            "" if r["boundary_ms_per_new_token"] is None else f"{r['boundary_ms_per_new_token']:.3f}",
            f"{r['seconds_per_update']:.3f}", f"{r['trainer_peak_gb']:.2f}" if "trainer_peak_gb" in r else "")))
    if decode:
        print(f"\ndecoding one request ({args.prompt_max} prompt tokens, {args.generated} new, greedy), "
              f"{args.draft_dtype} models:")
        for name, d in decode.items():
            draft_ms = "" if d["ms_per_draft_forward"] is None else f", draft forward {d['ms_per_draft_forward']:.2f} ms"
            print(f"  {name}: {d['ms_per_token']:.2f} ms / token, {d['ms_per_step_wall']:.2f} ms / step (wall), "
                  f"target forward {d['ms_per_target_forward']:.2f} ms{draft_ms}, prefill {d['prefill_ms']:.1f} ms")
    print(json.dumps({**info, "trainer": {"steps": cfg.steps, "batch_size": cfg.batch_size,
                                          "update_interval": cfg.update_interval}, "ways": rows, "decode": decode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
