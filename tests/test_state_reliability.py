"""The state directory survives resets, crashes, corruption and hostile route keys (issue 15):
a bad LATEST or a corrupt version falls back to the newest version that verifies, with a warning;
pruning keeps what LATEST names and only touches version directories; an interrupted write's
leftovers go at the next open; checkpoints are fsynced and hashed; a route key never becomes a
path; a final checkpoint that cannot be written is logged, not raised."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from onspec.online.checkpoint import CheckpointStore
from onspec.online.distiller import Distiller, TrainerConfig
from onspec.online.worker import TrainerWorker
from onspec.pool.pool import GENERAL
from onspec.wiring import member_dir

CFG = TrainerConfig(background=False, lr=1e-2, train_embeddings=True, probe_every=0)


def _trained(seed: int):
    """A tiny draft and an AdamW whose moments exist (one step taken), distinct per seed."""
    model = tiny_model("llama", seed, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return model, opt


def _save_versions(root: Path, versions=(1, 2, 3), keep: int = 3) -> dict[int, dict[str, torch.Tensor]]:
    """Save one checkpoint per version (different weights each); returns each version's weights."""
    store, weights = CheckpointStore(root, keep=keep), {}
    for v in versions:
        model, opt = _trained(v)
        store.save(model, None, opt, v, {"updates": v})
        weights[v] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights


def _load(root: Path) -> tuple[dict | None, torch.nn.Module]:
    model, opt = _trained(99)
    return CheckpointStore(root).load_into(model, opt), model


def _same(model, weights) -> bool:
    return all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- LATEST and pruning ---------------------------------------------------------------------------


@pytest.mark.parametrize("latest", [b"\x00\xff garbage \xfe", b"", b"v000099", b"../../etc", None],
                         ids=["garbage", "empty", "dangling", "traversal", "missing"])
def test_bad_latest_uses_the_newest_good_version_with_a_warning(tmp_path, caplog, latest):
    weights = _save_versions(tmp_path)
    if latest is None:
        (tmp_path / "LATEST").unlink()
    else:
        (tmp_path / "LATEST").write_bytes(latest)
    with caplog.at_level(logging.WARNING, logger="onspec.checkpoint"):
        meta, model = _load(tmp_path)
    assert meta is not None and meta["version"] == 3
    assert _same(model, weights[3])
    assert "LATEST" in _warnings(caplog) and "v000003" in _warnings(caplog)


def test_a_worker_resumes_after_a_reset_and_its_next_checkpoint_survives_pruning(tmp_path, caplog):
    weights = _save_versions(tmp_path)
    (tmp_path / "LATEST").write_text("garbage")
    (tmp_path / "vault").mkdir()  # not version directories: never pruned
    (tmp_path / "vz-specialist").mkdir()
    published = []
    with caplog.at_level(logging.WARNING, logger="onspec.checkpoint"):
        worker = TrainerWorker(Distiller(tiny_model("llama", 99, layers=1), CFG), CFG,
                               lambda v, w, a: published.append(v), store=CheckpointStore(tmp_path))
    assert published == [3] and worker.version == 3 and "LATEST" in _warnings(caplog)
    assert _same(worker.distiller.student, weights[3])
    worker.distiller.version, worker.distiller.updates = 4, 4  # an accepted update
    worker.checkpoint()
    assert (tmp_path / "LATEST").read_text() == "v000004"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "v000002", "v000003", "v000004", "vault", "vz-specialist"]


def test_a_version_below_the_largest_is_written_after_it_and_kept(tmp_path):
    """Every version failed to verify, the draft restarted from v0: its next checkpoint is numbered
    after the largest directory (not pruned at once), and a later load finds it."""
    _save_versions(tmp_path, versions=(5, 6, 7))
    for v in (5, 6, 7):
        (tmp_path / f"v00000{v}" / "onspec.json").write_text("{")
    model, opt = _trained(1)
    path = CheckpointStore(tmp_path).save(model, None, opt, 1, {})
    assert path.name == "v000008" and path.is_dir() and (tmp_path / "LATEST").read_text() == "v000008"
    meta, loaded = _load(tmp_path)
    assert meta["version"] == 1 and _same(loaded, {n: p for n, p in model.named_parameters()})


