"""Bounded soak of `onspec serve`: mixed traffic for a fixed time against one fresh server whose
trainer updates the draft every few requests. Clients pick at random: greedy non-streaming and
streaming requests (each compared with the same prompt's output served alone, before the soak),
streams the client abandons after a few chunks, sampling requests, and bad requests (which must be
4xx with an OpenAI-shaped body). Reports every status seen, 5xx (must be 0), greedy mismatches
(must be 0 in float32), the draft versions served, and the resident memory of the server's process
tree sampled every `--sample-every` s: at the start, minute 1 and the end, and its trend (the
least-squares slope over the soak's second half, MB per 10 minutes). Prints a table and, last, one
JSON line.

    .venv/bin/python experiments/soak.py --seconds 300
    .venv/bin/python experiments/soak.py --seconds 1800      # issue 41's 30-minute soak
    .venv/bin/python experiments/soak.py --seconds 60 --server-args "--target DIR --draft DIR --dtype float32"
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Server, tree_rss  # noqa: E402  (the fresh-server and process-tree RSS helpers of the load benchmark)

PROMPTS = ["def fibonacci(n):", "The capital of France is", "Write a haiku about the sea.", "import numpy as np\n",
           "SELECT name FROM users WHERE", "Once upon a time", "for i in range(10):", "Explain recursion briefly."]
BAD = [{"prompt": "x", "max_tokens": -1}, {"prompt": "x", "temperature": "hot"}, {"prompt": ""},
       {"prompt": "x", "top_p": 0}, {"messages": "not a list"}, {"prompt": "x", "seed": 2**70}]
KINDS = ("greedy", "stream", "abandon", "sample", "bad")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--server-args", default="--target smollm2-135m --dtype float32 --learn both --update-interval 4 "
                    "--steps 1", help="`onspec serve` flags (float32: greedy outputs must match exactly; --learn both: "
                    "the suffix learner and the draft's trainer learn, the draft is swapped every few requests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-every", type=float, default=30, help="seconds between RSS samples")
    args = ap.parse_args()
    if args.seconds <= 0 or args.concurrency < 1 or args.max_tokens < 1 or args.sample_every <= 0:
        ap.error("--seconds, --concurrency, --max-tokens and --sample-every must be positive")
    result = soak(shlex.split(args.server_args), args.seconds, args.concurrency, args.max_tokens, args.seed,
                  Console(stderr=True), args.sample_every)
    table = Table(title=f"soak: {args.seconds:.0f} s, {args.concurrency} clients, max_tokens {args.max_tokens}")
    for col in ("requests", "by kind", "statuses", "5xx", "greedy compared", "greedy mismatches", "draft versions",
                "RSS start MB", "RSS minute 1 MB", "RSS end MB", "RSS trend, second half, MB / 10 min"):
        table.add_column(col, justify="right")
    table.add_row(str(result["requests"]), ", ".join(f"{k} {v}" for k, v in result["kinds"].items()),
                  ", ".join(f"{k}: {v}" for k, v in result["statuses"].items()), str(result["server_errors"]),
                  str(result["greedy_compared"]), str(result["greedy_mismatches"]),
                  f"{min(result['draft_versions'], default=0)}..{max(result['draft_versions'], default=0)}",
                  f"{result['rss_start_mb']:.0f}", _mb(result["rss_minute1_mb"]), f"{result['rss_end_mb']:.0f}",
                  _mb(result["rss_trend_mb_per_10min"]))
    Console(file=sys.stdout, width=160).print(table)
    print(json.dumps(result))
    return 0 if result["server_errors"] == 0 and result["greedy_mismatches"] == 0 and result["bad_not_4xx"] == 0 else 1


def soak(server_args: list[str], seconds: float, concurrency: int, max_tokens: int, seed: int = 0,
         console: Console | None = None, sample_every: float = 30) -> dict:
    console = console or Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="onspec-soak-") as state, Server(Path(state), server_args) as server:
        pid = server.proc.pid
        with httpx.Client(base_url=server.url, timeout=600) as http:
            reference = {}
            for p in PROMPTS:  # each prompt served alone: what every greedy answer must equal
                r = http.post("/v1/completions", json={"prompt": p, "max_tokens": max_tokens, "temperature": 0})
                r.raise_for_status()
                reference[p] = r.json()["choices"][0]["text"]
        console.print(f"soaking {server.url} for {seconds:.0f} s with {concurrency} clients ...")
        stats = _Stats()
        t0 = time.monotonic()
        deadline = t0 + seconds
        threads = [threading.Thread(target=_client, args=(server.url, reference, max_tokens, deadline, stats,
                                                          random.Random(seed + i))) for i in range(concurrency)]
        for t in threads:
            t.start()
        rss, next_at = [(0.0, tree_rss(pid) / 2**20)], sample_every
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            if (now := time.monotonic() - t0) >= next_at:
                rss.append((now, tree_rss(pid) / 2**20))
                next_at += sample_every
                if len(rss) % 10 == 0:
                    console.print(f"  {now:5.0f} s: {sum(stats.kinds.values())} requests, RSS {rss[-1][1]:.0f} MB")
        rss.append((time.monotonic() - t0, tree_rss(pid) / 2**20))
        for t in threads:
            t.join()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            health = http.get("/health").json()
            trainer = (http.get("/dashboard/data").json() or {}).get("trainer") or {}
    return {"seconds": seconds, "concurrency": concurrency, "requests": sum(stats.kinds.values()),
            "kinds": dict(stats.kinds), "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
            "server_errors": sum(v for k, v in stats.statuses.items() if k >= 500),
            "bad_not_4xx": stats.bad_not_4xx, "greedy_compared": stats.compared,
            "greedy_mismatches": len(stats.mismatches), "mismatch_examples": stats.mismatches[:3],
            "errors": stats.errors[:5], "draft_versions": sorted(stats.versions),
            "final_draft_version": health.get("draft_version"), "trainer_updates": trainer.get("updates"),
            **rss_trend(rss)}


def rss_trend(samples: list[tuple[float, float]]) -> dict:
    """RSS samples (seconds, MB) summed up: start, minute 1 (None in a shorter soak), end, peak, and
    the least-squares slope over the second half in MB per 10 minutes (None with under 3 samples there)."""
    minute1 = next((mb for t, mb in samples if t >= 60), None)
    half = [(t, mb) for t, mb in samples if t >= samples[-1][0] / 2]
    slope = None
    if len(half) >= 3:
        mt, mm = sum(t for t, _ in half) / len(half), sum(mb for _, mb in half) / len(half)
        var = sum((t - mt) ** 2 for t, _ in half)
        slope = 600 * sum((t - mt) * (mb - mm) for t, mb in half) / var if var else None
    return {"rss_start_mb": samples[0][1], "rss_minute1_mb": minute1, "rss_end_mb": samples[-1][1],
            "rss_peak_mb": max(mb for _, mb in samples), "rss_trend_mb_per_10min": slope,
            "rss_samples": [[round(t, 1), round(mb, 1)] for t, mb in samples]}


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kinds: Counter = Counter()
        self.statuses: Counter = Counter()
        self.compared = 0
        self.mismatches: list[dict] = []
        self.errors: list[str] = []
        self.versions: set[int] = set()
        self.bad_not_4xx = 0

    def note(self, kind: str, status: int, error: str | None = None) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[status] += 1
            if error is not None or status >= 500:
                self.errors.append(f"{kind} {status}: {error}")


def _client(url: str, reference: dict, max_tokens: int, deadline: float, stats: _Stats, rng: random.Random) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        while time.monotonic() < deadline:
            kind = rng.choice(KINDS)
            prompt = rng.choice(PROMPTS)
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            try:
                if kind == "greedy":
                    r = http.post("/v1/completions", json=body)
                    stats.note(kind, r.status_code, None if r.status_code == 200 else r.text[:200])
                    if r.status_code == 200:
                        _compare(stats, prompt, r.json()["choices"][0]["text"], reference, r.json())
                elif kind in ("stream", "abandon"):
                    text, chunks = "", 0
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        status = r.status_code
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                status = 500
                                break
                            text += event["choices"][0]["text"]
                            chunks += 1
                            if kind == "abandon" and chunks >= 2:
                                break  # the client goes away mid-stream
                    stats.note(kind, status)
                    if kind == "stream" and status == 200:
                        _compare(stats, prompt, text, reference, None)
                elif kind == "sample":
                    r = http.post("/v1/completions", json={**body, "temperature": 0.8, "seed": rng.randrange(2**31)})
                    stats.note(kind, r.status_code, None if r.status_code == 200 else r.text[:200])
                else:
                    r = http.post("/v1/completions", json=rng.choice(BAD))
                    ok = 400 <= r.status_code < 500 and {"message", "type", "param", "code"} <= set(
                        r.json().get("error", {}))
                    stats.note(kind, r.status_code)
                    if not ok:
                        with stats.lock:
                            stats.bad_not_4xx += 1
            except httpx.HTTPError as e:
                stats.note(kind, 599, f"{type(e).__name__}: {e}")


def _compare(stats: _Stats, prompt: str, text: str, reference: dict, body: dict | None) -> None:
    with stats.lock:
        stats.compared += 1
        if body is not None and "onspec" in body:
            stats.versions.update(body["onspec"].get("draft_versions") or [])
        if text != reference[prompt]:
            stats.mismatches.append({"prompt": prompt, "got": text, "alone": reference[prompt]})


if __name__ == "__main__":
    sys.exit(main())
