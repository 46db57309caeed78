"""Named offline models: resolution, part assembly, hash checks and the errors a user sees.

The part-wheel mechanism is tested on real (tiny) installed distributions made in the test: a
package with `data/part01.bin` and a dist-info RECORD carrying its sha256, put on sys.path, so
`importlib.metadata` finds them exactly as it finds the Qwen part wheels.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from onspec.models import registry
from onspec.models.errors import ModelSpecError
from onspec.models.loading import resolve_spec


def _install_fake_part(root: Path, name: str, data: bytes) -> None:
    pkg = name.replace("-", "_")
    (root / pkg / "data").mkdir(parents=True)
    (root / pkg / "__init__.py").write_text("")
    (root / pkg / "data" / "part01.bin").write_bytes(data)
    info = root / f"{pkg}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{pkg}/__init__.py,,\n{pkg}/data/part01.bin,sha256={digest},{len(data)}\n"
                                 f"{pkg}-0.1.0.dist-info/RECORD,,\n")


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(60)), bytes(range(100, 164))]
    root = tmp_path / "site"
    for i, data in enumerate(parts, 1):
        _install_fake_part(root, f"onspec-test-part{i}", data)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    model = registry.NamedModel(name="fake", summary="", file_name="fake.gguf",
                                wheels=("onspec-test-part1", "onspec-test-part2"), version="0.1.0",
                                size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    return model, root, whole


def test_parts_assemble_into_the_checked_file(fake_model):
    model, _, whole = fake_model
    path = registry.gguf_path(model)
    assert path.read_bytes() == whole and path.parent == registry.cache_dir() / "gguf"
    assert registry.gguf_path(model) == path  # second call: the checked copy, no re-assembly


def test_a_missing_part_names_its_wheel(fake_model):
    model, _, _ = fake_model
    broken = registry.NamedModel(**{**model.__dict__, "wheels": (*model.wheels, "onspec-test-part3")})
    with pytest.raises(ModelSpecError, match=r"onspec-test-part3.*not installed.*setup\.sh"):
        registry.gguf_path(broken)


def test_a_corrupt_part_names_its_wheel(fake_model):
    model, root, _ = fake_model
    part = root / "onspec_test_part2" / "data" / "part01.bin"
    data = bytearray(part.read_bytes())
    data[5] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ModelSpecError, match=r"corrupt part wheel\(s\): onspec-test-part2;.*force-reinstall"):
        registry.gguf_path(model)
    assert not (registry.cache_dir() / "gguf" / "fake.gguf").exists()  # nothing half-checked is left


def test_a_truncated_part_is_caught_before_hashing(fake_model):
    model, root, _ = fake_model
    part = root / "onspec_test_part1" / "data" / "part01.bin"
    part.write_bytes(part.read_bytes()[:-3])
    with pytest.raises(ModelSpecError, match=r"add up to .* bytes.*onspec-test-part1"):
        registry.gguf_path(model)


def test_unknown_names_and_paths_get_clear_errors(tmp_path):
    with pytest.raises(ModelSpecError, match=r"unknown model 'qwen-nope'.*onspec models"):
        resolve_spec("qwen-nope")
    with pytest.raises(ModelSpecError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "x.gguf"))
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # an HF id passes through


def test_registry_lists_the_default_pair():
    assert registry.DEFAULT_TARGET == "qwen2.5-coder-1.5b"
    assert registry.DEFAULT_DRAFT[registry.DEFAULT_TARGET] == "qwen2.5-coder-0.5b"
    q = registry.MODELS["qwen2.5-coder-1.5b"]
    assert len(q.wheels) == 22 and q.size == 1_117_320_768 and 151643 in q.eos_token_ids


def test_cli_models_lists_every_name():
    proc = subprocess.run([sys.executable, "-m", "onspec.cli", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in registry.MODELS:
        assert name in proc.stdout


def test_cli_names_a_missing_wheel(tmp_path):
    """A named model whose wheels are absent: exit 2 and a message, not a traceback."""
    code = ("import sys; from onspec.models import registry; from onspec import cli; "
            "m = registry.MODELS['qwen2.5-coder-0.5b']; "
            "registry.MODELS['qwen2.5-coder-0.5b'] = registry.NamedModel(**{**m.__dict__, 'wheels': ('onspec-absent-part',)}); "
            "sys.exit(cli.main(['generate', '--target', 'qwen2.5-coder-0.5b', '--no-draft', '--prompt', 'hi']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "ONSPEC_CACHE": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "onspec-absent-part" in proc.stderr and "Traceback" not in proc.stderr
