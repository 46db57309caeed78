"""The FastAPI application: OpenAI endpoints, metrics, dashboard, and OpenAI-style errors.

Every way a request can be wrong ends in a JSON error with a 4xx status
({"error": {"message", "type", "param", "code"}}), never a traceback or a hang. What a request
passes before an endpoint sees it (Host, key, body limits, drain) is `guard.py`.

A generation request: the body is checked (its fields, then a cheap length bound on the prompt),
tokenised on a worker thread (never on the event loop), submitted (429 past --max-queue), and then
listened to: the scheduler's events, plus the server's own stops (client gone, --request-timeout,
shutdown). Nothing a body can be refused for costs a tokenizer call."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
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
from onspec.serve.guard import SHUTTING_DOWN, Gate, Guard, Stop, allowed_hosts
from onspec.serve.metrics import ServerMetrics
from onspec.serve.protocol import ChatCompletionRequest, CompletionRequest
from onspec.serve.scheduler import Event, QueueFull, Scheduler

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's completions default is 16


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> Response:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    # ASCII JSON: renders whatever the message holds (a lone surrogate included), never a second error
    body = json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


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
    gate: Gate = field(default_factory=Gate)
    """Generation requests in flight, and the drain at shutdown (`apps/serve.py` starts it on SIGTERM)."""
    kernels: dict = field(default_factory=dict)
    """The host and the kernel path its target runs on (models/kernels.describe), for the banner."""
    cluster: object | None = None
    """In a Ray replica (`cluster/replica.py`): `async health() -> dict` adds every replica's draft
    version to /health, `async exposition(own: bytes) -> bytes` makes /metrics cluster-wide."""

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
    cfg = state.cfg
    docs = cfg.docs
    app = FastAPI(title="onspec", summary="OpenAI-compatible speculative decoding with an online-learning draft",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.onspec = state
    _install_error_handlers(app)
    app.add_middleware(Guard, gate=state.gate, api_key=cfg.api_key, protect_metrics=cfg.protect_metrics,
                       hosts=allowed_hosts(cfg.host, cfg.allowed_hosts), max_body_bytes=cfg.max_body_bytes,
                       read_timeout=cfg.read_timeout, error_response=error_response)
    prompts = _Prompts(state)

    @app.get("/health")
    async def health():
        latest = state.trainer.version if state.trainer is not None else state.engine.draft_version
        # draft_version: serving now; latest: the trainer's newest (goes live at the next verify step)
        body = {"status": "draining" if state.gate.draining else "ok", "draft_version": state.engine.draft_version,
                "latest_draft_version": latest, "drafts": {name: version for name, (version, _) in state.drafts().items()}}
        if state.cluster is not None:
            body.update(await state.cluster.health())
        body.update(state.engine.health())  # vLLM: its live guard too
        return JSONResponse(body, status_code=503 if state.gate.draining else 200)  # draining: take it out of rotation

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "onspec"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        params = _params(body, state, "completion")
        prompt_ids, text = await prompts.completion(body)
        query = Query("http", "http", text=text, domain=body.domain)
        return await _serve(request, state, body, params, prompt_ids, "completion", query)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        params = _params(body, state, "chat")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await prompts.chat(messages)
        query = Query("http", "http", messages=tuple(messages), domain=body.domain)
        return await _serve(request, state, body, params, ids, "chat", query)

    @app.get("/metrics")
    async def metrics():
        refresh_metrics(state)
        text = state.metrics.exposition()
        if state.cluster is not None:
            text = await state.cluster.exposition(text)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(files("onspec.serve").joinpath("dashboard.html").read_text())

    @app.get("/dashboard/data")
    async def dashboard_data():
        refresh_metrics(state)
        trainer = state.trainer.stats() if state.trainer is not None else None
        history = sorted(((m.name, h) for m in state.pool.all_members if m.trainer
                          for h in list(m.trainer.history)[-20:]), key=lambda nh: nh[1].at)[-20:]
        return JSONResponse(_finite({  # a discarded update's loss is NaN: JSON has no NaN, it goes out as null
            "model": state.model_name, "draft_version": state.engine.draft_version, "online": state.trainer is not None,
            "learning": learning(state), "alpha_recent": state.metrics.recent_alpha(), "started": state.metrics.started,
            "running": state.scheduler.running, "waiting": state.scheduler.waiting, "trainer": trainer,
            "timeline": state.metrics.timeline_since(500),
            "drafts": {name: {"version": v, "updates": t["updates"] if t else 0, "rollbacks": t["rollbacks"] if t else 0}
                       for name, (v, t) in state.drafts().items()},
            "updates": [{"draft": name, "version": h.version, "outcome": h.outcome, "loss": h.loss, "probe_before": h.probe_before,
                         "probe_after": h.probe_after, "seconds": h.seconds, "t": h.at - state.metrics.started}
                        for name, h in history],
        }))

    return app


def learning(state: ServerState) -> str:
    """What learns from the traffic now: "suffix", "draft", "suffix+draft" or "nothing"."""
    parts = [name for name, on in (("suffix", state.engine.suffix is not None and not state.engine.suffix.frozen),
                                   ("draft", state.trainer is not None)) if on]
    return "+".join(parts) or "nothing"


# -- request handling ---------------------------------------------------------------------------------


class _Prompts:
    """Prompt text -> token ids on worker threads (a 900 KB prompt must not stall the event loop),
    after a bound that costs nothing: a prompt of more characters than the context could hold even
    at this tokenizer's longest token per position is refused before it is tokenised."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="onspec-prompt")
        self.chars_per_token = max([len(t) for t in state.tokenizer.get_vocab()] or [1])
        self.max_context = state.engine.max_context

    async def completion(self, body: CompletionRequest) -> tuple[list[int], str]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise OpenAIError(400, f"batched prompts are not supported ({len(prompt)} given); send one per request",
                                  param="prompt")
            prompt = prompt[0]
        tokenizer = self.state.tokenizer
        if isinstance(prompt, str):
            self._bound(len(prompt), "prompt")
            return list(await self._run(tokenizer.encode, prompt)), prompt
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        if self.max_context is not None and len(prompt) > self.max_context:
            raise OpenAIError(400, f"the prompt has {len(prompt)} tokens, more than the model's context of "
                              f"{self.max_context}", param="prompt", code="context_length_exceeded")
        return list(prompt), await self._run(tokenizer.decode, prompt)

    async def chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self.state.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, f"the model {self.state.model_name} has no chat template; use /v1/completions")
        self._bound(sum(len(m["content"]) for m in messages), "messages")
        ids = await self._run(partial(tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False))
        return list(ids)

    def _bound(self, chars: int, param: str) -> None:
        if self.max_context is not None and chars > self.max_context * self.chars_per_token:
            raise OpenAIError(400, f"the {param} has {chars} characters: more than the model's context of "
                              f"{self.max_context} tokens could hold even at {self.chars_per_token} characters per token "
                              f"(this tokenizer's longest)", param=param, code="context_length_exceeded")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _params(body, state: ServerState, kind: str) -> SamplingParams:
    """What an HTTP body asks for, checked before its prompt is tokenised (a refused body costs no
    tokenizer time): the server's own limits here, the engine's checks mapped."""
    if body.model is not None and body.model != state.model_name:
        raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves {state.model_name!r}",
                          param="model", code="model_not_found")
    refused = body.unsupported()  # a field this server does not implement, set: never decoded without it
    if refused is not None:
        raise OpenAIError(400, refused[0], param=refused[1], code="unsupported_parameter")
    if body.n != 1:
        raise OpenAIError(400, f"n={body.n} is not supported (only n=1)", param="n")
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS[kind]
    limit = state.cfg.max_tokens_limit
    if not 1 <= max_tokens <= limit:
        raise OpenAIError(400, f"max_tokens must be in [1, {limit}], got {max_tokens}", param="max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 8:
        raise OpenAIError(400, f"at most 8 stop strings, got {len(stop)}", param="stop")
    try:
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                              max_new_tokens=max_tokens, stop=stop, seed=body.seed, ignore_eos=body.ignore_eos)
    except InvalidRequest as e:
        raise _invalid(e, kind) from None


