"""The FastAPI application: OpenAI endpoints, metrics, dashboard, and OpenAI-style errors.

Every way a request can be wrong ends in a JSON error with a 4xx status
({"error": {"message", "type", "param", "code"}}), never a traceback or a hang."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from importlib.resources import files

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from onspec.data.streams import Query
from onspec.engine.engine import Request, SpeculativeEngine
from onspec.engine.records import RequestOutput
from onspec.engine.sampling import InvalidRequest, SamplingParams
from onspec.pool.pool import DraftPool
from onspec.pool.routers import Router
from onspec.serve.config import ServerConfig
from onspec.serve.metrics import ServerMetrics
from onspec.serve.protocol import ChatCompletionRequest, CompletionRequest
from onspec.serve.scheduler import Event, Scheduler

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's completions default is 16


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


@dataclass
class ServerState:
    engine: SpeculativeEngine
    scheduler: Scheduler
    metrics: ServerMetrics
    cfg: ServerConfig
    model_name: str
    pool: DraftPool
    """The drafts (a pool of one when there is a single draft); `engine` is the general draft's."""
    router: Router | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def trainer(self):
        """The general draft's trainer (None when not learning online)."""
        return self.pool.general.trainer

    def drafts(self) -> dict:
        """name -> (serving version, trainer stats or None) for every pool member."""
        return {m.name: (m.version, m.trainer.stats() if m.trainer else None) for m in self.pool.all_members}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="onspec", summary="OpenAI-compatible speculative decoding with an online-learning draft")
    app.state.onspec = state
    _install_error_handlers(app)
    _install_body_limit(app, state.cfg.max_body_bytes)

    @app.get("/health")
    async def health():
        latest = state.trainer.version if state.trainer is not None else state.engine.draft_version
        # draft_version: serving now; latest: the trainer's newest (goes live at the next verify step)
        return {"status": "ok", "draft_version": state.engine.draft_version, "latest_draft_version": latest,
                "drafts": {name: version for name, (version, _) in state.drafts().items()}}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        _authorize(request, state)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "onspec"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        _authorize(request, state)
        prompt_ids = _completion_prompt(body, state)
        text = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if body.prompt and isinstance(
            body.prompt[0], str) else state.tokenizer.decode(prompt_ids))
        query = Query("http", "http", text=text, domain=body.domain)
        return await _serve(request, state, body, prompt_ids, "completion", query)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        _authorize(request, state)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        tokenizer = state.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, f"the model {state.model_name} has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        query = Query("http", "http", messages=tuple(messages), domain=body.domain)
        return await _serve(request, state, body, list(ids), "chat", query)

    @app.get("/metrics")
    async def metrics():
        _refresh_metrics(state)
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(files("onspec.serve").joinpath("dashboard.html").read_text())

    @app.get("/dashboard/data")
    async def dashboard_data():
        _refresh_metrics(state)
        trainer = state.trainer.stats() if state.trainer is not None else None
        history = sorted(((m.name, h) for m in state.pool.all_members if m.trainer
                          for h in list(m.trainer.distiller.history)[-20:]), key=lambda nh: nh[1].at)[-20:]
        return {
            "model": state.model_name, "draft_version": state.engine.draft_version, "online": state.trainer is not None,
            "alpha_recent": state.metrics.recent_alpha(), "started": state.metrics.started,
            "running": state.scheduler.running, "waiting": state.scheduler.waiting, "trainer": trainer,
            "timeline": state.metrics.timeline_since(500),
            "drafts": {name: {"version": v, "updates": t["updates"] if t else 0, "rollbacks": t["rollbacks"] if t else 0}
                       for name, (v, t) in state.drafts().items()},
            "updates": [{"draft": name, "version": h.version, "outcome": h.outcome, "loss": h.loss, "probe_before": h.probe_before,
                         "probe_after": h.probe_after, "seconds": h.seconds, "t": h.at - state.metrics.started}
                        for name, h in history],
        }

    return app


# -- request handling ---------------------------------------------------------------------------------


def _authorize(request: HTTPRequest, state: ServerState) -> None:
    key = state.cfg.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {key}":
        raise OpenAIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                          type="authentication_error", code="invalid_api_key")