def test_pruning_keeps_what_latest_names_and_orders_by_number(tmp_path):
    _save_versions(tmp_path, versions=(999_998, 999_999, 1_000_000, 1_000_001))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["v1000000", "v1000001", "v999999"]
    assert (tmp_path / "LATEST").read_text() == "v1000001"


# -- interrupted writes -----------------------------------------------------------------------------


def test_leftovers_of_an_interrupted_write_are_removed_on_open(tmp_path, caplog):
    _save_versions(tmp_path, versions=(1,))
    leftover = tmp_path / ".v000002.k3j_x9"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(os.urandom(1 << 16))
    (tmp_path / ".LATEST.tmp").write_text("v000002")
    (tmp_path / ".pool.json.tmp").write_text("{}")  # another writer's temporary file: not ours
    with caplog.at_level(logging.WARNING, logger="onspec.checkpoint"):
        store = CheckpointStore(tmp_path)
    assert not leftover.exists() and not (tmp_path / ".LATEST.tmp").exists()
    assert (tmp_path / ".pool.json.tmp").exists() and (tmp_path / "v000001").is_dir()
    assert ".v000002.k3j_x9" in _warnings(caplog)
    assert store.load_latest()[1]["version"] == 1


def test_a_reader_leaves_the_writers_temporary_directory_alone(tmp_path):
    """A serving replica opens the store the trainer (another process) is writing into: the
    write in progress must survive the reader's open."""
    _save_versions(tmp_path, versions=(1,))
    in_progress = tmp_path / ".v000002.k3j_x9"
    in_progress.mkdir()
    assert CheckpointStore(tmp_path, writer=False).load_latest()[1]["version"] == 1
    assert in_progress.is_dir()


