"""A batch through the engine client while one of its in-process engines is torn down.

Each round runs the same greedy batch twice on fresh clients: undisturbed on the surviving engines
(the baseline), then over the survivors plus a victim engine that is torn down while it generates
its share. Printed per round: both times, their ratio, how many of the victim's sequences were
continued (from their partial output) and how many started over, and whether every output equals
the undisturbed one. A new victim is created for every round.

Usage (loopback only, nothing is served):

    python benchmarks/client/bench_teardown_failover.py --backend transformers --model .cache/tiny-model
    python benchmarks/client/bench_teardown_failover.py --backend vllm --model .cache/tiny-model --survivors 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import skyrl_backends as sb
from http_load import machine
from skyrl_backends.client import InferenceEngineClient

BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "transformers": {"dtype": "float32"},
    "vllm": {"dtype": "float32", "max_model_len": 1024, "seed": 0,
             "engine_init_kwargs": {"distributed_executor_backend": "uni"}},
}


class Recorder:
    """Delegates to an engine and keeps the prompts it was asked to generate for."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.prompts: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request: Any) -> Any:
        self.prompts.extend(request.prompt_token_ids)
        return await self._engine.generate(request)


async def one_round(args: argparse.Namespace, survivors: list[Any], batch: list[list[int]],
                    params: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    reference = (await InferenceEngineClient(survivors).generate(batch, params)).response_ids
    undisturbed = time.perf_counter() - started
    victim = Recorder(sb.create_engine(args.backend, model=args.model, **BACKEND_OPTIONS[args.backend]))
    recorders = [Recorder(e) for e in survivors]
    client = InferenceEngineClient(recorders + [victim], request_timeout=args.request_timeout)
    victim_id = client.engine_ids[-1]
    started = time.perf_counter()
    task = asyncio.create_task(client.generate(batch, params))
    while client.health()[victim_id]["inflight"] == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(args.cut_after)
    teardown = asyncio.create_task(victim.teardown())
    out = await task
    disturbed = time.perf_counter() - started
    await teardown
    # Counted from what the surviving engines were asked: a victim's prompt again (started over), or
    # a victim's prompt followed by tokens it had generated (continued).
    asked = [p for r in recorders for p in r.prompts]
    restarted = sum(p in victim.prompts for p in asked)
    continued = sum(any(len(q) > len(p) and q[:len(p)] == p for q in asked) for p in victim.prompts)
    health = client.health()
    return {"undisturbed": undisturbed, "disturbed": disturbed, "exact": out.response_ids == reference,
            "victim_share": len(victim.prompts), "continued": continued, "restarted": restarted,
            "unhealthy": [e for e, h in health.items() if not h["healthy"]]}


async def main(args: argparse.Namespace) -> None:
    options = BACKEND_OPTIONS[args.backend]
    survivors = [sb.create_engine(args.backend, model=args.model, **options) for _ in range(args.survivors)]
    batch = [[50 + (i * 7 + j * 3) % 400 for j in range(5)] for i in range(args.prompts)]
    params = {"max_generate_length": args.tokens, "temperature": 0.0, "ignore_eos": True}
    print(f"# {args.backend}: {args.prompts} prompts x {args.tokens} tokens (greedy); {args.survivors} surviving "
          f"engine(s) + 1 torn down {args.cut_after}s after it starts; request_timeout {args.request_timeout}s; "
          f"{machine()}")
    print("| round | undisturbed (s) | with teardown (s) | ratio | victim's sequences | continued | started over "
          "| exact | unhealthy after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    try:
        await InferenceEngineClient(survivors).generate(batch[:2], params)  # warm-up
        for number in range(args.rounds):
            r = await one_round(args, survivors, batch, params)
            ratios.append(r["disturbed"] / r["undisturbed"])
            print(f"| {number + 1} | {r['undisturbed']:.2f} | {r['disturbed']:.2f} | {ratios[-1]:.2f} | "
                  f"{r['victim_share']} | {r['continued']} | {r['restarted']} | {r['exact']} | "
                  f"{', '.join(r['unhealthy'])} |", flush=True)
    finally:
        for engine in survivors:
            await engine.teardown()
    print(f"# median ratio (with teardown / undisturbed): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(BACKEND_OPTIONS), default="transformers")
    parser.add_argument("--model", required=True)
    parser.add_argument("--survivors", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cut-after", type=float, default=0.3,
                        help="seconds between the victim's start and its teardown")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    asyncio.run(main(parser.parse_args()))
