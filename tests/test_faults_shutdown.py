"""A full disk at shutdown, end to end (issue 41, item 4): `onspec serve` learns, writes a first
state at its SIGTERM, is started again on it, learns more, and its disk fills up before the second
SIGTERM. The process must stop as it always does (exit 0, "onspec serve: stopped" last, one error line
per file it could not write, no traceback) and the first run's state must be there, byte for byte,
with its checkpoint loading as the newest good one.

The disk is a real one that fills up: a small tmpfs, mounted in a mount namespace of the scenario's
own (`unshare -m` as root, `unshare -rm` otherwise), so nothing stays mounted if the test dies. Only
where neither is permitted do the server's fsyncs under the state directory fail with ENOSPC once the
disk is "full" (a filesystem with delayed allocation reports a full disk there)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import save_tiny_pair
from test_faults import contents, fill

pytestmark = pytest.mark.server

SERVE = ["serve", "--port", "0", "--dtype", "float32", "--k", "3", "--learn", "both", "--persist-traffic",
         "--drafts", "2", "--router", "field", "--update-interval", "2", "--steps", "1", "--batch-size", "2"]
PROMPTS = ["hello there", "the quick brown fox", "def f(x):", "once upon a time"]
WRITTEN_AT_SHUTDOWN = ("suffix.safetensors", "traffic.pt", "checkpoints/LATEST", "checkpoints/pool.json",
                       "checkpoints/router.pt")

# the fallback: `onspec serve` whose fsyncs under $ONSPEC_TEST_DISK raise ENOSPC once $ONSPEC_TEST_FULL exists
_ENOSPC_AT_FSYNC = """
import errno, os, sys
from onspec.cli import main
disk, full, fsync = os.environ["ONSPEC_TEST_DISK"], os.environ["ONSPEC_TEST_FULL"], os.fsync
def fsync_on_a_full_disk(fd):
    if os.path.exists(full) and os.readlink(f"/proc/self/fd/{fd}").startswith(disk):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return fsync(fd)
os.fsync = fsync_on_a_full_disk
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("models"))


def namespace_with_mount(tmp_path: Path) -> list[str] | None:
    """The command prefix under which a tmpfs can be mounted (and is gone when the command ends), or None."""
    where = tmp_path / "try-mount"
    where.mkdir()
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):  # both make the new mounts private
        try:
            done = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                                  capture_output=True, timeout=30)
        except FileNotFoundError:
            return None
        if done.returncode == 0:
            return prefix
    return None


def test_a_disk_full_at_sigterm_exits_0_and_keeps_the_last_good_state(models, tmp_path):
    prefix = namespace_with_mount(tmp_path)
    how = "tmpfs" if prefix is not None else "enospc"
    scenario = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"from test_faults_shutdown import scenario; "
                f"print(json.dumps(scenario({how!r}, {str(models[0])!r}, {str(models[1])!r}, {str(tmp_path)!r})))")
    done = subprocess.run([*(prefix or []), sys.executable, "-c", scenario], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    first, second = got["runs"]
    assert first["code"] == 0 and first["last"] == "onspec serve: stopped", first["log"]
    assert set(WRITTEN_AT_SHUTDOWN) <= set(got["good"]), sorted(got["good"])
    assert second["trained_to"] > got["good_version"], "the second run had no new version to lose"

    assert second["code"] == 0, second["log"]  # the full disk: the same clean stop
    assert second["last"] == "onspec serve: stopped", second["log"]
    assert "Traceback" not in second["log"], second["log"]
    errors = [line for line in second["log"].splitlines() if " ERROR " in line]
    assert errors and all("No space left on device" in line for line in errors), second["log"]
    for what in ("suffix.safetensors", "final checkpoint", "traffic.pt", "manifest"):
        assert any(what in line for line in errors), (what, errors)

    assert got["after"] == got["good"], "a file of the first run's state changed on the full disk"
    assert got["leftovers"] == [], "a temporary file or directory was left on the full disk"
    assert got["loaded_version"] == got["good_version"] and got["loaded_from_latest"], got


def scenario(how: str, target: str, draft: str, tmp: str) -> dict:
    """Run in its own mount namespace (how="tmpfs") or as it is (how="enospc"); returns what happened."""
    from onspec.online.checkpoint import CheckpointStore

    tmp_path = Path(tmp)
    disk = tmp_path / "disk"
    disk.mkdir()
    command = [sys.executable, "-m", "onspec.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if how == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(disk)], check=True)
    else:
        command = [sys.executable, "-c", _ENOSPC_AT_FSYNC]
        env.update(ONSPEC_TEST_DISK=str(disk), ONSPEC_TEST_FULL=str(tmp_path / "full"))
    state = disk / "state"
    args = [*command, *SERVE, "--target", target, "--draft", draft, "--state-dir", str(state)]

    def run(n: int, full: bool) -> dict:
        log = tmp_path / f"serve{n}.log"  # beside the disk: it must not fill up with it
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
        try:
            url = _wait(lambda: (m := re.search(r" on (http://[\d.]+:\d+)", log.read_text())) and m.group(1),
                        lambda: proc.poll() is not None, log)
            resumed = _health(url)["draft_version"]
            for prompt in PROMPTS:
                r = httpx.post(url + "/v1/completions", timeout=60,
                               json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
            # the trainer learned a version this run (its final checkpoint has something to write)
            trained_to = _wait(lambda: (v := _health(url)["latest_draft_version"]) > resumed and v,
                               lambda: proc.poll() is not None, log)
            if full and how == "tmpfs":
                fill(disk)
            elif full:
                (tmp_path / "full").touch()
        finally:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return {"code": code, "log": text, "last": lines[-1] if lines else "", "trained_to": trained_to}

    first = run(0, full=False)
    good = contents(state)
    good_version = int(json.loads((state / "checkpoints" / (state / "checkpoints" / "LATEST").read_text()
                                   / "onspec.json").read_text())["version"])
    second = run(1, full=True)
    store = CheckpointStore(state / "checkpoints", writer=False)
    loaded = store.load_latest()
    return {"runs": [first, second], "good": good, "good_version": good_version, "after": contents(state),
            "leftovers": sorted(p.relative_to(state).as_posix() for p in state.rglob(".*")),
            "loaded_version": None if loaded is None else int(loaded[1]["version"]),
            "loaded_from_latest": store.loaded_from is not None
            and store.loaded_from.name == (state / "checkpoints" / "LATEST").read_text().strip()}


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def _wait(what, dead, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        assert not dead(), log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError("timed out: " + log.read_text(errors="replace")[-3000:])


