"""Durable small writes, shared by the checkpoint store (online/) and the pool's manifest (pool/):
a file written under a temporary name, fsynced, renamed over the old one, and the directory
fsynced, so a crash leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem that cannot sync directories
            raise
    finally:
        os.close(fd)


def replace_synced(path: Path, write: Callable[[BinaryIO], object], private: bool = False) -> None:
    """Write `path` through `write(file)` as `.<name>.tmp` beside it, fsync, rename into place,
    fsync the directory. `private`: the file is owner-only (0600) from its first byte, whatever
    the umask (user traffic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    if private:
        os.fchmod(fd, 0o600)  # a leftover temporary file keeps its old mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