def _request(params: SamplingParams, state: ServerState, kind: str, prompt_ids: list[int]) -> Request:
    """The engine request of checked parameters and a tokenised prompt; the engine's checks (they
    are not repeated here) mapped to a 400."""
    try:
        request = Request(prompt_ids, params)
        state.engine.check(request)
    except InvalidRequest as e:
        raise _invalid(e, kind) from None
    return request


def _invalid(e: InvalidRequest, kind: str) -> OpenAIError:
    param = "messages" if kind == "chat" and e.param == "prompt" else e.param
    return OpenAIError(400, str(e), param=param, code=e.code)


DISCONNECTED = 499  # nginx's "client closed request": nobody reads it
ENDED_BY = {  # a Stop's code -> what the scheduler's log says ended the request
    "client_disconnected": "cancelled by its client",
    "request_timeout": "ended by --request-timeout",
    "server_shutting_down": "ended by the shutdown",
}


class _Listener:
    """One request's events: the scheduler's, and the server's own stops (`Stop`: the client went
    away, the --request-timeout passed, the shutdown drain ended it). `close` cancels the request in
    the scheduler unless it ended there, and unregisters it."""

    def __init__(self, state: ServerState, request: Request, http: HTTPRequest, watch_disconnect: bool) -> None:
        self.state, self.request = state, request
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.ended = False  # the scheduler sent its last event: nothing to cancel
        self.stop: Stop | None = None  # the server's own end of the request, if it gave one
        loop = asyncio.get_running_loop()
        rid = request.request_id
        state.gate.register(rid, self.queue.put_nowait)
        timeout = state.cfg.request_timeout
        self._timer = None if timeout is None else loop.call_later(timeout, self.queue.put_nowait, Stop(
            f"the request did not finish within the server's --request-timeout of {timeout:g} s", 504, "request_timeout"))
        self._watcher = asyncio.ensure_future(self._watch(http)) if watch_disconnect else None

        def sink(ev: Event) -> None:  # called on the decoding thread: must never raise there
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        self.sink = sink

    async def next(self) -> Event:
        ev = await self.queue.get()
        if isinstance(ev, Stop):
            self.stop = self.stop or ev
        elif ev.last:
            self.ended = True
        return ev

    async def _watch(self, http: HTTPRequest) -> None:
        # the body has been read: the next message is the disconnect (or nothing, until the response is sent)
        while (await http.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)
        self.queue.put_nowait(Stop("the client disconnected", DISCONNECTED, "client_disconnected"))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        self.state.gate.unregister(self.request.request_id)
        if not self.ended:  # the client went away, the deadline passed or the server is stopping: free the slot now
            code = self.stop.code if self.stop is not None else "client_disconnected"
            self.state.scheduler.cancel(self.request.request_id, ENDED_BY.get(code, f"ended ({code})"))


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its listener however the stream ends (even unstarted)."""

    def __init__(self, content, listener: _Listener) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.listener = listener

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.listener.close()


async def _serve(http: HTTPRequest, state: ServerState, body, params: SamplingParams, prompt_ids: list[int], kind: str,
                 query: Query):
    request = _request(params, state, kind, prompt_ids)
    if state.gate.ended:
        raise OpenAIError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down")
    listener = _Listener(state, request, http, watch_disconnect=not body.stream)
    try:
        state.scheduler.submit(request, listener.sink, query)
    except QueueFull as e:
        listener.ended = True
        listener.close()
        raise OpenAIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except RuntimeError:  # the scheduler is closed
        listener.ended = True
        listener.close()
        raise OpenAIError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down") from None
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request.request_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(_stream(state, listener, rid, created, kind, include_usage), listener)
    try:
        while True:
            ev = await listener.next()
            if ev.error is not None:
                if ev.status == DISCONNECTED:
                    return Response(status_code=DISCONNECTED)
                return error_response(ev.status, ev.error, type=error_type(ev.status), code=getattr(ev, "code", None))
            if ev.output is not None:
                break
    finally:
        listener.close()
    out = ev.output
    choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
               "finish_reason": out.finish_reason} if kind == "chat" else
              {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": state.model_name, "choices": [choice], "usage": _usage(out), "onspec": _spec(out, ev)}


async def _stream(state: ServerState, listener: _Listener, rid: str, created: int, kind: str, include_usage: bool):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
        if kind == "chat":
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [choice], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    if kind == "chat":
        yield chunk(None, role=True)
    while True:
        ev = await listener.next()
        if ev.error is not None:  # the headers went out with 200: the error is an event, then [DONE]
            err = {"error": {"message": ev.error, "type": error_type(ev.status), "param": None,
                             "code": getattr(ev, "code", None)}}
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
    yield "data: [DONE]\n\n"


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids),
            "total_tokens": len(out.prompt_ids) + len(out.token_ids)}


def _spec(out: RequestOutput, ev: Event) -> dict:
    """The documented per-request extension field."""
    s = out.stats
    return {"accepted_tokens": s.accepted, "evaluated_tokens": s.evaluated, "proposed_tokens": s.proposed,
            "alpha": s.alpha, "mean_accepted_length": s.mean_accepted_length, "verify_steps": s.steps,
            "draft_version": ev.draft_versions[-1] if ev.draft_versions else None,
            "draft_versions": ev.draft_versions, "draft": ev.draft, "route": ev.route,
            "suffix_steps": s.of("suffix").steps, "suffix_proposed_tokens": s.of("suffix").proposed,
            "suffix_accepted_tokens": s.of("suffix").accepted}


def refresh_metrics(state: ServerState) -> None:
    """The gauges that are read, not counted (versions, trainer stats, running/waiting), brought up to date."""
    state.metrics.refresh(state.drafts(), state.scheduler.running, state.scheduler.waiting)
    if state.engine.suffix is not None:
        state.metrics.refresh_suffix(state.engine.suffix.stats())


def _finite(value):
    """`value` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- errors ---------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        errors = exc.errors()
        # our own checks (a lone surrogate, ...) say more than "not a list" from another member of a union
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)]  # not a union member's tag
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), type=error_type(exc.status_code), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
