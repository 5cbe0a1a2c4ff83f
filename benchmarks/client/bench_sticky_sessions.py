"""Multi-turn sessions through the engine client: sticky (consistent-hash) routing against random.

Many sessions run concurrently; each has a long private prefix (a system prompt and context) and
several turns; every turn resends the whole conversation (history + the model's last answer + a new
user message), as an agent loop does. Sticky routing sends every turn of a session to one engine,
whose prefix cache then holds the conversation; random routing picks any engine per turn.

Measured per routing mode, on the same engines (prefix caches reset between runs, modes
interleaved over rounds so drift in machine load hits both):

* prefix-cache hit rate: prompt tokens served from the engines' prefix caches / prompt tokens, as
  the engines themselves count them (transformers: its PrefixCache statistics; vLLM: the
  ``num_cached_tokens`` of every finished request). Reported over all turns and over follow-up
  turns (the first turn of a session can never hit);
* output tokens/s over the whole workload.

Usage (loopback only, nothing is served):

    python benchmarks/client/bench_sticky_sessions.py --backend transformers --model .cache/tiny-model
    python benchmarks/client/bench_sticky_sessions.py --backend vllm --model .cache/tiny-model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import skyrl_backends as sb
from http_load import machine
from skyrl_backends.client import InferenceEngineClient

BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "transformers": {"dtype": "float32", "engine_init_kwargs": {"prefix_cache_max_tokens": 200_000}},
    "vllm": {"dtype": "float32", "max_model_len": 1024, "seed": 0,
             "engine_init_kwargs": {"distributed_executor_backend": "uni"}},
}


@dataclass
class CacheCounts:
    prompt_tokens: int = 0
    cached_tokens: int = 0


class CacheProbe:
    """Reads an engine's own count of prompt tokens served from its prefix cache."""

    def __init__(self, engine: sb.InferenceEngine) -> None:
        self.engine = engine
        self.counts = CacheCounts()
        if engine.backend == "vllm":
            self._wrap_vllm(engine.impl)
        elif getattr(engine.impl, "prefix_cache", None) is None:
            raise SystemExit(f"backend {engine.backend!r}: no prefix cache statistics to read")

    def _wrap_vllm(self, impl: Any) -> None:
        llm = impl._engine
        original = llm.generate
        counts = self.counts

        async def counted(*args: Any, **kwargs: Any):
            async for out in original(*args, **kwargs):
                if out.finished:
                    counts.prompt_tokens += len(out.prompt_token_ids or [])
                    counts.cached_tokens += int(out.num_cached_tokens or 0)
                yield out

        llm.generate = counted

    def read(self) -> tuple[int, int]:
        if self.engine.backend == "vllm":
            return self.counts.prompt_tokens, self.counts.cached_tokens
        stats = self.engine.impl.prefix_cache.stats
        return stats.queried_tokens, stats.hit_tokens


