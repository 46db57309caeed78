"""SuffixDecoding, the reference (Snowflake ArcticInference, arXiv 2411.04975), as a peer.

`build()` builds only the reference's suffix tree, `csrc/suffix_decoding` of the PyPI sdist
`arctic-inference==0.3.0` (C++20 and nanobind, no CUDA), into onspec's cache, once per version
and Python ABI:

    <cache_dir()>/arctic/0.3.0.cpython-311-x86_64-linux-gnu/_C.cpython-311-x86_64-linux-gnu.so
    <cache_dir()>/arctic/0.3.0.cpython-311-x86_64-linux-gnu.build.log   (every build step's output)

The sdist is fetched from PyPI's simple index and checked against its pinned sha256: `pip download`
would first prepare the package's metadata, which installs its build requirements (torch
included). Nothing is installed: the whole package registers a vLLM plugin through an entry
point, which would change the vLLM that `--engine vllm` runs. As in `onspec.bench.llamacpp`, the
build runs in a temporary directory and only a finished extension is renamed into place.

`available()` says why it cannot be built here (or None). `ArcticSuffixCache` drives the
extension as ArcticInference's vLLM integration does: a request starts with its prompt, emitted
tokens are added as they come, `speculate` matches the last `max_tree_depth` tokens against the
request's own tree (prompt and output) and the global tree (earlier and current outputs) and
keeps the higher-scoring draft, a stopped request's output stays in the global tree until FIFO
eviction past `max_cached_requests`.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from onspec.peers.build import execute, locked
from onspec.models.registry import cache_dir

VERSION = "0.3.0"
SDIST = f"arctic_inference-{VERSION}.tar.gz"
SDIST_SHA256 = "7f22e3e1b1071c6061c0d6951be17c0fb50b08d06d6e543144c8f52faba60a36"
INDEX_URL = "https://pypi.org/simple/arctic-inference/"
SOURCE_DIR = "csrc/suffix_decoding"
NANOBIND = "nanobind==2.9.2"
"""The nanobind the sdist builds with (its pyproject's build requirement); a project dependency."""
CMAKE_MIN = (3, 18)
"""csrc/suffix_decoding/CMakeLists.txt: cmake_minimum_required(VERSION 3.18)."""
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
BUILD_NAME = f"{VERSION}{EXT_SUFFIX.removesuffix('.so')}"
"""The build's directory name: the version and the Python ABI the extension is built for."""
MODULE_NAME = "onspec_arctic_suffix._C"
"""Imported under this name (nanobind's init function is PyInit__C: the last part must be `_C`)."""

Log = Callable[[str], None]


class ArcticUnavailable(RuntimeError):
    """The reference cannot be built or loaded here; the message says why."""


# -- build ---------------------------------------------------------------------------------------


def build_root() -> Path:
    return cache_dir() / "arctic" / BUILD_NAME


def extension_path() -> Path:
    """The built extension (it may not exist yet)."""
    return build_root() / f"_C{EXT_SUFFIX}"


def build_log_path() -> Path:
    root = build_root()
    return root.parent / f"{root.name}.build.log"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def available() -> str | None:
    """None when the extension is built or can be built here; else exactly why not."""
    if extension_path().is_file():
        return None
    cmake = shutil.which("cmake")
    if cmake is None:
        return "cannot build SuffixDecoding: `cmake` is not on PATH"
    version = re.search(r"(\d+)\.(\d+)", subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout)
    if version is None or tuple(map(int, version.groups())) < CMAKE_MIN:
        found = version.group(0) if version else "unknown"
        return f"cannot build SuffixDecoding: cmake {found} is older than {CMAKE_MIN[0]}.{CMAKE_MIN[1]}"
    cxx = _compiler()
    if cxx is None:
        return "cannot build SuffixDecoding: no C++ compiler (c++, g++ or clang++; or $CXX) on PATH"
    probe = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input="#include <span>\nint main() {}\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no message"])[0]
        return f"cannot build SuffixDecoding: {cxx} does not compile C++20 (std::span): {why}"
    if importlib.util.find_spec("nanobind") is None:
        return f"cannot build SuffixDecoding: nanobind is not installed in this Python (pip install {NANOBIND})"
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        return f"cannot build SuffixDecoding: no Python development headers ({include} is missing)"
    return None


def build(log: Log | None = None, jobs: int | None = None) -> Path:
    """The built extension, building it once (about 30 s) if it is missing. Concurrent callers
    wait on a file lock. Raises ArcticUnavailable with the reason or the failed step and its log."""
    path = extension_path()
    if path.is_file():
        return path
    reason = available()
    if reason is not None:
        raise ArcticUnavailable(reason)
    root = build_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.parent / f".{root.name}.lock"):
        if not path.is_file():  # not built by another process while we waited
            _build(root, jobs or os.cpu_count() or 2, log or (lambda _msg: None))
    return path


