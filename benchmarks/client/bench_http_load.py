"""A load run: 1000 concurrent HTTP requests against our endpoint; the count that matters is server
errors (must be 0) and transport errors (connections refused or dropped: must be 0).

The server (``skyrl-backends serve``) runs in its own process on loopback, with an API key; the
requests mix /v1/completions and /v1/chat/completions, streaming and not, with session ids.

    .venv/transformers/bin/python benchmarks/client/bench_http_load.py --model .cache/tiny-model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from http_load import ServerProcess, drive, free_port, machine

MODEL_NAME = "tiny"
API_KEY = "bench-key"


def payloads(count: int, max_tokens: int) -> list[tuple[str, dict]]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog one two three four five".split()
    work = []
    for i in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 24)))
        common = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.7]),
                  "session_id": f"s{i % 97}", "stream": i % 5 == 0}
        if i % 2:
            work.append(("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": text}]}))
        else:
            work.append(("/v1/completions", {**common, "prompt": text}))
    return work


async def run(server: ServerProcess, work: list[tuple[str, dict]], concurrency: int):
    by_path: dict[str, list[dict]] = {}
    for path, payload in work:
        by_path.setdefault(path, []).append(payload)
    share = {path: max(1, concurrency * len(p) // len(work)) for path, p in by_path.items()}
    return await asyncio.gather(*(drive(server, path, p, share[path]) for path, p in by_path.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--num-engines", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    port = free_port()
    argv = [sys.executable, "-m", "skyrl_backends.cli", "serve", "--backend", args.backend, "--model", args.model,
            "--served-model-name", MODEL_NAME, "--port", str(port), "--num-engines", str(args.num_engines),
            "--api-key", API_KEY]
    work = payloads(args.requests, args.max_tokens)
    with ServerProcess("skyrl-load", argv, port, api_key=API_KEY) as server:
        started = time.perf_counter()
        results = asyncio.run(run(server, work, args.concurrency))
        seconds = time.perf_counter() - started
    statuses: dict[int, int] = {}
    transport: dict[str, int] = {}
    for r in results:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r.transport_errors.items():
            transport[k] = transport.get(k, 0) + v
    server_errors = sum(v for k, v in statuses.items() if k >= 500)
    latencies = sorted(x for r in results for x in r.latencies)
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    print()
    print(f"{args.requests} requests, {args.concurrency} concurrent, backend {args.backend} x {args.num_engines} "
          f"engines, {args.max_tokens} output tokens; {machine()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| requests | 200 OK | server errors (5xx) | other statuses | transport errors | wall (s) "
          "| p99 latency (s) |")
    print("|---|---|---|---|---|---|---|")
    others = {k: v for k, v in statuses.items() if k != 200 and k < 500}
    print(f"| {args.requests} | {statuses.get(200, 0)} | {server_errors} | {others or 0} | {transport or 0} | "
          f"{seconds:.1f} | {p99:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"statuses": statuses, "transport_errors": transport, "seconds": seconds, "p99_s": p99,
                       "machine": machine()}, f, indent=2)
    if server_errors or transport or statuses.get(200, 0) != args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