_KILLED_WRITER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from onspec.online.checkpoint import CheckpointStore
store = CheckpointStore({root!r})
model = tiny_model("llama", 1, layers=1)
store.save(model, None, None, 1, {{}})
def stuck(obj, f, *a, **k):  # half an optimizer file on disk, then SIGKILL arrives
    f = f if hasattr(f, "write") else open(f, "wb")  # a path or a file object
    f.write(b"PK" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
torch.save = stuck
store.save(model, None, torch.optim.AdamW(model.parameters()), 2, {{}})
"""


def test_sigkill_mid_write_leaves_the_previous_version_and_no_leftover_after_open(tmp_path):
    root = tmp_path / "ckpt"
    code = _KILLED_WRITER.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in root.iterdir() if p.name.startswith(".v000002.")]  # the crash left it
    store = CheckpointStore(root)
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "v000001"]
    assert store.load_latest()[1]["version"] == 1


# -- durability and corruption ----------------------------------------------------------------------


def test_every_file_and_directory_is_fsynced_and_hashed(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name synced descriptors")
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    model, opt = _trained(1)
    final = CheckpointStore(tmp_path).save(model, None, opt, 1, {})
    meta = json.loads((final / "onspec.json").read_text())
    files = sorted(p.name for p in final.iterdir())
    assert sorted(meta["files"]) == [f for f in files if f != "onspec.json"]
    assert all(len(h) == 64 for h in meta["files"].values())
    names = {Path(p).name for p in synced}
    assert set(files) <= names  # every file (written under the temporary name)
    assert any(Path(p).name.startswith(".v000001.") for p in synced)  # the version directory
    assert str(tmp_path) in synced and ".LATEST.tmp" in names  # the parent, and LATEST before its rename


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", _truncate),
    "random weights": ("model.safetensors", lambda f: f.write_bytes(os.urandom(f.stat().st_size))),
    "truncated optimizer": ("optimizer.pt", _truncate),
    "bad metadata": ("onspec.json", lambda f: f.write_text('{"version": 2, "upd')),
    "one byte of config.json": ("config.json", lambda f: f.write_text(f.read_text().replace("64", "65", 1))),
}


@pytest.mark.parametrize("checksums", [True, False], ids=["hashed", "unhashed (older checkpoint)"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_version_falls_back_to_the_previous_one_naming_the_file(tmp_path, caplog, corruption, checksums):
    name, damage = CORRUPTIONS[corruption]
    if not checksums and name == "config.json":
        pytest.skip("only a checksum sees a changed config that still parses")
    weights = _save_versions(tmp_path, versions=(1, 2))
    if not checksums:  # an older checkpoint: no `files` table, checked by parsing what it loads
        for v in (1, 2):
            meta_file = tmp_path / f"v00000{v}" / "onspec.json"
            meta_file.write_text(json.dumps({k: x for k, x in json.loads(meta_file.read_text()).items() if k != "files"}))
    damage(tmp_path / "v000002" / name)
    with caplog.at_level(logging.WARNING, logger="onspec.checkpoint"):
        meta, model = _load(tmp_path)
    assert meta["version"] == 1 and _same(model, weights[1])
    assert str(tmp_path / "v000002" / name) in _warnings(caplog)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_in_a_valid_file_fall_back(tmp_path, caplog, value):
    weights = _save_versions(tmp_path, versions=(1,))
    model, opt = _trained(2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = value
    CheckpointStore(tmp_path).save(model, None, opt, 2, {})  # a well-formed file, correctly hashed
    with caplog.at_level(logging.WARNING, logger="onspec.checkpoint"):
        meta, loaded = _load(tmp_path)
    assert meta["version"] == 1 and _same(loaded, weights[1])
    assert "up_proj" in _warnings(caplog) and "NaN or inf" in _warnings(caplog)


def test_nothing_verifies_starts_fresh_with_an_error_not_a_traceback(tmp_path, caplog):
    _save_versions(tmp_path, versions=(1, 2))
    for v in (1, 2):
        (tmp_path / f"v00000{v}" / "model.safetensors").write_bytes(b"\x00" * 10)
    with caplog.at_level(logging.WARNING, logger="onspec.checkpoint"):
        meta, _ = _load(tmp_path)
    assert meta is None and "no checkpoint" in caplog.text


# -- route keys and shutdown ------------------------------------------------------------------------


def test_route_keys_map_to_distinct_directories_inside_root(tmp_path):
    root = tmp_path / "checkpoints"
    assert member_dir(root, GENERAL) == root
    keys = ["../../x", "/abs/path", "", ".", "..", "a" * 5000, "日本語", "\ud800",
            "code", "Code", "a/b", "a_b", "v000001", ".v000001.x", "LATEST", "-rf", "x\x00y"]
    dirs = [member_dir(root, k) for k in keys]
    assert len(set(dirs)) == len(keys)
    for k, d in zip(keys, dirs):
        assert d.parent == root and d != root, k
        assert len(d.name) <= 60 and not d.name.startswith((".", "-")), k
        assert d.resolve().is_relative_to(root.resolve()), k
        assert not re.fullmatch(r"v\d{6,}|LATEST", d.name), k
    assert member_dir(root, "code") == member_dir(root, "code")  # stable across runs
    # a client's "general" never becomes a specialist: the pool serves it with the general draft
    # (tests/test_pool.py::test_route_key_general_is_the_general_draft)


def test_a_checkpoint_of_another_model_is_refused_not_replaced(tmp_path):
    """A state directory written for a different draft: a clear error naming the checkpoint, and
    its versions stay (starting over would number past them and prune them away)."""
    store = CheckpointStore(tmp_path)
    d = Distiller(tiny_model("llama", 1, layers=2), CFG)
    store.save(d.student, None, d.optimizer, 1, {})
    with pytest.raises(ValueError, match="another draft model"):
        CheckpointStore(tmp_path).load_into(Distiller(tiny_model("llama", 1, layers=1), CFG).student)
    assert (tmp_path / "v000001").is_dir()


def test_close_with_an_unwritable_state_dir_logs_and_returns(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    root = blocker / "checkpoints"  # mkdir fails with an OSError whoever runs the test (root too)
    worker = TrainerWorker(Distiller(tiny_model("llama", 1, layers=1), CFG), CFG, lambda v, w, a: None,
                           store=CheckpointStore(root))
    worker.distiller.version, worker.distiller.updates = 3, 3
    with caplog.at_level(logging.ERROR, logger="onspec.trainer"):
        worker.close()  # does not raise
    assert str(root) in caplog.text and "v3" in caplog.text


@contextlib.contextmanager
def _disk_full_beyond(nbytes: int):
    """Writes past `nbytes` in one file fail as on a full disk (RLIMIT_FSIZE: EFBIG, which reaches
    Python as safetensors' or torch.save's own error type, as ENOSPC does), in this process only."""
    resource = pytest.importorskip("resource")
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("cause", ["full disk at the weights", "full disk at the optimizer state", "read-only"])
def test_a_failed_checkpoint_write_logs_one_line_naming_the_file_and_the_error(tmp_path, caplog, cause):
    """A full disk logged a whole traceback for every failed checkpoint write (safetensors and
    torch.save raise their own error types, not OSError) where a read-only directory logged one
    line: each failed write is now one line, naming the file and the error."""
    worker = TrainerWorker(Distiller(tiny_model("llama", 1, layers=1), CFG), CFG, lambda v, w, a: None,
                           store=CheckpointStore(tmp_path / "probe"))
    d = worker.distiller
    d.student(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    d.optimizer.step()  # its moments exist: the optimizer state is the largest file
    d.version, d.updates = 3, 3
    worker.checkpoint()
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "probe" / "v000003").iterdir()}
    assert sizes["optimizer.pt"] > sizes["model.safetensors"] > sizes["config.json"]
    if cause == "read-only":
        (tmp_path / "not-a-dir").write_text("")
        root, limit = tmp_path / "not-a-dir" / "checkpoints", None  # mkdir fails, whoever runs the test
        file, error = str(root), "Not a directory"
    else:
        root = tmp_path / "checkpoints"
        name = "model.safetensors" if cause.endswith("weights") else "optimizer.pt"
        limit = sizes["config.json"] + 512 if name == "model.safetensors" else sizes["model.safetensors"] + 4096
        file, error = name, "too large"
    worker.store = CheckpointStore(root)
    with caplog.at_level(logging.ERROR, logger="onspec.trainer"), \
            (_disk_full_beyond(limit) if limit else contextlib.nullcontext()):
        worker._checkpoint_or_log("scheduled")
        worker._checkpoint_or_log("scheduled")
    records = [r for r in caplog.records if r.name == "onspec.trainer"]
    assert len(records) == 2, [r.getMessage() for r in records]
    for r in records:
        line = r.getMessage()
        assert r.exc_info is None and r.exc_text is None and "\n" not in line, line
        assert file in line and error in line and "v3" in line, line
    assert not root.is_dir() or not [p for p in root.iterdir() if p.name != "LATEST"]  # no leftover, no version


def test_a_specialists_traffic_file_stays_in_the_state_dir(tmp_path):
    from onspec.apps.serve import _traffic_file

    names = ["../../x", "/abs/path", "a/b", "code"]
    files = [_traffic_file(tmp_path, n) for n in names]
    assert _traffic_file(tmp_path, GENERAL) == tmp_path / "traffic.pt"
    assert len(set(files)) == len(names) and all(f.parent == tmp_path for f in files)