def _build(root: Path, jobs: int, log: Log) -> None:
    log_path = build_log_path()
    log_path.write_text("")
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        log(f"SuffixDecoding: downloading {SDIST} from PyPI (log: {log_path})")
        sdist = _download(work / SDIST, log_path)
        source = _unpack_source(sdist, work / "src", log_path)
        build_dir = work / "build"
        log(f"SuffixDecoding: building {SOURCE_DIR} with cmake")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run_step("cmake configure", ["cmake", "-S", str(source), "-B", str(build_dir), *generator,
                                      "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"], log_path)
        _run_step("cmake build", ["cmake", "--build", str(build_dir), "-j", str(jobs)], log_path)
        built = sorted(build_dir.glob(f"_C{EXT_SUFFIX}"))
        if not built:
            raise ArcticUnavailable(f"SuffixDecoding build produced no _C{EXT_SUFFIX}; see {log_path}")
        staged = work / "final"
        staged.mkdir()
        shutil.copy2(built[0], staged / built[0].name)
        if root.exists():  # a leftover without a finished extension
            os.rename(root, work / "stale")
        os.rename(staged, root)  # atomic: the extension appears complete or not at all
        log(f"SuffixDecoding: built {root / built[0].name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_step(step: str, cmd: Sequence[str], log_path: Path) -> None:
    status = execute(cmd, log_path)
    if status != 0:
        raise ArcticUnavailable(f"SuffixDecoding build failed at step '{step}' (exit status {status}); see {log_path}")


def sdist_url(index_html: str) -> str:
    """The sdist's link on PyPI's simple index page (PEP 503), checked against the pinned sha256."""
    for href in re.findall(r'href="([^"]+)"', index_html):
        url, _, fragment = href.partition("#")
        if url.rsplit("/", 1)[-1] == SDIST:
            if fragment and fragment != f"sha256={SDIST_SHA256}":
                raise ArcticUnavailable(f"PyPI lists {SDIST} with {fragment}, not the pinned sha256={SDIST_SHA256}")
            return url
    raise ArcticUnavailable(f"PyPI's index {INDEX_URL} lists no {SDIST}")


def _download(dest: Path, log_path: Path) -> Path:
    try:
        with urllib.request.urlopen(INDEX_URL, timeout=60) as r:
            url = sdist_url(r.read().decode())
        with urllib.request.urlopen(url, timeout=300) as r:
            data = r.read()
    except OSError as e:
        raise ArcticUnavailable(f"SuffixDecoding build failed at step 'download' ({e})") from e
    digest = hashlib.sha256(data).hexdigest()
    with open(log_path, "a") as out:
        out.write(f"downloaded {url}: {len(data)} bytes, sha256 {digest}\n")
    if digest != SDIST_SHA256:
        raise ArcticUnavailable(f"{SDIST} from PyPI has sha256 {digest}, not the pinned {SDIST_SHA256}")
    dest.write_bytes(data)
    return dest


def _unpack_source(sdist: Path, dest: Path, log_path: Path) -> Path:
    """Only csrc/suffix_decoding leaves the archive."""
    prefix = f"arctic_inference-{VERSION}/{SOURCE_DIR}/"
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Pythons without extraction filters
                tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError) as e:
        with open(log_path, "a") as out:
            out.write(f"unpack {sdist}: {e}\n")
        raise ArcticUnavailable(f"SuffixDecoding build failed at step 'unpack' ({e}); see {log_path}") from e
    source = dest / prefix
    if not (source / "CMakeLists.txt").is_file():
        raise ArcticUnavailable(f"no {SOURCE_DIR}/CMakeLists.txt in {SDIST}")
    return source


def load(build_if_missing: bool = True) -> ModuleType:
    """The extension module (`SuffixTree`, `Draft`), built first if missing and allowed."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    path = build() if build_if_missing else extension_path()
    if not path.is_file():
        raise ArcticUnavailable(available() or f"SuffixDecoding is not built ({path} is missing): call build()")
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


# -- the cache -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArcticConfig:
    """The reference's settings; the defaults are ArcticInference's for vLLM `method="suffix"`."""

    max_tree_depth: int = 64
    """suffix_cache_max_depth: the longest suffix stored, and the longest context matched."""
    max_cached_requests: int = 100_000
    """suffix_cache_max_requests: outputs kept in the global tree (FIFO eviction); 0 = no global tree, -1 = no limit."""
    max_spec_tokens: int = 16
    """num_speculative_tokens, 16 when method="suffix" does not set it."""
    max_spec_factor: float = 1.0
    """A match of length m proposes at most m * max_spec_factor + max_spec_offset tokens."""
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    """Stop a draft when its estimated probability (product of count ratios) falls below this."""
    use_tree_spec: bool = False
    """Several branches (a token tree) instead of one chain; ArcticInference's vLLM path uses a chain."""

    def __post_init__(self) -> None:
        if self.max_tree_depth < 1 or self.max_spec_tokens < 1:
            raise ValueError("max_tree_depth and max_spec_tokens must be >= 1")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")
        if self.max_cached_requests < -1:
            raise ValueError(f"max_cached_requests must be >= -1, got {self.max_cached_requests}")


