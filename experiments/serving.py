"""Serving benchmark of `onspec serve` under sustained mixed load (issue 41): a fresh server, N
concurrent clients sending short chat requests (streaming and not) for T minutes, while a long
prompt (`--long-ids` token ids) joins every `--long-every` seconds. Short and long requests are
reported apart: completed, errors (non-2xx, an error event, or past `--timeout`), requests still
running when the run ended (`unfinished`, not errors), throughput, and TTFT, TPOT, ITL and
end-to-end latency (E2EL) percentiles, under the names vLLM's benchmark_serving gives them; plus
the RSS of the server's whole process tree sampled every few seconds (start, minute 1, end, peak,
and the growth from minute 1 to the end). `--modes long,none` runs with and without the long
prompt, each on a fresh server, alternating for `--rounds`. Prints tables and, last, one JSON line.

Client-side definitions (vLLM's benchmark_serving): TTFT = request sent to the first streamed
chunk with text; ITL = gap between successive chunks with text (a chunk carries one verify step's
tokens, so one to k + 1 tokens); TPOT = (E2EL - TTFT) / (output tokens - 1). Non-streaming
requests have E2EL only. Not a timed test.

    .venv/bin/python experiments/serving.py --server-args "--target smollm2-135m --dtype float32" \\
        --clients 8 --minutes 4 --max-tokens 32 --long-ids 8000 --long-every 30 --modes long,none
    .venv/bin/python experiments/serving.py --minutes 1 --no-long      # the default pair, short requests only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Server, tree_rss  # noqa: E402  (the fresh-server and process-tree RSS helpers of the load benchmark)

CHATS = ["Write a haiku about the sea.", "Explain recursion briefly.", "What is the capital of France?",
         "Give me three names for a cat.", "How do I reverse a list in Python?", "Summarise the plot of Hamlet.",
         "What does HTTP 404 mean?", "Suggest a name for a bakery."]
LONG_IDS = (33, 94)
"""Long prompts are token ids drawn from [33, 94): printable ASCII characters in the tiny test
models', SmolLM2's and Qwen2.5's byte-level vocabularies (no special tokens, and text that decodes:
ids of lone non-ASCII bytes made the answer's text wait for the end, and the client's TTFT with it)."""
PERCENTILES = (50, 90, 99)
RSS_EVERY_S = 5.0
SERVER_HISTOGRAMS = ("time_to_first_token", "inter_token_latency", "e2e_request_latency")


@dataclass
class Result:
    """One request, as the client saw it."""

    kind: str  # "short" or "long"
    stream: bool
    sent: float
    ok: bool = False
    error: str | None = None
    unfinished: bool = False
    ttft: float | None = None
    e2el: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server-args", default="", help="`onspec serve` flags (models, dtype, ...); empty: its defaults")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients sending short requests (N)")
    ap.add_argument("--minutes", type=float, default=4.0, help="how long clients send requests (T)")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens of a short request (EOS ignored)")
    ap.add_argument("--streaming", type=float, default=1.0, help="share of short requests that stream (0 to 1)")
    ap.add_argument("--long-ids", type=int, default=8000, help="prompt length, in token ids, of a long request")
    ap.add_argument("--long-every", type=float, default=30.0, help="seconds between long requests (S); the first "
                    "joins at the start")
    ap.add_argument("--long-max-tokens", type=int, default=16, help="output tokens of a long request")
    ap.add_argument("--modes", default="long", help="comma-separated: long (short requests plus the long prompt), "
                    "none (short requests only)")
    ap.add_argument("--no-long", action="store_true", help="the same as --modes none")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode this many times, taking turns")
    ap.add_argument("--timeout", type=float, default=300.0, help="a request not done in this many seconds is an error")
    ap.add_argument("--drain", type=float, default=120.0, help="after T, seconds to let requests in flight finish; "
                    "those still running then are cut and counted as unfinished")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    modes = ["none"] if args.no_long else [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("long", "none") for m in modes):
        ap.error("--modes takes long, none or long,none")
    if args.clients < 1 or args.minutes <= 0 or args.max_tokens < 1 or args.long_ids < 1 or args.long_every <= 0:
        ap.error("--clients, --minutes, --max-tokens, --long-ids and --long-every must be positive")
    if not 0 <= args.streaming <= 1 or args.rounds < 1 or args.timeout <= 0 or args.drain < 0:
        ap.error("--streaming must be in [0, 1], --rounds >= 1, --timeout > 0, --drain >= 0")
    console = Console(stderr=True, width=200)
    runs = []
    for r in range(args.rounds):
        for mode in modes:
            console.print(f"[bold]{mode}[/] (round {r + 1}/{args.rounds}): starting a fresh server ...")
            runs.append({"mode": mode, "round": r + 1, **run(args, mode, console)})
    out = Console(file=sys.stdout, width=200)
    out.print(_latency_table(args, runs))
    out.print(_rss_table(runs))
    print(json.dumps({"bench": "serving", "host": host(), "args": vars(args), "runs": runs}))
    return 0


def run(args, mode: str, console: Console) -> dict:
    """One mode against a fresh server: the load, then the server's RSS samples."""
    with tempfile.TemporaryDirectory(prefix="onspec-serving-") as state:
        with Server(Path(state), shlex.split(args.server_args)) as server:
            started = time.perf_counter()
            results, rss, duration = asyncio.run(_load(server.url, server.proc.pid, args, mode, console))
            histograms = server_histograms(httpx.get(server.url + "/metrics", timeout=60).text)
    return {"startup_s": server.startup_s, "duration_s": duration,
            "short": summarise([r for r in results if r.kind == "short"], duration),
            "long": summarise([r for r in results if r.kind == "long"], duration) if mode == "long" else None,
            "rss": rss_summary(rss), "server": histograms, "wall_s": time.perf_counter() - started}


