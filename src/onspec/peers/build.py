"""What building a peer from its source needs, shared by the peers built into the cache (llama.cpp
for `onspec bench`, SuffixDecoding in peers/arctic.py): a file lock, and a command run into a log."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
from pathlib import Path
from typing import Iterator, Sequence


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (one build at a time across processes)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def execute(cmd: Sequence[str], log_path: Path, cwd: Path | None = None) -> int:
    """Run `cmd`, appending its output to `log_path`; its exit status (127 if not found)."""
    with open(log_path, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        try:
            return subprocess.run(list(cmd), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, check=False).returncode
        except OSError as e:
            out.write(f"{e}\n")
            return 127
