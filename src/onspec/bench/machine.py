"""What the machine allows: memory read bandwidth, and the decode speed it implies."""

from __future__ import annotations

import time

import torch


def memory_read_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s for streaming a buffer much larger than the caches (best of `repeats` reductions)."""
    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied weights counted once),
    but not the input embedding table where the head has its own copy (a step gathers a row or a
    few from the table; an untied or packed head is read whole)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is not None and head is not None and not any(t is embedding.weight for t in
                                                              [*head.parameters(), *head.buffers()]):
        seen.add(embedding.weight.data_ptr())  # counted as read already: skipped
    for p in [*model.parameters(), *model.buffers()]:  # packed / int8 weights are buffers
        key = p.data_ptr() if p.layout == torch.strided else id(p)  # oneDNN-packed tensors have no data pointer
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def speedup_model(alpha: float, k: int, c: float) -> float:
    """Expected speedup of speculative decoding (README "What the figures mean"): tokens per target pass over the
    relative cost of a step, (1 - alpha^(k+1)) / ((1 - alpha) * (k*c + 1))."""
    if k == 0:
        return 1.0
    tokens = (k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + 1)


def verify_cost_curve(model: torch.nn.Module, prompt: list[int], ns, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one cached forward pass over n positions (the last committed token and
    n - 1 proposals) after `prompt`, for each n: the T(n) the adaptive-k policy prices."""
    from onspec.engine.runner import ModelRunner
    from onspec.models.decode import decode_forward

    device = next(model.parameters()).device
    runner = ModelRunner(model, 1, decode_forward(model))  # as the engine runs it
    runner.prefill([prompt])
    curve = {}
    for n in ns:
        times = []
        for _ in range(repeats + 1):  # the first run of each n warms up
            extra = torch.full((1, n - 1), prompt[-1], dtype=torch.long, device=device) if n > 1 else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            runner.feed(extra)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            runner.accept([0], [[prompt[-1]]])  # roll the proposals back; one token stays pending
        curve[str(n)] = sorted(times[1:])[len(times[1:]) // 2]
    return curve
