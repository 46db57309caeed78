"""The server's own options (models, engine, policy and trainer options come from their configs)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from onspec.config import option


@dataclass
class ServerConfig:
    """HTTP server."""

    host: str = option("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server)")
    port: int = option(8000, "port to bind (0 picks a free one; the chosen port is printed)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (401 otherwise, checked before "
                                 "the body is read)")
    protect_metrics: bool = option(False, "require the --api-key on /metrics and /dashboard too (Bearer, or HTTP Basic "
                                   "with the key as password, which a browser asks for)")
    docs: bool = option(False, "serve the API's /docs, /redoc and /openapi.json (off by default; open when on)")
    allowed_hosts: tuple[str, ...] = option((), "a Host header value to accept (repeatable; '*' any, '*.example.com' "
                                            "a domain); default: loopback names when bound to loopback, any otherwise")
    state_dir: str = option("onspec-state", "draft checkpoints live here; a restarted server resumes the last good version")
    no_online: bool = option(False, "do not learn from the served traffic (the draft and the suffix learner stay as "
                             "loaded or resumed)")
    learn: str | None = option(None, "what learns from the served traffic: suffix (the suffix learner learns every "
                               "served output beside the frozen draft, the controller picks per step), draft (the "
                               "draft model distils from the target in the background, no suffix learner), or both; "
                               "default: suffix on onspec's engine, draft under --engine vllm",
                               choices=("suffix", "draft", "both"))
    persist_traffic: bool = option(False, "also write the training buffer (user traffic) to the state directory at "
                                   "shutdown and reload it at start; off: traffic is held in memory only")
    max_batch: int = option(8, "most requests decoding together; more wait in a queue")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (413 beyond)")
    max_queue: int = option(64, "most requests waiting beyond the decoding slots free now (of --max-batch); "
                            "beyond, 429 with Retry-After")
    request_timeout: float | None = option(None, "seconds a request may take from arrival to its last token; then it "
                                           "is stopped with a 504 error (a stream: an error event, then [DONE])")
    shutdown_timeout: float = option(30.0, "on SIGTERM/SIGINT: seconds running requests may take to finish (new ones "
                                     "get 503) before they are ended with an error; then state is saved")
    read_timeout: float = option(20.0, "seconds a client may take to send a request's headers, and again its body "
                                 "(then the connection is closed; a late body gets 408)")
    max_connections: int = option(512, "most open connections plus running requests; beyond, uvicorn answers 503")
    served_model_name: str | None = option(None, "model name in /v1/models and responses (default: the target's name)")

    def resolved(self, engine: str = "onspec") -> "ServerConfig":
        """With --learn left out: what the engine learns by default (suffix on onspec's, the draft
        under vLLM, which runs one speculator per engine and has no place for onspec's suffix learner)."""
        if self.learn is not None:
            return self
        return replace(self, learn="draft" if engine == "vllm" else "suffix")

    @property
    def learns_draft(self) -> bool:
        """A trainer distils the draft from the served traffic."""
        return not self.no_online and self.learn in ("draft", "both")

    @property
    def learns_suffix(self) -> bool:
        """The suffix learner takes in every served output (without it, it serves as resumed)."""
        return not self.no_online and self.learn in (None, "suffix", "both")

    def __post_init__(self) -> None:
        if self.learn not in (None, "suffix", "draft", "both"):
            raise ValueError(f"--learn must be suffix, draft or both, got {self.learn!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_tokens_limit", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        for name in ("request_timeout", "shutdown_timeout", "read_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.protect_metrics and self.api_key is None:
            raise ValueError("--protect-metrics needs --api-key")
