"""`onspec serve --replicas N` on a local Ray (each fixture starts and stops its own Ray): two
replicas serve what one process serves, a new draft version reaches both, a killed replica comes
back at the latest version, a killed trainer restarts from its checkpoint with no 5xx meanwhile,
and a bad version is rolled back on every replica. Tiny float32 models, loopback only."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster needs the [ray] extra (scripts/setup.sh installs it)")

from conftest import save_tiny_pair  # noqa: E402
from onspec.cluster.config import ClusterConfig  # noqa: E402
from onspec.cluster.launch import start_cluster  # noqa: E402
from onspec.data.streams import Query  # noqa: E402
from onspec.engine.build import make_engine  # noqa: E402
from onspec.engine.engine import EngineConfig, Request  # noqa: E402
from onspec.engine.policy import PolicyConfig  # noqa: E402
from onspec.engine.sampling import SamplingParams  # noqa: E402
from onspec.models.pair import ModelConfig, load_pair  # noqa: E402
from onspec.online.distiller import TrainerConfig  # noqa: E402
from onspec.serve.config import ServerConfig  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.server]

PROMPTS = ["hello world", "the quick brown fox", "def f(x):", "a", "once upon a time", "SELECT * FROM", "1 2 3",
           "import numpy as np"]
N = 16


def start(models, state_dir, trainer: TrainerConfig, replicas: int = 2, **cluster):
    target, draft = models
    model_cfg = ModelConfig(target=str(target), draft=str(draft), dtype="float32")
    return start_cluster(model_cfg, EngineConfig(k=3), PolicyConfig(fixed_k=True), trainer,
                         ServerConfig(port=0, state_dir=str(state_dir), max_batch=4, learn="both"),
                         ClusterConfig(replicas=replicas, replica_threads=1, **cluster))


def complete(url: str, prompt: str, n: int = N) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})


def health(url: str) -> dict:
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(what, timeout: float = 90.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what.__doc__ or what}")


def live_replicas(url: str) -> dict:
    return {name: r for name, r in health(url)["replicas"].items() if not r["stale"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="class")
def cluster(models, tmp_path_factory):
    # no probe (every update accepted): versions move on every other request
    trainer = TrainerConfig(update_interval=2, steps=1, batch_size=2, checkpoint_every=1, probe_every=10_000)
    c = start(models, tmp_path_factory.mktemp("state") / "main", trainer, rollback_min_tokens=48)
    yield c
    c.close()


class TestOneCluster:
    """Two replicas and a trainer shared by these tests (one Ray, started once)."""

    def test_two_replicas_equal_one_process(self, cluster, models):
        target, draft = models
        t, d = load_pair(ModelConfig(target=str(target), draft=str(draft), dtype="float32"))
        engine = make_engine(t.model, t.tokenizer, d.model, EngineConfig(k=3), PolicyConfig(fixed_k=True))
        expected = {p: engine.generate([Request(Query("t", "t", text=p).encode(t.tokenizer),
                                                SamplingParams(max_new_tokens=N, ignore_eos=True))])[0].text
                    for p in PROMPTS}
        with ThreadPoolExecutor(4) as pool:  # concurrent, so Serve spreads them over both replicas
            got = list(zip(PROMPTS * 2, pool.map(lambda p: complete(cluster.url, p), PROMPTS * 2)))
        for p, r in got:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected[p], p

        def tokens_by_replica():
            """/metrics counting every token (the other replica's series are up to a report old)"""
            metrics = httpx.get(cluster.url + "/metrics", timeout=30).text
            served = {line.split('replica="')[1].split('"')[0]: float(line.split()[-1])
                      for line in metrics.splitlines() if line.startswith("onspec:generation_tokens_total{")}
            return served if served.get("all") == len(PROMPTS) * 2 * N else None

        served = wait_for(tokens_by_replica, timeout=30)
        del served["all"]
        assert len(served) == 2 and all(v > 0 for v in served.values()), served  # both replicas served


    def test_an_update_reaches_both_replicas(self, cluster):
        for p in PROMPTS[:4]:
            assert complete(cluster.url, p).status_code == 200
        latest = wait_for(lambda: cluster.state()["version"])
        assert latest >= 1

        def both_at_latest():
            """both replicas at the hub's latest version"""
            h = health(cluster.url)
            versions = {r["draft_version"] for r in live_replicas(cluster.url).values()}
            return len(live_replicas(cluster.url)) == 2 and versions == {h["cluster"]["version"]}

        wait_for(both_at_latest)
        dashboard = httpx.get(cluster.url + "/dashboard/data", timeout=30).json()
        assert dashboard["trainer"]["updates"] >= 1 and dashboard["updates"]  # the remote trainer's stats and history
        lat = cluster.state()["swap_latency_s"]
        assert lat["n"] >= 2 and 0 <= lat["p50"] <= lat["max"] < 30


    def test_a_killed_replica_comes_back_at_the_latest_version(self, cluster):
        before = live_replicas(cluster.url)
        victim, info = sorted(before.items())[0]
        os.kill(info["pid"], signal.SIGKILL)
        for p in PROMPTS[:4]:  # the trainer moves on while the replica is down
            r = complete(cluster.url, p)
            assert r.status_code in (200, 500, 503), r.text  # a request routed to the dead replica may fail

        def replaced():
            """a new replica, at the latest version"""
            state = cluster.state()
            fresh = {n: r for n, r in live_replicas(cluster.url).items() if n not in before}
            return fresh and all(r["draft_version"] == state["version"] for r in fresh.values())

        wait_for(replaced, timeout=180)


def test_a_bad_version_is_rolled_back_on_every_replica(models, tmp_path):
    # no updates of its own (the interval is never reached): the only new version is the bad one
    trainer = TrainerConfig(update_interval=10_000, checkpoint_every=1)
    cluster = start(models, tmp_path / "state", trainer, rollback_min_tokens=48)
    try:
        _rolled_back_everywhere(cluster)
    finally:
        cluster.close()


def _rolled_back_everywhere(cluster) -> None:
    for p in PROMPTS:  # the starting draft's live alpha
        assert complete(cluster.url, p).status_code == 200
    good = cluster.state()["version"]
    ray.get(cluster.trainer.inject_bad_update.remote(scale=8.0))
    bad = cluster.state()["version"]
    assert bad > good

    def rolled_back():
        """the hub rolled the bad version back"""
        for p in PROMPTS[:2]:
            complete(cluster.url, p)
        return cluster.state()["rollbacks"]

    rollback = wait_for(rolled_back, timeout=180, every=0)[-1]
    assert rollback["from_version"] == bad and rollback["alpha"] < rollback["good_alpha"]

    def everyone_back():
        """every replica and the trainer back on the good version"""
        to = rollback["to_version"]
        return (all(r["draft_version"] == to for r in live_replicas(cluster.url).values())
                and ray.get(cluster.trainer.stats.remote())["draft_version"] == to)

    wait_for(everyone_back)


def test_a_killed_trainer_restarts_from_its_checkpoint_and_serving_never_fails(models, tmp_path):
    # many optimizer steps per update, so the update is long enough to be killed in the middle
    # (every position trained: a draft that already agrees with the target still moves)
    trainer = TrainerConfig(update_interval=2, steps=300, batch_size=2, checkpoint_every=1, probe_every=10_000,
                            positions="all")
    c = start(models, tmp_path / "state", trainer, replicas=1)
    try:
        statuses: list[int] = []
        stop = threading.Event()

        def traffic():
            i = 0
            while not stop.is_set():
                statuses.append(complete(c.url, PROMPTS[i % len(PROMPTS)], 8).status_code)
                i += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        first = wait_for(lambda: ray.get(c.trainer.stats.remote()), timeout=30)
        wait_for(lambda: c.state()["version"], timeout=120)  # a first version published and checkpointed
        killed = wait_for(lambda: (s := ray.get(c.trainer.stats.remote()))["updating"] and s, timeout=120, every=0.05)
        os.kill(killed["pid"], signal.SIGKILL)
        served_version = c.state()["version"]

        def restarted():
            """the trainer back, in a new process"""
            try:
                s = ray.get(c.trainer.stats.remote(), timeout=5)
            except Exception:
                return None
            return s["pid"] != killed["pid"] and s

        after = wait_for(restarted, timeout=120)
        assert first["pid"] != after["pid"] and after["draft_version"] == served_version  # resumed, nothing lost
        wait_for(lambda: c.state()["version"] > served_version, timeout=180)  # and learning goes on
        stop.set()
        thread.join()
        assert statuses and set(statuses) == {200}, statuses
    finally:
        stop.set()
        c.close()


def test_a_version_reaches_replicas_on_two_nodes(models, tmp_path):
    """A simulated second node (ray.cluster_utils.Cluster: two raylets on this machine): one
    replica per node, and a published version goes live on both."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    try:
        ray.init(address=nodes.address, namespace="onspec", include_dashboard=False)
        trainer = TrainerConfig(update_interval=2, steps=1, batch_size=2, checkpoint_every=1, probe_every=10_000)
        c = start(models, tmp_path / "state", trainer, max_replicas_per_node=1)
        try:
            replicas = wait_for(lambda: len(live_replicas(c.url)) == 2 and live_replicas(c.url))
            assert len({r["node"] for r in replicas.values()}) == 2, replicas  # one per node
            for p in PROMPTS[:4]:
                assert complete(c.url, p).status_code == 200
            latest = wait_for(lambda: c.state()["version"])
            wait_for(lambda: {r["draft_version"] for r in live_replicas(c.url).values()} == {c.state()["version"]})
            assert c.state()["version"] >= latest
        finally:
            c.close()
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_onspec_serve_replicas_command_starts_serves_and_stops_cleanly(models, tmp_path):
    """The CLI path: `onspec serve --replicas 1` prints its address, serves, and on SIGTERM drains,
    stops Ray and exits 0."""
    import re
    import subprocess
    import sys

    target, draft = models
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "onspec.cli", "serve", "--replicas", "1", "--no-online",
                             "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--port", "0",
                             "--state-dir", str(tmp_path / "state")], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        url = wait_for(lambda: (m := re.search(r" on (http://[\d.]+:\d+)", log.read_text())) and m.group(1),
                       timeout=180)
        assert complete(url, "hello world").status_code == 200
        assert len(health(url)["replicas"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "onspec serve: stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_plain_serve_does_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, onspec.cli, onspec.apps.serve; onspec.cli.build_parser(); "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("flags, message", [
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --replicas"),
    (["--replicas", "2", "--drafts", "2"], "does not combine with --drafts"),
    (["--replicas", "-1"], "--replicas must be >= 0"),
])
def test_cluster_flags_fail_clearly(models, tmp_path, flags, message):
    import subprocess
    import sys

    target, draft = models
    out = subprocess.run([sys.executable, "-m", "onspec.cli", "serve", "--target", str(target), "--draft", str(draft),
                          "--state-dir", str(tmp_path / "state"), *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


# -- the hub's protocol on its own (no Ray) ---------------------------------------------------------


def _hub(**kw):
    from onspec.cluster.hub import Hub

    return Hub(put=lambda weights: weights, **kw)


def test_hub_publications_only_go_forward_and_wake_waiters():
    import asyncio

    async def scenario():
        hub = _hub()
        waiter = asyncio.ensure_future(hub.wait(None, 0, 5.0))
        await asyncio.sleep(0)
        assert await hub.publish(3, {"w": 3}) == 1
        first = await waiter
        assert (first["generation"], first["version"], first["weights"]) == (1, 3, [{"w": 3}])
        assert await hub.publish(3, {"w": 3}) is None and await hub.publish(2, {"w": 2}) is None  # not newer
        assert await hub.wait(hub.epoch, 1, 0.05) is None  # nothing new: times out
        late = await hub.wait(None, 0, 0.05)  # a replica that starts late gets the current one at once
        assert late["version"] == 3
        other_epoch = await hub.wait("a-restarted-hub", 7, 0.05)  # a hub restart: generations start over
        assert other_epoch["generation"] == 1

    asyncio.run(scenario())


def test_hub_rolls_back_a_version_whose_live_alpha_falls():
    import asyncio

    async def scenario():
        hub = _hub(tolerance=0.05, min_tokens=100)
        await hub.publish(1, {"w": 1})
        await hub.report("a", {"draft_version": 1, "counts": {1: (80, 100)}})
        await hub.publish(2, {"w": 2})  # judged against v1's live alpha 0.8
        await hub.report("a", {"draft_version": 2, "counts": {1: (80, 100), 2: (30, 60)}})
        await hub.report("b", {"draft_version": 2, "counts": {2: (20, 39)}})
        assert hub.current["version"] == 2  # 99 proposals: not judged yet
        await hub.report("b", {"draft_version": 2, "counts": {2: (21, 41)}})
        assert hub.current["kind"] == "rollback" and hub.current["version"] == 1
        assert hub.current["weights"] == [{"w": 1}] and hub.current["generation"] == 3
        (rb,) = hub.rollbacks
        assert rb["from_version"] == 2 and rb["to_version"] == 1 and rb["alpha"] == pytest.approx(51 / 101)
        assert await hub.publish(2, {"w": 2}) is None  # the rolled-back number is never served again
        await hub.publish(3, {"w": 3})  # a good one: judged good, becomes the reference
        await hub.report("a", {"draft_version": 3, "counts": {1: (80, 100), 2: (30, 60), 3: (85, 100)}})
        assert hub.current["version"] == 3 and hub.good["version"] == 3 and len(hub.rollbacks) == 1

    asyncio.run(scenario())


def test_hub_measures_publish_to_swap_latency_and_lists_replicas():
    import asyncio

    async def scenario():
        hub = _hub()
        gen = await hub.publish(1, {"w": 1})
        t = hub.published_at[gen]
        await hub.report("a", {"draft_version": 1, "swaps": [(gen, t + 0.1, t + 0.2)], "metrics": "x 1\n"})
        await hub.report("b", {"draft_version": 1, "swaps": [(gen, t + 0.1, t + 0.4)], "metrics": "x 2\n"})
        state = await hub.state()
        assert state["swap_latency_s"]["n"] == 2 and state["swap_latency_s"]["max"] == pytest.approx(0.4)
        assert state["delivery_latency_s"]["max"] == pytest.approx(0.1)
        assert set(state["replicas"]) == {"a", "b"} and not any(r["stale"] for r in state["replicas"].values())
        assert await hub.metrics() == {"a": "x 1\n", "b": "x 2\n"}
        await hub.forget("a")
        assert set((await hub.state())["replicas"]) == {"b"}

    asyncio.run(scenario())
