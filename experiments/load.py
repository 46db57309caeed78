"""Bounded load test of `onspec serve`: the same fixed set of requests from M concurrent clients
over loopback, once with the online trainer on and once off (--no-online), each against a fresh
server with a fresh state directory. With `--replicas 0,1,2` the same for plain `onspec serve` (0)
and for `onspec serve --replicas N` on Ray, taking turns (`--rounds` repeats the whole turn, so
drift on a shared machine falls on every setup alike); it adds the server's start-up time, the
peak memory of its whole process tree (Ray's processes included) and, on Ray, how long a published
draft version took to go live on a replica. Prints a table and, last, one JSON line. Not a timed test.

    .venv/bin/python experiments/load.py --requests 48 --concurrency 4 --max-tokens 64
    .venv/bin/python experiments/load.py --dataset humaneval --requests 164 --modes on \\
        --server-args "--learn draft --steps 8 --lr 1e-3" --screenshot docs/results/serve/dashboard.png
    .venv/bin/python experiments/load.py --replicas 0,1,2 --modes on --rounds 2 --requests 24 \\
        --max-tokens 32 --server-args "--target smollm2-135m --dtype float32"
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
    ap.add_argument("--replicas", default="0", help="setups, comma-separated: 0 = plain `onspec serve`, N = "
                    "`onspec serve --replicas N` on Ray")
    ap.add_argument("--rounds", type=int, default=1, help="run every setup and mode this many times, in turn")
    args = ap.parse_args()
    try:
        setups = [int(x) for x in args.replicas.split(",") if x.strip()]
    except ValueError:
        ap.error("--replicas takes comma-separated integers, e.g. 0,1,2")
    if not setups or any(n < 0 for n in setups) or args.rounds < 1:
        ap.error("--replicas needs integers >= 0 and --rounds >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        ap.error("--modes takes on, off or on,off")
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        ap.error("--requests, --concurrency and --max-tokens must be >= 1")
    try:
        queries = list(islice(iter_queries(args.dataset), args.skip, args.skip + args.requests))
    except ValueError as e:
        ap.error(str(e))
    console = Console(stderr=True, width=200)
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for replicas in setups:
            for mode in modes:
                key = _key(replicas, mode, setups)
                console.print(f"[bold]{key}[/] (round {r + 1}): starting a fresh server ...")
                with tempfile.TemporaryDirectory(prefix="onspec-load-") as state:
                    extra = shlex.split(args.server_args) + (["--no-online"] if mode == "off" else [])
                    extra += ["--replicas", str(replicas)] if replicas else []
                    with Server(Path(state), extra) as server:
                        result = run_load(server.url, queries, args.concurrency, args.max_tokens, console)
                        result.update(server.report())
                        if mode == "on" and args.screenshot:
                            screenshot(server.url + "/dashboard", Path(args.screenshot), console)
                runs.setdefault(key, []).append(result)
    results = {key: _mean(rs) for key, rs in runs.items()}
    table = Table(title=f"load: {args.requests} {args.dataset} requests, {args.concurrency} clients, "
                        f"max_tokens {args.max_tokens}, mean of {args.rounds} round(s)")
    for col in ("server", "requests/s", "p50 latency s", "p95 latency s", "tokens/s", "alpha", "draft version",
                "updates", "start s", "peak RSS GB", "delivered p50 s", "swap p50/p95 s"):
        table.add_column(col, justify="right")
    for key, r in results.items():
        swap, delivery = r.get("swap_latency_s") or {}, r.get("delivery_latency_s") or {}
        table.add_row(key, f"{r['requests_per_s']:.3f}", f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['alpha']:.3f}" if r["alpha"] is not None else "n/a",
                      str(r["draft_version"]), str((r["server"] or {}).get("updates", 0)), f"{r['startup_s']:.1f}",
                      f"{r['peak_rss_gb']:.2f}",
                      f"{delivery['p50']:.3f}" if delivery.get("p50") is not None else "-",
                      f"{swap['p50']:.3f}/{swap['p95']:.3f}" if swap.get("p50") is not None else "-")
    console.print(table)
    summary = {"dataset": args.dataset, "requests": args.requests, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "rounds": args.rounds, "server_args": args.server_args,
               "modes": {m: {k: v for k, v in r.items() if k != "server"} for m, r in results.items()},
               "runs": {m: [{k: v for k, v in r.items() if k != "server"} for r in rs] for m, rs in runs.items()}}
    if "on" in results and "off" in results:
        summary["tokens_per_s_ratio_on_vs_off"] = results["on"]["tokens_per_s"] / results["off"]["tokens_per_s"]
        summary["requests_per_s_ratio_on_vs_off"] = results["on"]["requests_per_s"] / results["off"]["requests_per_s"]
    for mode in modes:
        base = results.get(_key(0, mode, setups))
        if base is None:
            continue
        for replicas in setups:
            if replicas:
                other = results[_key(replicas, mode, setups)]
                summary[f"tokens_per_s_ratio_{_key(replicas, mode, setups)}_vs_plain"] = (
                    other["tokens_per_s"] / base["tokens_per_s"])
    print(json.dumps(summary))
    return 0


def _key(replicas: int, mode: str, setups: list[int]) -> str:
    """'on' / 'off' for plain serve alone (as before), else 'plain/on', 'r2/on', ..."""
    if setups == [0]:
        return mode
    return f"{'plain' if replicas == 0 else f'r{replicas}'}/{mode}"


def _mean(results: list[dict]) -> dict:
    """Means of the numbers over rounds; the last round's other fields."""
    out = dict(results[-1])
    for k, v in results[-1].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(r.get(k) is not None for r in results):
            out[k] = sum(r[k] for r in results) / len(results)
    return out


