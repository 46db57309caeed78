"""Teacher-forced forward passes over served sequences (shared by the trainer and replay)."""

from __future__ import annotations

import functools

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
    inputs, offsets, skipped = _windows(seqs, window)
    ids, mask = _right_padded(inputs, next(model.parameters()).device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return _head_at(model, hidden, offsets), skipped


# -- training the top layers only (TrainerConfig.train_layers) ----------------------------------------

BOUNDARY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
"""Decoder-only models whose layer stack starts from the token embeddings as they are (no scaling,
no absolute position embedding added inside the stack), so it can be entered at any layer."""


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers; ValueError for an architecture the top-layer path
    does not support."""
    kind = getattr(model.config, "model_type", None)
    layers = getattr(model.base_model, "layers", None)
    if kind not in BOUNDARY_ARCHS or not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"--train-layers needs a {'/'.join(BOUNDARY_ARCHS)}-style model, not {kind!r} "
                         "(use --train-layers 0 to train every layer)")
    return layers


class _Reached(Exception):
    pass


@torch.no_grad()
def boundary_states(model, seqs: list[tuple[torch.Tensor, int]], layer: int, window: int
                    ) -> list[tuple[torch.Tensor, tuple[int, int], int]]:
    """The input of decoder layer `layer` (the frozen boundary) at every fed position of each
    sequence, as `logits_at_generated` would feed it: per sequence (states [n, hidden], (first
    kept row, kept rows), skipped). The layers above `layer` are not run."""
    inputs, offsets, skipped = _windows(seqs, window)
    ids, mask = _right_padded(inputs, next(model.parameters()).device)
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Reached

    # first among the layer's hooks: the states as the frozen layers computed them (see cast_from_boundary)
    handle = decoder_layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        model.base_model(input_ids=ids, attention_mask=mask)
    except _Reached:
        pass
    finally:
        handle.remove()
    h = captured["h"]  # [batch, width, hidden]
    return [(h[b, : len(x)].clone(), offsets[b], skipped[b]) for b, x in enumerate(inputs)]


def logits_from_boundary(model, layer: int, states: list[torch.Tensor], offsets: list[tuple[int, int]]
                         ) -> torch.Tensor:
    """`logits_at_generated` from the boundary states of `boundary_states`: only decoder layers
    `layer`.. , the final norm and the head run (gradients flow into those only). [M, vocab]"""
    layers = decoder_layers(model)
    first = next(layers[layer].parameters())  # the trained layers' device and dtype (the states may be lower)
    width = max(len(s) for s in states)
    h = torch.zeros(len(states), width, states[0].shape[-1], dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(states), width, dtype=torch.long, device=first.device)
    for b, s in enumerate(states):
        h[b, : len(s)] = s
        mask[b, : len(s)] = 1
    base = model.base_model
    base.layers = torch.nn.ModuleList(list(layers)[layer:])  # the stack entered at `layer` (restored below)
    try:
        hidden = base(inputs_embeds=h, attention_mask=mask).last_hidden_state
    finally:
        base.layers = layers
    return _head_at(model, hidden, offsets)


def cast_from_boundary(model, layer: int) -> None:
    """For a model whose layers below `layer` (and embeddings) are in a lower dtype than the layers
    from `layer` up (a student sharing the serving draft's frozen part): each layer from `layer`
    up gets its floating inputs (hidden states, rotary cos/sin) cast to its own dtype, so the model
    still runs whole (student-sampled generation). A no-op where the dtypes agree."""
    for block in decoder_layers(model)[layer:]:
        block.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=next(block.parameters()).dtype),
                                        with_kwargs=True)


def _cast_inputs(module, args, kwargs, dtype):
    def cast(x):
        if torch.is_tensor(x):
            return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        return tuple(cast(y) for y in x) if isinstance(x, tuple) else x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _windows(seqs, window):
    inputs, offsets, skipped = [], [], []
    for tokens, start in seqs:
        T = len(tokens)
        lo = max(0, T - 1 - window)
        first = max(start, lo + 1)  # the first predicted position whose context starts in the window
        inputs.append(tokens[lo : T - 1].long())
        offsets.append((first - 1 - lo, T - first))  # (input index of the first kept row, kept rows)
        skipped.append(first - start)
    return inputs, offsets, skipped


def _right_padded(inputs, device):
    width = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    mask = torch.zeros(len(inputs), width, dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = x
        mask[b, : len(x)] = 1
    return ids.to(device), mask.to(device)


def _head_at(model, hidden, offsets):
    picked = torch.cat([hidden[b, i0 : i0 + n] for b, (i0, n) in enumerate(offsets)])  # [M, hidden]
    return model.get_output_embeddings()(picked).float()


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
