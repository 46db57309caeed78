"""What every HTTP request passes before an endpoint sees it, and the drain at shutdown.

`Guard` (pure ASGI, so it runs before FastAPI reads or validates a body), in order:
1. the Host header against an allow-list (a DNS-rebinding page must not reach a loopback server): 400;
2. while draining for shutdown, a new generation request: 503;
3. the API key (constant-time compare) on /v1/*, and on /metrics and /dashboard when asked: 401;
4. the body: at most `max_body_bytes` (413) and whole within `read_timeout` seconds (408).
Every refusal is an OpenAI-shaped JSON error.

`Gate` counts the generation requests in flight and keeps a way to stop each one: on SIGTERM the
server drains (new requests get 503, running ones may finish for `--shutdown-timeout` seconds),
then ends the rest with an error event of their own (a stream gets an error event and [DONE])."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
from typing import Callable

from starlette.exceptions import HTTPException

from onspec.serve.scheduler import Event

log = logging.getLogger("onspec.serve")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SHUTTING_DOWN = "the server is shutting down; retry on another replica or after the restart"


class Gate:
    """The generation requests in flight (counted by `Guard`, each with a stop registered by the
    endpoint), and the shutdown drain over them. Touched on the event loop only."""

    def __init__(self) -> None:
        self.active = 0
        """Generation requests inside the app (reading, tokenising, queued, decoding, streaming)."""
        self.draining = False
        """New generation requests are refused (503)."""
        self.ended = False
        """The drain is over: requests still running were stopped, and any that reach the scheduler now are refused."""
        self._stops: dict[str, Callable[[Event], None]] = {}

    def register(self, request_id: str, stop: Callable[[Event], None]) -> None:
        self._stops[request_id] = stop

    def unregister(self, request_id: str) -> None:
        self._stops.pop(request_id, None)

    def end_all(self) -> None:
        """Stop every registered request now with a 503 of its own."""
        self.ended = True
        for stop in list(self._stops.values()):
            stop(Stop(error=SHUTTING_DOWN, status=503, code="server_shutting_down"))

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to `timeout` s for the running ones; end the rest."""
        loop = asyncio.get_running_loop()
        self.draining = True
        log.info("shutting down: draining %d running request(s) for up to %g s (new ones get 503)", self.active, timeout)
        deadline = loop.time() + timeout
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.active:
            log.warning("shutting down: ending %d request(s) still running after %g s with an error", self.active,
                        timeout)
        self.end_all()
        deadline = loop.time() + 5  # long enough to send each its error
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.05)


class Stop(Event):
    """An end the server gives a request (deadline, drain, client gone), not the scheduler."""

    def __init__(self, error: str, status: int, code: str) -> None:
        super().__init__(error=error, status=status)
        self.code = code


def allowed_hosts(bind: str, configured: tuple[str, ...]) -> tuple[str, ...] | None:
    """The Host names to accept: those configured, loopback names when bound to loopback, else any (None)."""
    names = tuple(n.strip().lower() for item in configured for n in item.split(",") if n.strip())
    if names:
        return None if "*" in names else names
    return LOOPBACK_HOSTS if is_loopback(bind) else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    def __init__(self, app, *, gate: Gate, api_key: str | None, protect_metrics: bool, hosts: tuple[str, ...] | None,
                 max_body_bytes: int, read_timeout: float, error_response) -> None:
        self.app, self.gate, self.hosts = app, gate, hosts
        self.max_body_bytes, self.read_timeout, self.error_response = max_body_bytes, read_timeout, error_response
        self.key = api_key.encode() if api_key is not None else None
        self.protected = ("/v1/", "/metrics", "/dashboard") if protect_metrics else ("/v1/",)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope["path"]
        if self.hosts is not None and not _host_allowed(headers.get(b"host", b""), self.hosts):
            return await self._refuse(scope, receive, send, 400, "the Host header is not one this server answers to "
                                      "(see --allowed-hosts)", code="invalid_host")
        generation = path.startswith("/v1/") and scope["method"] == "POST"
        if generation and self.gate.draining:
            return await self._refuse(scope, receive, send, 503, SHUTTING_DOWN, type="server_error",
                                      code="server_shutting_down", headers={"Retry-After": "5", "Connection": "close"})
        if self.key is not None and path.startswith(self.protected) and not self._authorized(headers):
            basic = path.startswith(("/metrics", "/dashboard"))  # a browser asks for Basic credentials itself
            return await self._refuse(scope, receive, send, 401, "missing or invalid API key (send 'Authorization: "
                                      "Bearer <key>')", type="authentication_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": 'Basic realm="onspec"' if basic else "Bearer"})
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._refuse(scope, receive, send, 413, self._too_large, headers={"Connection": "close"})
        if generation:
            self.gate.active += 1
        try:
            await self.app(scope, self._bounded(receive), send)
        finally:
            if generation:
                self.gate.active -= 1

    @property
    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body_bytes} bytes"

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() == b"basic":  # user:key, the user is ignored
            try:
                credentials = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self.key)

    def _bounded(self, receive):
        """`receive` with the body limits: 413 past `max_body_bytes`, 408 when the whole body takes
        longer than `read_timeout` s (raised as HTTPException: FastAPI passes those through)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        seen, done = 0, False

        async def bounded():
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.read_timeout:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] != "http.request":
                done = True
                return message
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise HTTPException(413, self._too_large, headers={"Connection": "close"})
            done = not message.get("more_body", False)
            return message

        return bounded

    async def _refuse(self, scope, receive, send, status: int, message: str, type: str = "invalid_request_error",
                      code: str | None = None, headers: dict | None = None) -> None:
        response = self.error_response(status, message, type=type, code=code)
        response.headers.update(headers or {})
        await response(scope, receive, send)


def _host_allowed(host: bytes, allowed: tuple[str, ...]) -> bool:
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if not name:
        return False
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)
