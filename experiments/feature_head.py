"""Can a head on the target's own features learn fast enough to pay here (issue 23, item 1)?

Measures the EAGLE-style head of online/feature_head.py on a served stream, before any engine
wiring. The stream is a cache of served requests made by experiments/online_sweep.py (the default
pair, greedy, the target's own outputs):

    .venv/bin/python experiments/online_sweep.py --dataset humaneval --prompts 164 --ways static
    .venv/bin/python experiments/feature_head.py --served runs/sweep-humaneval-0-164-64.pt --out docs/results/feature-head

The default target (w8a8 on this CPU) reads each served request once, prompt and output (one
prefill pass; in serving these features come free with the verify passes), giving the features
f_t and the target's greedy choices. Then the head serves the requests in their order, cold (as
initialised) or warm (`--warm N`: first trained on the target's features over N ShareGPT answers
from conversation `--warm-skip` on, text no evaluation stream uses). For each request, before it
is trained on:
- alpha1: the share of its output positions where the head's first proposal equals the served
  token (what greedy verification would accept);
- tokens per step at k = `--k`: 1 + the proposals accepted in a row when the head chains k of
  them (its own output in place of the target's features), at every `--stride`-th output position;
then `--steps` optimizer steps on it and the `--replay` requests before it (all positions, prompt
included). c is a single-position head step (the chain's inner step, over a 300-token context)
over a single-position pass of the default target on onspec's forward, both timed here, the head in
bf16 and in w8a8. Prints a table per 16 requests and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from onspec.bench.report import save_json
from onspec.data.streams import iter_sharegpt_answers
from onspec.engine.build import draft_vocab
from onspec.models.decode import decode_forward
from onspec.models.pair import ModelConfig, load_pair
from onspec.models.precision import PackedLinear, can_pack, pack_linears
from onspec.models.quant import W8A8Linear, quantize_linears
from onspec.online.feature_head import FeatureHead, HeadShape, head_loss, training_pairs


@torch.no_grad()
def target_features(model, tokens: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens: [T] -> f: [T, H] (after the final norm, float32) and the target's argmax [T]."""
    out = model.model(input_ids=tokens[None].long())
    f = out.last_hidden_state[0]
    head = model.get_output_embeddings()
    greedy = torch.cat([head(f[i: i + chunk]).argmax(-1) for i in range(0, f.shape[0], chunk)])
    return f.float(), greedy


