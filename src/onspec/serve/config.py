"""The server's own options (models, engine, policy and trainer options come from their configs)."""

from __future__ import annotations

from dataclasses import dataclass

from onspec.config import option


@dataclass
class ServerConfig:
    """HTTP server."""

    host: str = option("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server)")
    port: int = option(8000, "port to bind (0 picks a free one; the chosen port is printed)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (401 otherwise)")
    state_dir: str = option("onspec-state", "draft checkpoints live here; a restarted server resumes the last good version")
    no_online: bool = option(False, "do not learn from the served traffic (the draft stays as loaded or resumed)")
    persist_traffic: bool = option(False, "also write the training buffer (user traffic) to the state directory at "
                                   "shutdown and reload it at start; off: traffic is held in memory only")
    max_batch: int = option(8, "most requests decoding together; more wait in a queue")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (413 beyond)")
    served_model_name: str | None = option(None, "model name in /v1/models and responses (default: the target's name)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_tokens_limit", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty")
