"""Shared by the HTTP benchmarks: start an OpenAI-compatible server process on loopback, wait for
it, and drive it with a bounded number of concurrent requests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server command run in its own process group, stopped (the whole group) on exit."""

    def __init__(self, name: str, argv: list[str], port: int, api_key: str | None = None, log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.port, self.api_key = name, argv, port, api_key
        self.log_path = log_path or f"/tmp/bench-{name}-{port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __enter__(self) -> ServerProcess:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/models", headers=self.headers(), timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} was not ready within {timeout_s}s; see {self.log_path}")

    def __exit__(self, *exc_info: object) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    transport_errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.ok, "server_errors": self.server_errors,
                "statuses": dict(self.statuses), "transport_errors": dict(self.transport_errors),
                "seconds": round(self.seconds, 2), "requests_per_s": round(self.requests_per_s, 2),
                "p50_s": round(self.percentile(0.5), 3), "p99_s": round(self.percentile(0.99), 3),
                "mean_s": round(statistics.fmean(self.latencies), 3) if self.latencies else None,
                "completion_tokens": self.completion_tokens}


async def drive(server: ServerProcess, path: str, payloads: list[dict[str, Any]], concurrency: int,
                timeout_s: float = 600.0) -> LoadResult:
    """Send every payload, at most ``concurrency`` at a time (each worker sends one request after
    another), and count statuses; nothing is retried."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    result = LoadResult(requests=len(payloads), seconds=0.0)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), limits=limits,
                                 timeout=httpx.Timeout(timeout_s, connect=60.0)) as client:
        async def worker() -> None:
            while True:
                try:
                    payload = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                try:
                    response = await client.post(path, json=payload)
                except httpx.HTTPError as exc:
                    result.transport_errors[type(exc).__name__] += 1
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.statuses[response.status_code] += 1
                if response.status_code == 200 and response.headers.get("content-type", "").startswith(
                        "application/json"):
                    usage = response.json().get("usage") or {}
                    result.completion_tokens += int(usage.get("completion_tokens") or 0)
                elif response.status_code == 200 and not response.text.rstrip().endswith("data: [DONE]"):
                    result.statuses[200] -= 1  # a stream that did not finish is not a success
                    result.transport_errors["incomplete_stream"] += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def machine() -> str:
    import platform

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.machine()} {model} ({cpus} cpus available), Python {sys.version.split()[0]}"