def _index_of(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    index = torch.full((vocab,), -1, dtype=torch.long)
    index[ids.long()] = torch.arange(ids.numel())
    return index


@torch.no_grad()
def evaluate(head: FeatureHead, seq: dict, k: int, stride: int) -> dict:
    """alpha1 at every output position of one served request, and at every `stride`-th one the
    head's k-chain: (its probability of each proposal, whether the served token equals it); the
    chain's accepted run ends at its first miss."""
    tokens, f, start = seq["tokens"], seq["features"], seq["start"]
    T = tokens.numel()
    n = T - 1  # head position i (0-based example i) reads f_i and x_{i+1}
    g, (kk, vv) = head.step(f[None, :n], tokens[None, 1: n + 1], torch.arange(1, n + 1)[None])
    p_first, idx = torch.softmax(head.logits(g[0]).float(), -1).max(-1)
    first = head.vocab_ids[idx]  # proposal for x_{i+2}
    anchors = range(max(start - 1, 0), T - 2)  # the target has just emitted x_{i+1}, an output token
    hits = [int(first[i] == tokens[i + 2]) for i in anchors]
    chains = []
    for i in list(anchors)[::stride]:
        if i + 1 + k >= T:
            break
        # the chain as inference runs it: after a miss the head goes on from its own token
        chain = [(float(p_first[i]), bool(first[i] == tokens[i + 2]))]
        past = (kk[:, :, : i + 1], vv[:, :, : i + 1])
        gi, tok, pos = g[:, i: i + 1], first[i].view(1, 1), torch.tensor([[i + 2]])
        for j in range(1, k):
            gi, past = head.step(gi, tok, pos, past)
            p, ix = torch.softmax(head.logits(gi[0, -1]).float(), -1).max(-1)
            tok = head.vocab_ids[ix].view(1, 1)
            chain.append((float(p), int(tok) == int(tokens[i + 2 + j])))
            pos = pos + 1
        chains.append(chain)
    runs = [_run(c) for c in chains]
    return {"hits": sum(hits), "positions": len(hits), "runs": runs, "chains": chains}


def _run(chain: list[tuple[float, bool]]) -> int:
    """Proposals accepted in a row."""
    n = 0
    for _, hit in chain:
        if not hit:
            break
        n += 1
    return n


def gated(rows: list[dict], cost: dict, thresholds=(0.0, 0.3, 0.5, 0.7, 0.9)) -> dict:
    """The head proposing only while its probability of its proposal is >= tau (EAGLE-2's
    confidence): per tau, the share of steps it would take (first proposal >= tau), its tokens per
    target pass there, and that step's speedup over a target-only step, 1 + accepted over
    T(m+1)/T(1) + m c (m proposed, c of the w8a8 head). The other steps are left to the floor."""
    chains = [c for r in rows for c in r["chains"]]
    out = {}
    for tau in thresholds:
        taken, tokens, speedups = 0, [], []
        for c in chains:
            lead = []
            for p, hit in c:
                if p < tau:
                    break
                lead.append(hit)
            if not lead:
                continue
            taken += 1
            m, acc = len(lead), _run([(1.0, h) for h in lead])
            ratio = cost["T_ratio"].get(m + 1, cost["T_ratio"][max(cost["T_ratio"])])
            tokens.append(1 + acc)
            speedups.append((1 + acc) / (ratio + m * cost["c_w8a8"]))
        out[tau] = {"share": taken / max(1, len(chains)),
                    "tokens_per_step": statistics.mean(tokens) if tokens else None,
                    "speedup": sum(tokens) / sum(t / s for t, s in zip(tokens, speedups)) if tokens else None}
    return out


def calibration(rows: list[dict], bins=(0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.01)) -> list[dict]:
    """Acceptance of the head's proposals by its probability of them (every chain step whose
    predecessors were accepted)."""
    steps = [x for r in rows for c in r["chains"] for x in c[: _run(c) + 1]]  # up to the first miss
    out = []
    for lo, hi in zip(bins, bins[1:]):
        inside = [hit for p, hit in steps if lo <= p < hi]
        out.append({"p": [lo, min(hi, 1.0)], "steps": len(inside),
                    "accepted": sum(inside) / len(inside) if inside else None})
    return out


AUTOCAST = True


def train(head: FeatureHead, opt, batch: list[dict], steps: int, feature_weight: float) -> float:
    """`steps` optimizer steps over the concatenated examples of `batch` (one sequence at a time,
    gradients summed); returns seconds."""
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for seq in batch:
            p = seq["pairs"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
                g, _ = head.step(p["features"][None], p["tokens"][None], p["positions"][None])
                loss, _ = head_loss(head, g[0], p["next_features"], p["labels"], feature_weight)
            (loss / len(batch)).backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def _c(target, head: FeatureHead, context: int = 300, repeats: int = 30) -> dict:
    """Single-position head step and target pass at `context` cached tokens, median seconds."""
    fwd = decode_forward(target)
    ids = torch.randint(0, 1000, (1, context))
    cache = DynamicCache()
    with torch.no_grad():
        target(input_ids=ids, past_key_values=cache, use_cache=True)

    def target_pass(n: int = 1):
        m = torch.zeros(1, 1, n, context + n, dtype=torch.bfloat16)
        m[..., context:] = torch.full((n, n), torch.finfo(torch.bfloat16).min).triu(1)
        fwd(torch.full((1, n), 5), m, torch.arange(context, context + n)[None], cache, logits_to_keep=n)
        cache.crop(context)

    def timed(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out = {"target_s": timed(target_pass)}
    out["T_ratio"] = {n: timed(lambda: target_pass(n)) / out["target_s"] for n in range(2, 10)}
    """T(n) / T(1): a verify pass over n positions against one."""
    h = head.shape.hidden
    for kind in ("bf16", "w8a8"):
        copy = FeatureHead(head.shape, head.lm_head, head.embed, dtype=torch.bfloat16)
        copy.load_state_dict({k: v for k, v in head.state_dict().items() if k != "vocab_ids"}, strict=False)
        lm = torch.nn.Linear(h, head.lm_head.shape[0], bias=False, dtype=torch.bfloat16)
        lm.weight.data.copy_(head.lm_head)
        if kind == "w8a8":
            quantize_linears(copy, kind, skip_head=False)
            lm = W8A8Linear(lm)
        else:
            pack_linears(copy)
            lm = PackedLinear(lm) if can_pack(lm) else lm
        past = (torch.zeros(1, head.shape.kv_heads, context, head.head_dim, dtype=torch.bfloat16),) * 2
        feat = torch.randn(1, 1, h, dtype=torch.bfloat16)
        with torch.no_grad():
            def head_step():
                g, _ = copy.step(feat, torch.tensor([[7]]), torch.tensor([[context]]), past)
                lm(g).argmax(-1)
            out[f"head_{kind}_s"] = timed(head_step)
        out[f"c_{kind}"] = out[f"head_{kind}_s"] / out["target_s"]
    return out


def projected(summary: dict, rows: list[dict], k_max: int) -> dict:
    """The head alone proposing k tokens every step, over `rows`: tokens per target pass
    1 + E[min(run, k)] over the pass's cost in single-position target passes, T(k+1)/T(1) + k c
    (c of the w8a8 head), from this run's own timings. A projection, not a decode: the engine
    does not run the head yet."""
    runs = [x for r in rows for x in r["runs"]]
    cost = summary["cost"]
    out = {}
    for k in range(1, k_max + 1):
        tokens = 1 + statistics.mean(min(x, k) for x in runs) if runs else 1.0
        out[k] = {"tokens_per_step": tokens,
                  "speedup": tokens / (cost["T_ratio"].get(k + 1, cost["T_ratio"][max(cost["T_ratio"])]) + k * cost["c_w8a8"])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--served", type=Path, required=True, help="served requests cache from experiments/online_sweep.py")
    ap.add_argument("--limit", type=int, default=0, help="first N served requests (0: all)")
    ap.add_argument("--vocab", type=int, default=32768, help="ids of the head (the draft vocabulary's); 0: all")
    ap.add_argument("--intermediate", type=int, default=0, help="the head's MLP width (0: the target's)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per served request")
    ap.add_argument("--replay", type=int, default=3, help="earlier requests trained on with each new one")
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--warm", type=int, default=0, help="ShareGPT answers trained on before the stream (0: cold)")
    ap.add_argument("--warm-skip", type=int, default=10000, help="first ShareGPT conversation of the warm start")
    ap.add_argument("--warm-tokens", type=int, default=384)
    ap.add_argument("--warm-epochs", type=int, default=1)
    ap.add_argument("--init", type=Path, default=None, help="start from this head (saved by --save-warm)")
    ap.add_argument("--save-warm", type=Path, default=None, help="save the head after the warm start here")
    ap.add_argument("--fp32", action="store_true", help="train in float32 (default: bf16 autocast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="directory for summary.json (rewritten as it goes)")
    args = ap.parse_args()
    console = Console(stderr=True)
    torch.manual_seed(args.seed)
    global AUTOCAST
    AUTOCAST = not args.fp32
    target, _ = load_pair(ModelConfig(no_draft=True, no_pack=True))
    model, tok = target.model, target.tokenizer
    embed = model.get_input_embeddings().weight
    head_w = model.get_output_embeddings().weight
    vocab = head_w.shape[0]
    ids = draft_vocab(model, tok, args.vocab).ids if args.vocab else torch.arange(vocab)
    index_of = _index_of(ids, vocab)
    shape = HeadShape.of(model.config, args.intermediate or None)
    head = FeatureHead(shape, head_w.float(), embed, ids)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    console.print(f"head: {sum(p.numel() for p in head.parameters()) / 1e6:.1f}M trained parameters, "
                  f"{ids.numel()} ids, MLP {shape.intermediate}")
    summary = {"options": {k: str(v) for k, v in vars(args).items()}}

    def save():
        save_json(args.out, summary)

    summary["cost"] = _c(model, head)
    console.print(f"cost: {summary['cost']}")
    save()

    def sequence(tokens: torch.Tensor, start: int, f: torch.Tensor, greedy: torch.Tensor) -> dict:
        """One request (or warm-start text) with the target's features and its training pairs."""
        tokens = tokens.long()
        return {"tokens": tokens, "features": f, "start": start,
                "pairs": training_pairs(f, greedy, tokens, index_of)}

    if args.warm:
        t0, trained, n_tok = time.perf_counter(), 0.0, 0
        texts = islice(iter_sharegpt_answers(), args.warm_skip, None)
        warm = []
        for text in texts:
            t = tok(text, return_tensors="pt").input_ids[0][: args.warm_tokens]
            if t.numel() < 32:
                continue
            warm.append(sequence(t, t.numel(), *target_features(model, t)))
            n_tok += t.numel()
            if len(warm) >= args.warm:
                break
        if len(warm) < args.warm:
            raise SystemExit(f"--warm {args.warm}: only {len(warm)} ShareGPT answers from conversation {args.warm_skip} on")
        feat_s = time.perf_counter() - t0
        for epoch in range(args.warm_epochs):
            for i in range(0, len(warm), 4):
                trained += train(head, opt, warm[i: i + 4], 1, args.feature_weight)
            console.print(f"warm epoch {epoch + 1}: {len(warm)} answers, {n_tok} tokens, train {trained:.0f} s")
        summary["warm"] = {"answers": len(warm), "tokens": n_tok, "features_s": feat_s, "train_s": trained}
        del warm
        save()
        if args.save_warm:
            torch.save({"head": head.state_dict(), "warm": summary["warm"], "options": summary["options"]},
                       args.save_warm)
    if args.init:
        saved = torch.load(args.init)
        head.load_state_dict(saved["head"])
        summary["init"] = {"path": str(args.init), "warm": saved.get("warm")}

    served = torch.load(args.served, weights_only=False)["examples"]
    if args.limit:
        served = served[: args.limit]
    # the target's features of the stream are the same for every run: computed once, kept beside it (bf16)
    cache_path = args.served.with_suffix(".features.pt")
    cached = torch.load(cache_path) if cache_path.is_file() else {}
    fresh = False
    rows, recent, train_s, trained_tokens, feat_s = [], [], 0.0, 0, 0.0
    for n, e in enumerate(served):
        t0 = time.perf_counter()
        if n in cached:
            f, greedy = cached[n][0].float(), cached[n][1]
        else:
            f, greedy = target_features(model, e["tokens"])
            cached[n], fresh = (f.bfloat16(), greedy), True
        seq = sequence(e["tokens"], int(e["start"]), f, greedy)
        feat_s += time.perf_counter() - t0
        head.eval()
        r = evaluate(head, seq, args.k, args.stride)
        head.train()
        recent = (recent + [seq])[-(args.replay + 1):]
        train_s += train(head, opt, recent, args.steps, args.feature_weight)
        trained_tokens += args.steps * sum(s["pairs"]["tokens"].numel() for s in recent)
        rows.append(r)
        if (n + 1) % 16 == 0 or n + 1 == len(served):
            block = rows[-16:] if (n + 1) % 16 == 0 else rows[-((n + 1) % 16):]
            a1 = sum(b["hits"] for b in block) / max(1, sum(b["positions"] for b in block))
            runs = [x for b in block for x in b["runs"]]
            console.print(f"requests {n + 1 - len(block) + 1}-{n + 1}: alpha1 {a1:.3f}, "
                          f"tokens/step at k={args.k} {1 + statistics.mean(runs) if runs else 0:.2f}, "
                          f"train {train_s:.0f} s")
            summary["blocks"] = summary.get("blocks", []) + [
                {"requests": [n + 2 - len(block), n + 1], "alpha1": a1,
                 "tokens_per_step": 1 + statistics.mean(runs) if runs else None,
                 "accepted_hist": [runs.count(a) for a in range(args.k + 1)]}]
            summary["train_s"], summary["trained_tokens"], summary["features_s"] = train_s, trained_tokens, feat_s
            save()
            if fresh and (n + 1) % 64 == 0:
                torch.save(cached, cache_path)
    if fresh:
        torch.save(cached, cache_path)
    table = Table(title=f"feature head on {args.served.name} ({'warm ' + str(args.warm) if args.warm else 'cold'})")
    for col in ("requests", "alpha1", f"tokens/step k={args.k}"):
        table.add_column(col)
    for b in summary["blocks"]:
        table.add_row(f"{b['requests'][0]}-{b['requests'][1]}", f"{b['alpha1']:.3f}",
                      f"{b['tokens_per_step']:.2f}" if b["tokens_per_step"] else "-")
    Console().print(table)
    last = rows[int(0.8 * len(rows)):]
    summary["alpha1_last_20pct"] = sum(b["hits"] for b in last) / max(1, sum(b["positions"] for b in last))
    summary["alpha1_first_16"] = summary["blocks"][0]["alpha1"]
    summary["s_per_trained_token"] = train_s / max(1, trained_tokens)
    summary["projected"] = projected(summary, rows[int(0.8 * len(rows)):], args.k)
    summary["gated_last_20pct"] = gated(rows[int(0.8 * len(rows)):], summary["cost"])
    summary["calibration_last_20pct"] = calibration(rows[int(0.8 * len(rows)):])
    console.print(f"gated by confidence, last 20%: {summary['gated_last_20pct']}")
    console.print(f"calibration, last 20%: {summary['calibration_last_20pct']}")
    save_json(args.out, [r["chains"] for r in rows], name="chains.json", indent=None)
    console.print(f"head alone over the last 20%, projected speedup over target-only per k: {summary['projected']}")
    save()
    print(json.dumps({k: summary[k] for k in ("cost", "alpha1_first_16", "alpha1_last_20pct", "train_s",
                                              "trained_tokens", "s_per_trained_token") if k in summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
