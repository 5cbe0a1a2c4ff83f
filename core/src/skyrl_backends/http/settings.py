"""The HTTP endpoint's limits, in one place: what the CLI flags set and what each error names.

Defaults follow what a user of vLLM's server would expect (keep-alive 5 s, n up to 128 as OpenAI
allows, 4 MiB bodies) and close the holes a hostile client could use: a body or header trickled
byte by byte, idle connections, unbounded concurrency, and a request fanning out to a huge batch.
Each limit's error says which flag raises it (:data:`FLAGS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class HTTPSettings:
    """Limits and options of the OpenAI-compatible endpoint (see :mod:`skyrl_backends.http`)."""

    # Request size and time. The body deadline holds for the whole body, not each read of it.
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 60.0
    # From a connection's first byte (or the byte after a response) to the end of the request's
    # headers; enforced in the HTTP protocol, before any application code (see protocol.py).
    header_timeout_s: float = 30.0
    # An idle keep-alive connection is closed after this long (uvicorn's timeout_keep_alive).
    keep_alive_timeout_s: float = 5.0
    # Requests in progress at once; one more gets 503 before anything else looks at it.
    max_concurrent_requests: int = 1024
    # Open connections at once (uvicorn's limit_concurrency): idle ones count too.
    max_connections: int = 4096
    # What one request may ask for: prompts in /v1/completions, samples per prompt, and their product.
    max_prompts_per_request: int = 1024
    max_n: int = 128
    max_sequences_per_request: int = 4096
    # Context length (prompt + max_tokens); None: the model's own (config.json) when known.
    max_model_len: int | None = None
    # Host header values accepted (names, without port). None: loopback names when the server binds
    # a loopback address (against DNS rebinding), any otherwise. "*" accepts any.
    allowed_hosts: tuple[str, ...] | None = None
    # uvicorn's log level (vLLM's --uvicorn-log-level).
    uvicorn_log_level: str = "warning"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("max_model_len", "allowed_hosts", "uvicorn_log_level") or value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r} (flag {FLAGS[f.name]})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    def replace(self, **changes: object) -> HTTPSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# The `skyrl-backends serve` flag of each setting, for error messages.
FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(HTTPSettings)}
FLAGS["uvicorn_log_level"] = "--uvicorn-log-level"

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def limit_hint(name: str, settings: HTTPSettings) -> str:
    """``"the limit (max_n=128; raise it with --max-n)"``, for error messages."""
    return f"the server's limit ({name}={getattr(settings, name)}; raise it with `skyrl-backends serve {FLAGS[name]}`)"