@dataclass
class RunResult:
    routing: str
    seconds: float
    output_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    followup_prompt_tokens: int = 0
    followup_cached_tokens: int = 0
    per_turn: list[tuple[int, int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def followup_hit_rate(self) -> float:
        return self.followup_cached_tokens / self.followup_prompt_tokens if self.followup_prompt_tokens else 0.0


async def run_workload(client: InferenceEngineClient, probes: list[CacheProbe], args: argparse.Namespace,
                       routing: str, round_index: int) -> RunResult:
    """Every session's turn t runs (concurrently) before any turn t+1, so the engines' cache counts
    can be attributed to turns."""
    rng = random.Random(args.seed)  # the same conversations for every mode and round
    histories = [[rng.randrange(5, 500) for _ in range(args.prefix_tokens)] for _ in range(args.sessions)]
    user_turns = [[[rng.randrange(5, 500) for _ in range(args.turn_tokens)] for _ in range(args.turns)]
                  for _ in range(args.sessions)]
    params = {"max_generate_length": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
    await client.reset_prefix_cache()
    before = [p.read() for p in probes]

    def totals() -> tuple[int, int]:
        now = [p.read() for p in probes]
        return (sum(n[0] - b[0] for n, b in zip(now, before)), sum(n[1] - b[1] for n, b in zip(now, before)))

    per_turn: list[tuple[int, int]] = []
    output_tokens = 0
    start = time.perf_counter()
    for turn in range(args.turns):
        mark = totals()
        outs = await asyncio.gather(*(client.generate([histories[k]], params, session_ids=[f"r{round_index}-s{k}"])
                                      for k in range(args.sessions)))
        for k, out in enumerate(outs):
            output_tokens += len(out[0].token_ids)
            histories[k] = histories[k] + out[0].token_ids + user_turns[k][turn]
        after = totals()
        per_turn.append((after[0] - mark[0], after[1] - mark[1]))
    seconds = time.perf_counter() - start
    prompt_tokens, cached_tokens = totals()
    return RunResult(routing, seconds, output_tokens, prompt_tokens, cached_tokens,
                     followup_prompt_tokens=sum(p for p, _ in per_turn[1:]),
                     followup_cached_tokens=sum(c for _, c in per_turn[1:]), per_turn=per_turn)


async def main_async(args: argparse.Namespace) -> list[RunResult]:
    options = dict(BACKEND_OPTIONS.get(args.backend, {}))
    engines = [sb.create_engine(args.backend, model=args.model, **options) for _ in range(args.engines)]
    probes = [CacheProbe(e) for e in engines]
    results: list[RunResult] = []
    try:
        # Warm-up (first-call costs) on a throwaway client.
        await InferenceEngineClient(engines).generate([[5, 6, 7]] * 4, {"max_generate_length": 4})
        modes = ["random", "consistent_hash"] + (["bounded"] if args.load_factor else [])
        for round_index in range(args.rounds):
            order = modes if round_index % 2 == 0 else modes[::-1]
            for routing in order:
                if routing == "bounded":
                    client = InferenceEngineClient(engines, session_load_factor=args.load_factor)
                else:
                    client = InferenceEngineClient(engines, session_routing=routing)
                result = await run_workload(client, probes, args, routing, round_index)
                results.append(result)
                print(f"round {round_index} {routing:>15}: {result.seconds:6.2f}s {result.tokens_per_s:8.1f} tok/s "
                      f"hit {result.hit_rate:.3f} (follow-up {result.followup_hit_rate:.3f})", flush=True)
    finally:
        for engine in engines:
            await engine.teardown()
    return results


def summarize(results: list[RunResult], args: argparse.Namespace) -> dict[str, Any]:
    def agg(routing: str) -> dict[str, float]:
        runs = [r for r in results if r.routing == routing]
        return {"tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
                "hit_rate": sum(r.cached_tokens for r in runs) / max(1, sum(r.prompt_tokens for r in runs)),
                "followup_hit_rate": sum(r.followup_cached_tokens for r in runs)
                / max(1, sum(r.followup_prompt_tokens for r in runs))}

    sticky, rand = agg("consistent_hash"), agg("random")
    bounded = agg("bounded") if args.load_factor else None
    return {"backend": args.backend, "engines": args.engines, "sessions": args.sessions, "turns": args.turns,
            "prefix_tokens": args.prefix_tokens, "turn_tokens": args.turn_tokens, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "sticky": sticky, "random": rand, "bounded": bounded,
            "load_factor": args.load_factor,
            "tokens_per_s_ratio": sticky["tokens_per_s"] / rand["tokens_per_s"],
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def print_table(summary: dict[str, Any]) -> None:
    s, r = summary["sticky"], summary["random"]
    print()
    print(f"backend {summary['backend']}, {summary['engines']} engines, {summary['sessions']} sessions x "
          f"{summary['turns']} turns, prefix {summary['prefix_tokens']} tokens, +{summary['turn_tokens']} user "
          f"tokens/turn, {summary['max_tokens']} output tokens/turn, {summary['rounds']} rounds; "
          f"{summary['machine']}, {summary['date']}")
    print("| routing | prefix-cache hit rate (all turns) | hit rate (follow-up turns) | output tokens/s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| random (baseline) | {r['hit_rate']:.3f} | {r['followup_hit_rate']:.3f} | "
          f"{r['tokens_per_s']:.1f} | 1.00 |")
    print(f"| sticky (consistent hash) | {s['hit_rate']:.3f} | {s['followup_hit_rate']:.3f} | "
          f"{s['tokens_per_s']:.1f} | {summary['tokens_per_s_ratio']:.2f} |")
    b = summary.get("bounded")
    if b:
        print(f"| sticky, bounded loads (factor {summary['load_factor']}) | {b['hit_rate']:.3f} | "
              f"{b['followup_hit_rate']:.3f} | {b['tokens_per_s']:.1f} | {b['tokens_per_s'] / r['tokens_per_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--model", required=True)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=768)
    parser.add_argument("--turn-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-factor", type=float, default=None,
                        help="also run sticky routing with bounded loads (InferenceEngineClient session_load_factor)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    summary = summarize(results, args)
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