@dataclass
class Speculation:
    """One draft: tokens (a chain, or a tree through `parents`), their estimated probabilities,
    the score (their sum) and the length of the context match it came from."""

    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    """parents[i]: index of token i's parent in token_ids, -1 for a child of the context."""
    probs: list[float] = field(default_factory=list)
    score: float = 0.0
    match_len: int = 0


class ArcticSuffixCache:
    """The reference's per-request and global suffix trees, driven as its vLLM integration drives them."""

    def __init__(self, config: ArcticConfig | None = None, module: ModuleType | None = None):
        self.config = config or ArcticConfig()
        self._native = module or load()
        self._global = self._native.SuffixTree(self.config.max_tree_depth)
        self._local: dict[Hashable, object] = {}
        self._seq: dict[Hashable, int] = {}  # cached request -> its sequence id in the global tree (FIFO order)
        self._next_seq = 0

    @property
    def active(self) -> list[Hashable]:
        return list(self._local)

    @property
    def cached(self) -> list[Hashable]:
        return list(self._seq)

    def start(self, req_id: Hashable, prompt: Sequence[int]) -> None:
        """A new request: its prompt in its own tree, a slot for its output in the global tree."""
        if req_id in self._local:
            raise ValueError(f"request {req_id!r} is already active")
        tree = self._native.SuffixTree(self.config.max_tree_depth)
        tree.extend(0, [int(t) for t in prompt])
        self._local[req_id] = tree
        if self.config.max_cached_requests != 0:
            if req_id in self._seq:  # a reused id: its earlier output leaves first
                self.evict(req_id)
            self._seq[req_id] = self._fresh_seq()
            self._evict_over_limit(req_id)

    def add(self, req_id: Hashable, tokens: Sequence[int]) -> None:
        """Tokens the target emitted (accepted, recovered or bonus), appended to both trees."""
        tokens = [int(t) for t in tokens]
        self._local[req_id].extend(0, tokens)
        if req_id in self._seq:
            self._global.extend(self._seq[req_id], tokens)

    def speculate(self, req_id: Hashable, context: Sequence[int], max_tokens: int | None = None) -> Speculation:
        """The better-scoring draft of the request's tree and the global tree, continuing `context`
        (the prompt and the output so far; only its last max_tree_depth tokens are matched)."""
        c = self.config
        context = [int(t) for t in context[-c.max_tree_depth:]]
        budget = c.max_spec_tokens if max_tokens is None else max_tokens
        drafts = [tree.speculate(context, budget, c.max_spec_factor, c.max_spec_offset, c.min_token_prob,
                                 c.use_tree_spec) for tree in (self._local[req_id], self._global)]
        best = drafts[0] if drafts[0].score >= drafts[1].score else drafts[1]  # ties go to the request's own tree
        return Speculation(list(best.token_ids), list(best.parents), list(best.probs), float(best.score),
                           int(best.match_len))

    def stop(self, req_id: Hashable) -> None:
        """The request is done: its tree goes, its output stays in the global tree."""
        if self._local.pop(req_id, None) is None:
            raise ValueError(f"request {req_id!r} is not active")

    def evict(self, req_id: Hashable) -> None:
        """Remove the request's output from the global tree."""
        seq = self._seq.pop(req_id, None)
        if seq is None:
            raise ValueError(f"request {req_id!r} is not cached")
        self._global.remove(seq)

    def memory_bytes(self) -> int:
        """The trees' own estimate of their memory."""
        return int(self._global.estimate_memory()) + sum(int(t.estimate_memory()) for t in self._local.values())

    def _fresh_seq(self) -> int:
        in_use = set(self._seq.values())
        while self._next_seq in in_use:
            self._next_seq = (self._next_seq + 1) & 0x7FFFFFFF
        seq, self._next_seq = self._next_seq, (self._next_seq + 1) & 0x7FFFFFFF
        return seq

    def _evict_over_limit(self, newest: Hashable) -> None:
        limit = self.config.max_cached_requests
        while limit > 0 and len(self._seq) > limit:
            self.evict(next(r for r in self._seq if r != newest))