class Server:
    def __init__(self, state: Path, extra: list[str]) -> None:
        self.log = state / "server.log"
        cmd = [sys.executable, "-m", "onspec.cli", "serve", "--port", "0", "--state-dir", str(state / "state"), *extra]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        self.peak_rss = 0
        self._sampling = threading.Event()

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            self.peak_rss = max(self.peak_rss, tree_rss(self.proc.pid))
            m = re.search(r" on (http://[^ ]+:\d+)", self.log.read_text())
            if m:
                self.url = m.group(1)
                while httpx.get(self.url + "/health", timeout=30).status_code != 200:
                    time.sleep(0.2)
                self.startup_s = time.perf_counter() - self.started
                threading.Thread(target=self._sample, daemon=True).start()
                return self
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise SystemExit("the server did not start in 10 minutes")

    def _sample(self) -> None:
        while not self._sampling.wait(1.0):
            self.peak_rss = max(self.peak_rss, tree_rss(self.proc.pid))

    def report(self) -> dict:
        health = httpx.get(self.url + "/health", timeout=30).json()
        trainer = httpx.get(self.url + "/dashboard/data", timeout=30).json()["trainer"]
        return {"server": trainer,
                "trainer": {k: trainer.get(k) for k in ("requests", "updates", "rollbacks", "dropped_records",
                                                         "trainer_time_s")} if trainer else None,
                "draft_version": health["draft_version"], "startup_s": self.startup_s,
                "peak_rss_gb": max(self.peak_rss, tree_rss(self.proc.pid)) / 1e9,
                "swap_latency_s": health.get("cluster", {}).get("swap_latency_s"),
                "delivery_latency_s": health.get("cluster", {}).get("delivery_latency_s"),
                "replica_versions": {n: r["draft_version"] for n, r in health.get("replicas", {}).items()}}

    def __exit__(self, *exc) -> None:
        self._sampling.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Ray's raylet, workers and replicas
    are children of the process that started Ray), from /proc; 0 where /proc is not there."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError, ValueError):
            continue
    return total


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
