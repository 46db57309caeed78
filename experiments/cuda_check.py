"""The CUDA path on tiny random models (no downloads): speculative greedy == target-only greedy in
float32 on the GPU, with the full and a reduced draft head, the int8 draft, adaptive k and the suffix
learner beside the draft (the default engine); sampling runs; a
bf16 run reports how many outputs differ. For the device machine (no network; carry the repo):

    PYTHONPATH=src python experiments/cuda_check.py
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.policy import AdaptiveK, PolicyConfig
from onspec.engine.sampling import SamplingParams
from onspec.engine.suffix import SuffixLearner
from onspec.models.draft_vocab import DraftVocab

V = 512


class Tok:
    """Enough of a tokenizer for the engine: decode for stop checks."""
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def model(arch, seed, layers, dtype, device):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=1, tie_word_embeddings=False)
    m = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)
    return m.to(device=device, dtype=dtype).eval()


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    prompts = [[5, 17, 33, 2], [9], [100, 200, 300, 400, 5, 6, 7], [7, 8, 9, 10, 11] * 4]  # the last repeats: suffix matches
    for arch in ("llama", "qwen2"):
        for dtype in (torch.float32, torch.bfloat16):
            target = model(arch, 0, 4, dtype, dev)
            noisy = copy.deepcopy(target)
            with torch.no_grad():
                for p in noisy.parameters():
                    p.add_(torch.randn_like(p) * 0.2 * p.float().std().to(p.dtype))
            params = SamplingParams(max_new_tokens=48, ignore_eos=True)
            ref = [o.token_ids for o in SpeculativeEngine(target, Tok(), None).generate([Request(p, params) for p in prompts])]
            counts = torch.randint(0, 100, (V,), generator=torch.Generator().manual_seed(0))
            for name, kw in (("full", {}), ("reduced256", {"draft_vocab": DraftVocab(counts, 256)}),
                             ("int8", {"draft_quant": "int8"}), ("adaptive", {"policy": AdaptiveK(4, PolicyConfig())}),
                             ("suffix", {"policy": AdaptiveK(4, PolicyConfig()), "suffix": SuffixLearner()})):
                eng = SpeculativeEngine(target, Tok(), noisy, k=4, **kw)
                t0 = time.perf_counter()
                outs = eng.generate([Request(p, params) for p in prompts])
                key = f"{arch}/{str(dtype).removeprefix('torch.')}/{name}"
                report[key] = {"equal": [o.token_ids for o in outs] == ref,
                               "differing": sum(o.token_ids != r for o, r in zip(outs, ref)),
                               "alpha": sum(o.stats.accepted for o in outs) / max(1, sum(o.stats.evaluated for o in outs)),
                               "suffix_steps": sum(o.stats.of("suffix").steps for o in outs),
                               "seconds": round(time.perf_counter() - t0, 3)}
            sp = SamplingParams(max_new_tokens=32, temperature=0.8, seed=3, ignore_eos=True)
            a = SpeculativeEngine(target, Tok(), noisy, k=3).generate([Request(prompts[0], sp)])[0].token_ids
            b = SpeculativeEngine(target, Tok(), noisy, k=3).generate([Request(prompts[0], sp)])[0].token_ids
            report[f"{arch}/{str(dtype).removeprefix('torch.')}/sampling_same_seed_same_output"] = a == b
            # a seed gives the same tokens whatever the draft or k (Gumbel-coupled verification)
            c = SpeculativeEngine(target, Tok(), None).generate([Request(prompts[0], sp)])[0].token_ids
            d = SpeculativeEngine(target, Tok(), noisy, k=4, policy=AdaptiveK(4, PolicyConfig())).generate(
                [Request(prompts[0], sp)])[0].token_ids
            report[f"{arch}/{str(dtype).removeprefix('torch.')}/same_seed_any_draft"] = a == c == d
            # teacher data kept at the source (on the GPU) equals the top-K of the full logits
            eng = SpeculativeEngine(target, Tok(), noisy, k=4)
            eng.teacher_top_k, eng.record_logits = 8, True
            recs, finals = [], []
            eng.generate([Request(prompts[2], params)], on_record=recs.append, on_finish=finals.append)
            top = [r.target_logits.float().softmax(-1).topk(8, dim=-1) for r in recs]
            ids = torch.cat([t.indices.to(torch.int32).cpu() for t in top])[:48]
            ex = finals[0].example
            report[f"{arch}/{str(dtype).removeprefix('torch.')}/teacher_at_source_equal"] = bool(
                torch.equal(ex.top_ids, ids) and torch.equal(
                    ex.top_probs, torch.cat([t.values.to(torch.float16).cpu() for t in top])[:48]))
    print(json.dumps(report, indent=1))
    bad = [k for k, v in report.items() if isinstance(v, dict) and "float32" in k and not v["equal"]]
    print("float32 greedy equality on CUDA:", "FAILED " + str(bad) if bad else "all equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
