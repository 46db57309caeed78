"""Bounded load test of `onspec serve`: the same fixed set of requests from M concurrent clients
over loopback, once with the online trainer on and once off (--no-online), each against a fresh
server with a fresh state directory. Prints a table and, last, one JSON line. Not a timed test.

    .venv/bin/python benchmarks/load.py --requests 48 --concurrency 4 --max-tokens 64
    .venv/bin/python benchmarks/load.py --dataset humaneval --requests 164 --modes on \\
        --server-args "--adaptive-k --steps 8 --lr 1e-3" --screenshot docs/results/serve/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from onspec.data.streams import iter_queries

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="sharegpt", help="sharegpt | humaneval | a .jsonl file")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--requests", type=int, default=48, help="requests per mode")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent clients (M)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="on,off", help="trainer on and/or off, comma-separated")
    ap.add_argument("--server-args", default="", help="extra `onspec serve` flags (models, trainer, policy)")
    ap.add_argument("--screenshot", help="after the trainer-on run, save a headless-Chromium screenshot of /dashboard")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        ap.error("--modes takes on, off or on,off")
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        ap.error("--requests, --concurrency and --max-tokens must be >= 1")
    try:
        queries = list(islice(iter_queries(args.dataset), args.skip, args.skip + args.requests))
    except ValueError as e:
        ap.error(str(e))
    console = Console(stderr=True)
    results = {}
    for mode in modes:
        console.print(f"[bold]trainer {mode}[/]: starting a fresh server ...")
        with tempfile.TemporaryDirectory(prefix="onspec-load-") as state:
            extra = shlex.split(args.server_args) + (["--no-online"] if mode == "off" else [])
            with Server(Path(state), extra) as server:
                results[mode] = run_load(server.url, queries, args.concurrency, args.max_tokens, console)
                results[mode]["server"] = httpx.get(server.url + "/dashboard/data").json()["trainer"]
                results[mode]["draft_version"] = httpx.get(server.url + "/health").json()["draft_version"]
                if mode == "on" and args.screenshot:
                    screenshot(server.url + "/dashboard", Path(args.screenshot), console)
    table = Table(title=f"load: {args.requests} {args.dataset} requests, {args.concurrency} clients, "
                        f"max_tokens {args.max_tokens}")
    for col in ("trainer", "requests/s", "p50 latency s", "p95 latency s", "tokens/s", "alpha", "draft version",
                "updates"):
        table.add_column(col, justify="right")
    for mode, r in results.items():
        table.add_row(mode, f"{r['requests_per_s']:.3f}", f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['alpha']:.3f}" if r["alpha"] is not None else "n/a",
                      str(r["draft_version"]), str((r["server"] or {}).get("updates", 0)))
    console.print(table)
    summary = {"dataset": args.dataset, "requests": args.requests, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "modes": {m: {k: v for k, v in r.items() if k != "server"}
                                                        for m, r in results.items()}}
    if "on" in results and "off" in results:
        summary["tokens_per_s_ratio_on_vs_off"] = results["on"]["tokens_per_s"] / results["off"]["tokens_per_s"]
        summary["requests_per_s_ratio_on_vs_off"] = results["on"]["requests_per_s"] / results["off"]["requests_per_s"]
    print(json.dumps(summary))
    return 0


class Server:
    def __init__(self, state: Path, extra: list[str]) -> None:
        self.log = state / "server.log"
        cmd = [sys.executable, "-m", "onspec.cli", "serve", "--port", "0", "--state-dir", str(state / "state"), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            m = re.search(r" on (http://[^ ]+:\d+)", self.log.read_text())
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise SystemExit("the server did not start in 10 minutes")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_load(url: str, queries, concurrency: int, max_tokens: int, console: Console) -> dict:
    todo = list(enumerate(queries))
    lock = threading.Lock()
    latencies, tokens, accepted, evaluated, errors = [], 0, 0, 0, []

    def client() -> None:
        nonlocal tokens, accepted, evaluated
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    _, q = todo.pop(0)
                if q.messages is not None:
                    path, body = "/v1/chat/completions", {"messages": list(q.messages)}
                else:
                    path, body = "/v1/completions", {"prompt": q.text}
                body.update(max_tokens=max_tokens, temperature=0)
                t0 = time.perf_counter()
                r = http.post(path, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    out = r.json()
                    latencies.append(dt)
                    tokens += out["usage"]["completion_tokens"]
                    accepted += out["onspec"]["accepted_tokens"]
                    evaluated += out["onspec"]["evaluated_tokens"]
                    done = len(latencies)
                if done % max(1, len(queries) // 10) == 0:
                    console.print(f"  {done}/{len(queries)} requests")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        console.print(f"[red]{len(errors)} requests failed[/], e.g. {errors[0]}")
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
    return {"completed": len(lat), "failed": len(errors), "wall_s": wall, "requests_per_s": len(lat) / wall,
            "latency_p50_s": statistics.median(lat) if lat else 0.0, "latency_p95_s": q[18] if lat else 0.0,
            "tokens": tokens, "tokens_per_s": tokens / wall, "alpha": accepted / evaluated if evaluated else None}


def screenshot(url: str, out: Path, console: Console) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        console.print("[yellow]no chromium: no screenshot[/]")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                        "--window-size=1200,1100", f"--screenshot={out.resolve()}", url],
                       capture_output=True, timeout=120, cwd=os.getcwd())
    console.print(f"dashboard screenshot: {out}")


if __name__ == "__main__":
    sys.exit(main())
