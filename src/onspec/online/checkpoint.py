"""Draft checkpoints: durable, verified on load, resumable, loadable with `--draft DIR`.

Layout under the checkpoint directory:
    v000012/            an HF model directory (config.json, model.safetensors, tokenizer files)
        optimizer.pt    the optimizer state (AdamW moments)
        onspec.json     version, updates, rollbacks, time, and `files`: the sha256 of every other file
    LATEST              the name of the last good version directory

Writing: a version directory is written under a temporary name (`.v000012.<random>`), every file
and the directory are fsynced, it is renamed into place and the parent fsynced; LATEST is replaced
the same way (write, fsync, os.replace, fsync). A crash at any point leaves the previous good
checkpoint intact, and what the interrupted write left (the temporary names) is removed the next
time a store opens the directory. A directory is numbered by the draft version it holds, or after
the largest number present when that one is taken (a restart that fell back to an older version),
so a new checkpoint is always the newest; onspec.json holds the draft version itself.

Reading: the version LATEST names is verified (its metadata parses, every file matches its sha256,
the weights load and are finite, the optimizer state loads). When LATEST is missing, empty, garbage,
dangling or names a version that does not verify, the newest version that verifies is used, with a
warning naming what was wrong. Pruning keeps the `keep` highest-numbered versions and the one
LATEST names, by number, and never touches a name that is not a version directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from onspec.durable import fsync_dir, naming_errors, replace_synced

log = logging.getLogger("onspec.checkpoint")

META = "onspec.json"
OPTIMIZER = "optimizer.pt"
_VERSION_DIR = re.compile(r"v(\d{6,})")  # what f"v{n:06d}" writes
_TEMP_DIR = re.compile(r"\.v\d{6,}\..+")  # tempfile.mkdtemp(prefix=".v000012.")
_LATEST_TMP = ".LATEST.tmp"


class CorruptCheckpoint(Exception):
    """A version directory that does not verify; the message names the file."""


@dataclass
class Loaded:
    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict
    optimizer: dict | None


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3, writer: bool = True) -> None:
        """`writer=False`: a reader beside the one writer (a serving replica while the trainer
        checkpoints): it leaves the directory as it is, temporary directories included."""
        self.root = Path(root)
        self.keep = max(1, keep)
        self.loaded_from: Path | None = None
        """The version directory the last load used."""
        if writer:
            self._remove_leftovers()

    # -- writing ---------------------------------------------------------------------------------

    def save(self, model, tokenizer, optimizer: torch.optim.Optimizer | None, version: int, meta: dict,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `model` (or `state_dict` under `model`'s config: the served draft of a student
        that trains adapters) as the next version."""
        self.root.mkdir(parents=True, exist_ok=True)
        numbers = [n for n, _ in self._versions()]
        name = version_name(version if not numbers or version > numbers[-1] else numbers[-1] + 1)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            with naming_errors(tmp / "model.safetensors"):
                model.save_pretrained(tmp, state_dict=state_dict)
            if tokenizer is not None:
                with naming_errors(tmp):
                    tokenizer.save_pretrained(tmp)
            if optimizer is not None:
                with naming_errors(tmp / OPTIMIZER), open(tmp / OPTIMIZER, "wb") as f:  # a file object: a failed
                    torch.save(optimizer.state_dict(), f)  # write's OSError stays behind torch's RuntimeError
            files = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with naming_errors(f):
                        files[f.relative_to(tmp).as_posix()] = _sha256(f, sync=True)
            with naming_errors(tmp / META):
                _write_synced(tmp / META, json.dumps({"version": version, "saved_at": time.time(), **meta,
                                                      "files": files}, indent=2))
            with naming_errors(tmp):
                for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                    fsync_dir(d)
                fsync_dir(tmp)
            final = self.root / name
            tmp.rename(final)
            fsync_dir(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        replace_synced(self.root / "LATEST", lambda f: f.write(name.encode()))  # written as _LATEST_TMP first
        self._prune()
        return final

    def _prune(self) -> None:
        latest = self._latest_name()[0]
        for _, path in self._versions()[: -self.keep]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Temporary directories (and LATEST's temporary file) of writes a crash interrupted."""
        try:
            leftovers = [p for p in self.root.iterdir()
                         if (_TEMP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
                         or (p.name == _LATEST_TMP and p.is_file())] if self.root.is_dir() else []
            for p in leftovers:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        except OSError as e:  # a read-only state directory: serving goes on without the clean-up
            log.warning("could not remove leftovers of interrupted checkpoint writes in %s: %s", self.root, e)
            return
        if leftovers:
            log.warning("removed %d leftover(s) of interrupted checkpoint writes in %s: %s", len(leftovers),
                        self.root, ", ".join(p.name for p in leftovers))

    # -- reading ---------------------------------------------------------------------------------

    def load_latest(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The newest good checkpoint's weights and meta (None: no checkpoint that verifies)."""
        got = self._load_newest_good(with_optimizer=False)
        return None if got is None else (got.weights, got.meta)

    def load_fitting(self, own: dict[str, torch.Tensor], required=(), with_optimizer: bool = False) -> Loaded | None:
        """The newest good checkpoint, refused (ValueError) when it was written for another model:
        a tensor that `own` (name -> tensor) lacks or shapes otherwise, or a `required` name absent."""
        got = self._load_newest_good(with_optimizer)
        if got is None:
            return None
        wrong = [f"{n} {tuple(t.shape)} (the model's: {tuple(own[n].shape) if n in own else 'none'})"
                 for n, t in got.weights.items() if n not in own or own[n].shape != t.shape]
        wrong += [f"{n} missing (the model's: {tuple(own[n].shape)})" for n in required if n not in got.weights]
        if wrong:  # another model's learning: refuse, never start over and prune it away
            raise ValueError(f"the checkpoint {got.path} was written for another draft model ({len(wrong)} tensors "
                             f"differ, e.g. {wrong[0]}); point --state-dir elsewhere or move it away")
        return got

    def load_into(self, model, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Load the newest good checkpoint's weights (and optimizer state) in place; returns its meta."""
        got = self.load_fitting(model.state_dict(), with_optimizer=optimizer is not None)
        if got is None:
            return None
        model.load_state_dict(got.weights, strict=False)
        if optimizer is not None and got.optimizer is not None:
            try:
                optimizer.load_state_dict(got.optimizer)
            except (ValueError, KeyError) as e:  # checked before anything is changed
                log.warning("%s does not fit this run's trainable parameters (%s); the optimizer starts fresh",
                            got.path / OPTIMIZER, e)
        return got.meta

    def _load_newest_good(self, with_optimizer: bool) -> Loaded | None:
        latest, problem = self._latest_name()
        others = [p for _, p in reversed(self._versions()) if p.name != latest]
        for path in ([self.root / latest] if latest else []) + others:
            try:
                got = self._verify(path, with_optimizer)
            except CorruptCheckpoint as e:
                log.warning("checkpoint %s is unusable: %s", path, e)
                problem = problem or f"names {path.name}, which does not verify"
                continue
            if path.name != latest:
                log.warning("%s %s; using %s, the newest version that verifies", self.root / "LATEST", problem, path)
            self.loaded_from = path
            return got
        if latest or others:
            log.error("no checkpoint in %s verifies; the draft starts from its initial weights", self.root)
        return None

    def _latest_name(self) -> tuple[str | None, str | None]:
        """The version LATEST names if it is a version directory, else (None, what is wrong)."""
        marker = self.root / "LATEST"
        try:
            text = marker.read_text().strip()
        except FileNotFoundError:
            return None, "is missing"
        except (OSError, ValueError) as e:
            return None, f"is unreadable ({e})"
        if not text:
            return None, "is empty"
        if not _is_version_name(text):
            return None, f"holds {text[:40]!r}, not a version name"
        if not (self.root / text).is_dir():
            return None, f"names {text}, which does not exist"
        return text, None

    def _versions(self) -> list[tuple[int, Path]]:
        """The version directories, by number (oldest first)."""
        if not self.root.is_dir():
            return []
        found = [(int(p.name[1:]), p) for p in self.root.iterdir()
                 if _is_version_name(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(found)

    @staticmethod
    def _verify(path: Path, with_optimizer: bool) -> Loaded:
        """Read one version directory; CorruptCheckpoint (naming the file) when anything is off."""
        meta_file = path / META
        try:
            meta = json.loads(meta_file.read_text())
            int(meta["version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(f"{meta_file}: unreadable metadata ({type(e).__name__}: {e})") from None
        files = meta.get("files")  # absent: written before checksums (loaded, checked by parsing only)
        if files is not None:
            if not isinstance(files, dict):
                raise CorruptCheckpoint(f"{meta_file}: 'files' is not a table of checksums")
            for rel, digest in files.items():
                f = path / rel
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise CorruptCheckpoint(f"{meta_file}: names a file outside its directory ({rel!r})")
                try:
                    actual = _sha256(f)
                except OSError as e:
                    raise CorruptCheckpoint(f"{f}: missing or unreadable ({e})") from None
                if actual != digest:
                    raise CorruptCheckpoint(f"{f}: sha256 does not match the metadata (truncated or changed)")
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CorruptCheckpoint(f"{path / 'model.safetensors'}: missing")
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            try:
                part = load_file(str(shard))
            except Exception as e:  # safetensors raises its own error types for a bad header or size
                raise CorruptCheckpoint(f"{shard}: not a readable safetensors file ({e})") from None
            for name, t in part.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CorruptCheckpoint(f"{shard}: tensor {name} holds NaN or inf")
            weights.update(part)
        optimizer = None
        if with_optimizer and (path / OPTIMIZER).is_file():
            try:
                optimizer = torch.load(path / OPTIMIZER, weights_only=True)
            except Exception as e:  # a truncated zip, a bad pickle
                raise CorruptCheckpoint(f"{path / OPTIMIZER}: not a readable optimizer state ({e})") from None
        return Loaded(path, weights, meta, optimizer)


def version_name(number: int) -> str:
    return f"v{number:06d}"


def _is_version_name(name: str) -> bool:
    m = _VERSION_DIR.fullmatch(name)
    return m is not None and version_name(int(m.group(1))) == name


def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
