"""Teacher-forced forward passes over served sequences (shared by the trainer and replay)."""

from __future__ import annotations

import torch


def logits_at_generated(model, seqs: list[tuple[torch.Tensor, int]], window: int) -> tuple[torch.Tensor, list[int]]:
    """The model's next-token logits at every generated position of each sequence.

    seqs: (tokens [T], start) pairs, tokens = prompt + generated, start = prompt length.
    Only the last `window` tokens of context are fed (longer prompts are cut from the left), so a
    sequence's first predicted positions may fall outside: `skipped[i]` says how many of sequence
    i's generated positions were left out (from its start).
    Returns logits: [M, vocab] (M = sum of the kept positions, in order) and skipped: [len(seqs)].
    The LM head runs only at the kept positions, not over the whole padded batch.
    """
    inputs, offsets, skipped = [], [], []
    for tokens, start in seqs:
        T = len(tokens)
        lo = max(0, T - 1 - window)
        first = max(start, lo + 1)  # the first predicted position whose context starts in the window
        inputs.append(tokens[lo : T - 1].long())
        offsets.append((first - 1 - lo, T - first))  # (input index of the first kept row, kept rows)
        skipped.append(first - start)
    width = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    mask = torch.zeros(len(inputs), width, dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = x
        mask[b, : len(x)] = 1
    device = next(model.parameters()).device
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    picked = torch.cat([hidden[b, i0 : i0 + n] for b, (i0, n) in enumerate(offsets)])  # [M, hidden]
    return model.get_output_embeddings()(picked).float(), skipped


@torch.no_grad()
def greedy_agreement(model, tokens: list[int], start: int, window: int = 1024) -> float | None:
    """Share of generated tokens equal to the model's argmax given the served context: the greedy
    acceptance rate this model would have on this request, whatever k was used to serve it."""
    if len(tokens) <= start:
        return None
    seq = torch.tensor(tokens)
    logits, skipped = logits_at_generated(model, [(seq, start)], window)
    targets = seq[start + skipped[0] :].to(logits.device)
    return float((logits.argmax(-1) == targets).float().mean())
