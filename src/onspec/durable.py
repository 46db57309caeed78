"""Durable small writes, shared by the checkpoint store (online/), the pool's manifest (pool/) and
the files written at shutdown (apps/serve.py, cluster/trainer.py): a file written under a temporary
name, fsynced, renamed over the old one, and the directory fsynced, so a crash or a full disk leaves
either the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from safetensors import SafetensorError


class WriteError(OSError):
    """A write failed (a full disk, say) where the error did not come as an OSError; the message
    names the file and the error, on one line."""


@contextlib.contextmanager
def naming_errors(path: Path) -> Iterator[None]:
    """What fails while writing `path` is an OSError naming it (one that names its own file is left
    as it is): a full disk comes as an OSError without a name (write, fsync), or as safetensors' or
    torch.save's own error types. Callers log an OSError as one line."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    except (RuntimeError, SafetensorError) as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError):  # the write's own error, e.g. [Errno 28] No space left on device
            raise WriteError(cause.errno, cause.strerror, str(path)) from e
        raise WriteError(f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:500]}") from e


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
    the umask (user traffic). A write that fails (a full disk) raises an OSError naming `path`,
    removes the temporary file (it would hold the space) and leaves the old file as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming_errors(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
            if private:
                os.fchmod(fd, 0o600)  # a leftover temporary file keeps its old mode through O_CREAT
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