async def _load(url: str, pid: int, args, mode: str, console: Console) -> tuple[list[Result], list, float]:
    results: list[Result] = []
    rss: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    deadline = t0 + args.minutes * 60
    stop = asyncio.Event()

    async def sample() -> None:
        while True:
            rss.append((time.perf_counter() - t0, tree_rss(pid)))
            try:
                await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
                return
            except asyncio.TimeoutError:
                pass

    async def short_client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(args.seed * 1000 + i)
        while time.perf_counter() < deadline:
            stream = rng.random() < args.streaming
            body = {"messages": [{"role": "user", "content": rng.choice(CHATS)}], "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            await _send(http, "/v1/chat/completions", body, Result("short", stream, time.perf_counter()), args,
                        results)

    async def long_prompts(http: httpx.AsyncClient) -> None:
        rng, tasks, n = random.Random(args.seed), [], 0
        while (at := t0 + n * args.long_every) < deadline:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            ids = [rng.randrange(*LONG_IDS) for _ in range(args.long_ids)]
            body = {"prompt": ids, "max_tokens": args.long_max_tokens, "temperature": 0, "ignore_eos": True}
            tasks.append(asyncio.create_task(_send(http, "/v1/completions", body,
                                                   Result("long", True, time.perf_counter()), args, results)))
            console.print(f"  {time.perf_counter() - t0:5.0f} s: long prompt {n + 1} joins "
                          f"({sum(r.ok for r in results)} requests done so far)")
            n += 1
        await asyncio.gather(*tasks)

    limits = httpx.Limits(max_connections=args.clients + 64, max_keepalive_connections=args.clients + 64)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
        sampler = asyncio.create_task(sample())
        work = [asyncio.create_task(short_client(i, http)) for i in range(args.clients)]
        if mode == "long":
            work.append(asyncio.create_task(long_prompts(http)))
        done, pending = await asyncio.wait(work, timeout=max(0.0, deadline - time.perf_counter()) + args.drain)
        for task in pending:  # past the drain: cut what is still running (its Result is marked unfinished)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the client surfaces here
        duration = time.perf_counter() - t0
        stop.set()
        await sampler
    rss.append((time.perf_counter() - t0, tree_rss(pid)))
    return results, rss, duration


async def _send(http: httpx.AsyncClient, path: str, body: dict, r: Result, args, results: list[Result]) -> None:
    """One request, timed; its Result goes to `results` however it ends."""
    results.append(r)
    try:
        await asyncio.wait_for(_request(http, path, body, r), args.timeout)
    except asyncio.TimeoutError:
        r.error = f"timeout after {args.timeout:g} s"
    except asyncio.CancelledError:
        r.unfinished = True
        raise
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    else:
        r.ok = r.error is None
        r.e2el = time.perf_counter() - r.sent


async def _request(http: httpx.AsyncClient, path: str, body: dict, r: Result) -> None:
    if not r.stream:
        resp = await http.post(path, json=body)
        if resp.status_code // 100 != 2:
            r.error = f"{resp.status_code}: {resp.text[:200]}"
            return
        r.output_tokens = resp.json()["usage"]["completion_tokens"]
        return
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    last = None
    async with http.stream("POST", path, json=body) as resp:
        if resp.status_code // 100 != 2:
            r.error = f"{resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                r.error = f"error event: {event['error'].get('message', '')[:200]}"
                return
            if event.get("usage"):
                r.output_tokens = event["usage"]["completion_tokens"]
            choice = (event.get("choices") or [{}])[0]
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                now = time.perf_counter()
                if last is None:
                    r.ttft = now - r.sent
                else:
                    r.itl.append(now - last)
                last = now