def _completion_prompt(body: CompletionRequest, state: ServerState) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise OpenAIError(400, f"batched prompts are not supported ({len(prompt)} given); send one per request",
                              param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(state.tokenizer.encode(prompt))
    vocab = len(state.tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


def _request(body, state: ServerState, kind: str, prompt_ids: list[int]) -> Request:
    """The engine request of an HTTP body: the server's own limits here, the engine's checks mapped."""
    if body.model is not None and body.model != state.model_name:
        raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves {state.model_name!r}",
                          param="model", code="model_not_found")
    if body.n != 1:
        raise OpenAIError(400, f"n={body.n} is not supported (only n=1)", param="n")
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS[kind]
    limit = state.cfg.max_tokens_limit
    if not 1 <= max_tokens <= limit:
        raise OpenAIError(400, f"max_tokens must be in [1, {limit}], got {max_tokens}", param="max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 8:
        raise OpenAIError(400, f"at most 8 stop strings, got {len(stop)}", param="stop")
    try:  # the engine's own checks, mapped to a 400 (they are not repeated here)
        params = SamplingParams(temperature=body.temperature, top_p=body.top_p, max_new_tokens=max_tokens, stop=stop,
                                seed=body.seed, ignore_eos=body.ignore_eos)
        request = Request(prompt_ids, params)
        state.engine.check(request)
    except InvalidRequest as e:
        param = "messages" if kind == "chat" and e.param == "prompt" else e.param
        raise OpenAIError(400, str(e), param=param, code=e.code) from None
    return request


async def _serve(http: HTTPRequest, state: ServerState, body, prompt_ids: list[int], kind: str, query: Query):
    request = _request(body, state, kind, prompt_ids)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    state.scheduler.submit(request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), query)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request.request_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, request, events, rid, created, kind, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        text = []
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    state.scheduler.cancel(request.request_id)
                    return Response(status_code=499)
                continue
            text.append(ev.delta)
            if ev.error is not None:
                return error_response(ev.status, ev.error,
                                      type="invalid_request_error" if ev.status < 500 else "server_error")
            if ev.output is not None:
                break
    except asyncio.CancelledError:
        state.scheduler.cancel(request.request_id)
        raise
    out = ev.output
    choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
               "finish_reason": out.finish_reason} if kind == "chat" else
              {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": state.model_name, "choices": [choice], "usage": _usage(out), "onspec": _spec(out, ev)}


async def _stream(state: ServerState, request: Request, events: asyncio.Queue, rid: str, created: int, kind: str,
                  include_usage: bool):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
        if kind == "chat":
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [choice], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    done = False
    try:
        if kind == "chat":
            yield chunk(None, role=True)
        while True:
            ev = await events.get()
            if ev.error is not None:
                err = {"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev.delta:
                yield chunk(ev.delta)
            if ev.output is not None:
                out = ev.output
                yield chunk(None if kind == "chat" else "", finish=out.finish_reason, onspec=_spec(out, ev))
                if include_usage:
                    usage = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [],
                             "usage": _usage(out)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away (or the server stopped): free the slot now
            state.scheduler.cancel(request.request_id)


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids),
            "total_tokens": len(out.prompt_ids) + len(out.token_ids)}


def _spec(out: RequestOutput, ev: Event) -> dict:
    """The documented per-request extension field."""
    s = out.stats
    return {"accepted_tokens": s.accepted, "evaluated_tokens": s.evaluated, "proposed_tokens": s.proposed,
            "alpha": s.alpha, "mean_accepted_length": s.mean_accepted_length, "verify_steps": s.steps,
            "draft_version": ev.draft_versions[-1] if ev.draft_versions else None,
            "draft_versions": ev.draft_versions, "draft": ev.draft, "route": ev.route}


def _refresh_metrics(state: ServerState) -> None:
    state.metrics.refresh(state.drafts(), state.scheduler.running, state.scheduler.waiting)


# -- errors ---------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500
                              else "server_error")

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def _install_body_limit(app: FastAPI, limit: int) -> None:
    """413 for a body over `limit` bytes, whether it says its length up front or streams it."""

    class BodyLimit:
        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return await _too_large(scope, receive, send, limit)
            seen = 0

            async def counted():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge()
                return message

            try:
                await self.inner(scope, counted, send)
            except _BodyTooLarge:
                await _too_large(scope, receive, send, limit)

    app.add_middleware(BodyLimit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(scope, receive, send, limit: int) -> None:
    response = error_response(413, f"the request body is larger than {limit} bytes")
    await response(scope, receive, send)
