"""HTTP requests/s at 64 concurrent clients: our endpoint against vLLM's own OpenAI server, on the
same engine (vLLM), model and engine settings, in the same run.

Each server runs alone on loopback (one after the other, in rounds, so machine-load drift hits
both); the same /v1/completions requests (greedy, ``ignore_eos``, a fixed number of output tokens)
are sent by 64 concurrent workers. Needs the vLLM environment:

    .venv/vllm/bin/python benchmarks/client/bench_http_throughput.py --model .cache/tiny-model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

from http_load import ServerProcess, drive, free_port, machine

MODEL_NAME = "tiny"


def our_server(args: argparse.Namespace, port: int) -> ServerProcess:
    argv = [sys.executable, "-m", "skyrl_backends.cli", "serve", "--backend", "vllm", "--model", args.model,
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--num-engines", "1",
            "--engine-option", "dtype=float32", "--engine-option", f"max_model_len={args.max_model_len}",
            "--engine-option", "seed=0", "--engine-option", f"max_num_seqs={args.max_num_seqs}",
            "--engine-option", f"max_num_batched_tokens={args.max_num_batched_tokens}",
            "--engine-option", f"engine_init_kwargs={{distributed_executor_backend: {args.executor}}}"]
    return ServerProcess("skyrl", argv, port)


def vllm_server(args: argparse.Namespace, port: int) -> ServerProcess:
    # The same engine arguments the vLLM plugin derives on CPU (eager mode, no stats logging, prefix
    # caching on, float32, seed 0) and the same scheduler limits.
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", str(args.max_model_len), "--seed", "0", "--enforce-eager",
            "--disable-log-stats", "--enable-prefix-caching", "--distributed-executor-backend", args.executor,
            "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return ServerProcess("vllm", argv, port)


def payloads(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog one two three four five six seven".split()
    return [{"model": MODEL_NAME, "prompt": " ".join(rng.choice(words) for _ in range(args.prompt_words)),
             "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
            for _ in range(args.requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--executor", default="uni", help="vLLM distributed executor backend for both servers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = payloads(args)
    results: dict[str, list[dict]] = {"vllm": [], "skyrl": []}
    for round_index in range(args.rounds):
        order = ["vllm", "skyrl"] if round_index % 2 == 0 else ["skyrl", "vllm"]
        for name in order:
            port = free_port()
            server = vllm_server(args, port) if name == "vllm" else our_server(args, port)
            with server:
                asyncio.run(drive(server, "/v1/completions", work[: args.concurrency], args.concurrency))  # warm-up
                result = asyncio.run(drive(server, "/v1/completions", work, args.concurrency))
            summary = result.summary()
            results[name].append(summary)
            print(f"round {round_index} {name:>6}: {summary}", flush=True)
    rps = {name: statistics.median(r["requests_per_s"] for r in runs) for name, runs in results.items()}
    print()
    print(f"{args.requests} x /v1/completions ({args.prompt_words} words, {args.max_tokens} output tokens, greedy), "
          f"{args.concurrency} concurrent clients, {args.rounds} rounds (median); {machine()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| server | requests/s | server errors | p50 latency (s) | p99 latency (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, label in (("vllm", "vLLM OpenAI server (baseline)"), ("skyrl", "skyrl-backends endpoint")):
        last = results[name][-1]
        errors = sum(r["server_errors"] + sum(r["transport_errors"].values()) for r in results[name])
        print(f"| {label} | {rps[name]:.1f} | {errors} | {last['p50_s']} | {last['p99_s']} | "
              f"{rps[name] / rps['vllm']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "requests_per_s": rps, "ratio": rps["skyrl"] / rps["vllm"],
                       "machine": machine()}, f, indent=2)


if __name__ == "__main__":
    main()