def summarise(results: list[Result], duration: float) -> dict:
    """The figures of one class of requests, named as vLLM's benchmark_serving names them (ms)."""
    ok = [r for r in results if r.ok]
    out = {"completed": len(ok), "errors": sum(r.error is not None for r in results),
           "unfinished": sum(r.unfinished for r in results), "streaming": sum(r.stream for r in ok),
           "error_examples": sorted({r.error for r in results if r.error})[:3],
           "total_output_tokens": sum(r.output_tokens for r in ok),
           "request_throughput": len(ok) / duration, "output_throughput": sum(r.output_tokens for r in ok) / duration}
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    for name, values in (("ttft", [r.ttft for r in ok if r.ttft is not None]), ("tpot", tpot),
                         ("itl", [x for r in ok for x in r.itl]), ("e2el", [r.e2el for r in ok])):
        out[f"mean_{name}_ms"] = float(np.mean(values)) * 1000 if values else None
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = float(np.percentile(values, p)) * 1000 if values else None
    return out


def server_histograms(text: str) -> dict:
    """The server's own latency histograms (/metrics, short and long requests together): count and
    mean of each, in ms. Its TTFT starts when the request is queued (after tokenising) and its ITL
    divides a step's gap among the tokens it delivered, so it reads lower than the client's."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    out = {}
    for name in SERVER_HISTOGRAMS:
        count, total = values.get(f"onspec:{name}_seconds_count"), values.get(f"onspec:{name}_seconds_sum")
        out[name] = {"count": count, "mean_ms": 1000 * total / count if count else None}
    return out


def rss_summary(samples: list[tuple[float, int]]) -> dict:
    """RSS of the server's process tree: at the start of the load, at minute 1 (the first sample at or
    after 60 s; None in a shorter run), at the end, its peak, and the growth from minute 1 to the end."""
    minute1 = next((b for t, b in samples if t >= 60), None)
    end = samples[-1][1]
    return {"start_gb": samples[0][1] / 1e9, "minute1_gb": minute1 / 1e9 if minute1 else None, "end_gb": end / 1e9,
            "peak_gb": max(b for _, b in samples) / 1e9,
            "growth_minute1_to_end_pct": 100 * (end - minute1) / minute1 if minute1 else None,
            "samples": [[round(t, 1), round(b / 1e9, 3)] for t, b in samples]}


def host() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "vector": sorted(flags & {"avx2", "avx512_vnni", "avx512_bf16"})}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.2f}"


def _latency_table(args, runs: list[dict]) -> Table:
    table = Table(title=f"serving: {args.clients} clients x {args.minutes:g} min, short = chat {args.max_tokens} tokens "
                        f"({args.streaming:.0%} streaming), long = {args.long_ids} ids every {args.long_every:g} s; "
                        f"latencies in s (p50/p90/p99)")
    for col in ("mode", "requests", "completed", "errors", "unfinished", "req/s", "out tok/s", "TTFT", "TPOT",
                "ITL", "E2EL"):
        table.add_column(col, justify="right")
    for run in runs:
        for kind in ("short", "long"):
            s = run[kind]
            if s is None:
                continue
            cells = ["/".join(_ms(s[f"p{p}_{name}_ms"]) for p in PERCENTILES) for name in ("ttft", "tpot", "itl", "e2el")]
            table.add_row(f"{run['mode']} #{run['round']}", kind, str(s["completed"]), str(s["errors"]),
                          str(s["unfinished"]), f"{s['request_throughput']:.3f}", f"{s['output_throughput']:.1f}", *cells)
    return table


def _rss_table(runs: list[dict]) -> Table:
    table = Table(title="server RSS, whole process tree (GB)")
    for col in ("mode", "start", "minute 1", "end", "peak", "growth minute 1 -> end"):
        table.add_column(col, justify="right")
    for run in runs:
        m = run["rss"]
        growth = m["growth_minute1_to_end_pct"]
        table.add_row(f"{run['mode']} #{run['round']}", f"{m['start_gb']:.2f}",
                      "-" if m["minute1_gb"] is None else f"{m['minute1_gb']:.2f}", f"{m['end_gb']:.2f}",
                      f"{m['peak_gb']:.2f}", "-" if growth is None else f"{growth:+.0f}%")
    return table


if __name__ == "__main__":
    sys.exit(main())
