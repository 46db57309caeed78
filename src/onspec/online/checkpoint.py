"""Draft checkpoints: atomic, resumable, loadable with `--draft DIR`.

Layout under the checkpoint directory:
    v000012/            an HF model directory (config.json, model.safetensors, tokenizer files)
        optimizer.pt    the optimizer state (AdamW moments)
        onspec.json     version, updates, rollbacks, time
    LATEST              the name of the last good version directory
A version directory is written under a temporary name and renamed into place; LATEST is
replaced with os.replace. A crash at any point leaves the previous good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def save(self, model, tokenizer, optimizer: torch.optim.Optimizer | None, version: int, meta: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"v{version:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "onspec.json").write_text(json.dumps({"version": version, "saved_at": time.time(), **meta}, indent=2))
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        latest_tmp = self.root / ".LATEST.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, self.root / "LATEST")
        self._prune()
        return final

    def latest(self) -> Path | None:
        marker = self.root / "LATEST"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        return path if (path / "onspec.json").is_file() else None

    def load_latest(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The latest checkpoint's weights and meta (None: no checkpoint yet)."""
        path = self.latest()
        return None if path is None else self._read(path)

    def load_into(self, model, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Load the latest checkpoint's weights (and optimizer state) in place; returns its meta."""
        path = self.latest()
        if path is None:
            return None
        state, meta = self._read(path)
        model.load_state_dict(state, strict=False)
        if optimizer is not None and (path / "optimizer.pt").is_file():
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        return meta

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        return load_file(str(path / "model.safetensors")), json.loads((path / "onspec.json").read_text())

    def _prune(self) -> None:
        versions = sorted(p for p in self.root.glob("v*") if p.is_dir())
        for old in versions[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
