"""The demo's RL step through skyrl against the same step written by hand on the engine's own calls
(issue 23's P8; a benchmark, not a test).

One ``RLTrainer`` (the demo's agent loop, GRPO update and policy) drives one engine, and its steps
take turns between two ways of driving it:

    skyrl  ``RLTrainer.train_step``, as ``make demo`` runs it: the client's wake_up(["kv_cache"]) ->
           the agent loop through the client -> sleep(level) -> the GRPO update ->
           wake_up(["weights"]) -> sync_weights (the demo's strategy: CUDA IPC with the trainer on a
           GPU, shared memory on a CPU)
    own    the same step on the engine's own calls, made on the same engine object
           (``core/benchmarks/engine_own_calls.py``): the same agent loop over the engine's own
           generate, the same update, the engine's own sleep, wake and weight load (one handle per
           parameter, as a hand-written RL loop sends them)

Both sides train the one policy, so the run's reward is that of every step: it must rise, or the
step timed is not a step that learns (printed at the end: the reward of the first and the last
steps). Without sleep mode (vLLM on a CPU) both sides skip the memory phases (``colocate`` off) and
flush the prefix cache after the weights instead.

Steps go in pairs, the pair's first side alternating; the first ``--warmup`` pairs are not counted.
Each step is timed to the end of its GPU work. Printed per phase (the rollout, sleep, update,
wake_weights, sync, wake_kv_cache) and for the step: the median of each side and skyrl / own as a
ratio of medians and paired (the median of the pairs' ratios). Goal (P8): the step <= 1.03x.

    python examples/rl_demo/benchmarks/bench_step.py --backend vllm --model DIR --trainer-device cuda \\
        --engine-option gpu_memory_utilization=0.3 --json out.json
    python examples/rl_demo/benchmarks/bench_step.py --backend vllm --model .cache/tiny-model --pairs 6   # CPU
    python examples/rl_demo/benchmarks/bench_step.py pool call1/vllm-step.json call2/vllm-step.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.testing.provenance import measured_commit
from skyrl_backends.types import Completion, GenerateOutput, TokenVersions
from skyrl_rl_demo.agent_loop import run_agent_loops
from skyrl_rl_demo.cli import _engine_option
from skyrl_rl_demo.metrics import summarize
from skyrl_rl_demo.trainer import RLTrainer, TrainerConfig, rollout_metrics

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "core" / "benchmarks"))
from bench_weight_sync import engine_version, paired  # noqa: E402
from engine_own_calls import OwnCalls, own_calls  # noqa: E402  (the engines' own calls, shared with P4)
from pool_generate import load as load_runs  # noqa: E402  (one setting per pool)

# The phases of a step, as RLTrainer.train_step names them; "rollout" is the rest of the step (the
# agent loop: its generate calls, the environment, the tokenizer).
PHASES = ("wake_kv_cache_s", "rollout_s", "sleep_s", "update_s", "wake_weights_s", "weight_sync_s")
SIDES = ("skyrl", "own")
FINISH_REASONS = {"stop": "stop", "length": "length"}


class OwnGenerator:
    """The agent loop's ``generate`` over the engine's own calls. Tokens are labelled with
    ``version()``, the policy version the engine holds, for the trainer's staleness masks."""

    def __init__(self, own: OwnCalls, version: Any) -> None:
        self.own = own
        self.version = version

    async def generate(self, prompts: list[list[int]], sampling_params: SamplingParams, **_fields: Any
                       ) -> GenerateOutput:
        outs = await self.own.generate(prompts, max_tokens=sampling_params.max_generate_length,
                                       temperature=sampling_params.temperature,
                                       logprobs=sampling_params.logprobs is not None,
                                       stop_token_ids=sampling_params.stop_token_ids)
        version = self.version()
        return GenerateOutput([Completion(token_ids=o.token_ids, logprobs=o.logprobs,
                                          finish_reason=FINISH_REASONS.get(o.finish_reason, "abort"),  # type: ignore[arg-type]
                                          token_versions=TokenVersions.uniform(len(o.token_ids), version))
                               for o in outs])


async def own_step(trainer: RLTrainer, own: OwnCalls, step: int) -> dict[str, Any]:
    """``RLTrainer.train_step``'s step on the engine's own calls (module docstring)."""
    metrics: dict[str, Any] = {"step": step}  # step_s and rollout_s: timed_step

    async def timed(key: str, call: Any) -> Any:
        t0 = time.perf_counter()
        result = await call
        metrics[key] = time.perf_counter() - t0
        return result

    await trainer.resolve_compute_dtype()  # the same forward precision as the skyrl side
    if trainer.colocate:
        await timed("wake_kv_cache_s", own.wake_up(["kv_cache"]))
    generator = OwnGenerator(own, lambda: trainer.policy_version)
    rollout = await run_agent_loops(generator, trainer.make_envs(), trainer.chat, trainer.sampling,
                                    max_turns=trainer.config.turns)
    trainer.last_rollout = rollout
    metrics.update(rollout_metrics(rollout))
    if trainer.colocate:
        await timed("sleep_s", own.sleep(trainer.sleep_level))
    update_started = time.perf_counter()
    metrics.update(trainer.update(rollout))
    metrics["update_s"] = time.perf_counter() - update_started
    if trainer.colocate:
        await timed("wake_weights_s", own.wake_up(["weights"]))
    # A sleep at the trainer's level emptied the prefix cache; without one the load must flush it.
    await timed("weight_sync_s", own.sync(list(trainer.policy.named_parameters()), flush_cache=not trainer.colocate))
    return metrics


async def timed_step(trainer: RLTrainer, own: OwnCalls, side: str, step: int) -> dict[str, Any]:
    """One step of ``side``, timed to the end of its GPU work, with its rollout phase filled in."""
    if side == "skyrl":
        # The engine labels tokens with the versions it received through skyrl; the own side's loads
        # bypass it, so the trainer's count is set to the engine's before each skyrl step (the
        # staleness masks compare the two). The own side labels its tokens with the trainer's count.
        trainer.policy_version = trainer.engine.weight_version
    started = time.perf_counter()
    metrics = await (trainer.train_step(step) if side == "skyrl" else own_step(trainer, own, step))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    metrics["step_s"] = time.perf_counter() - started
    metrics["rollout_s"] = metrics["step_s"] - sum(metrics.get(k, 0.0) for k in PHASES if k != "rollout_s")
    metrics["side"] = side
    return metrics


async def bench(args: argparse.Namespace, keep: Any = lambda result: None) -> dict[str, Any]:
    """The run's steps; ``keep`` gets the result so far after every pair, so that a run stopped by
    its time limit on the GPU machine still leaves the pairs it finished."""
    config = TrainerConfig(model=args.model, backend=args.backend, steps=2 * (args.pairs + args.warmup),
                           seed=args.seed, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                           learning_rate=args.lr, entropy_coef=args.entropy_coef, colocate=not args.no_colocate,
                           trainer_device=args.trainer_device, engine_options=dict(args.engine_option), out_dir="")
    trainer = RLTrainer(config)
    try:
        own = own_calls(args.backend, trainer.engine.impl)
        rows: list[dict[str, Any]] = []
        result = {"rows": rows, "colocate": trainer.colocate, "sleep_level": trainer.sleep_level,
                  "weight_sync": trainer.weight_sync.strategy, "engine_version": engine_version(args.backend)}
        for pair in range(args.warmup + args.pairs):
            order = SIDES if pair % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                metrics = await timed_step(trainer, own, side, len(rows) + 1)
                metrics["warmup"] = pair < args.warmup
                rows.append(metrics)
            last = rows[-2:]
            print(f"pair {pair + 1}/{args.warmup + args.pairs}{' (warm-up)' if pair < args.warmup else ''}: "
                  + ", ".join(f"{m['side']} {m['step_s'] * 1e3:.0f} ms (reward {m['reward_mean']:.2f})" for m in last),
                  flush=True)
            keep(result)
        return result
    finally:
        await trainer.close()


def pairs_of(rows: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """The counted steps as pairs ``{"skyrl": metrics, "own": metrics}``."""
    counted = [r for r in rows if not r["warmup"]]
    return [{r["side"]: r for r in counted[i:i + 2]} for i in range(0, len(counted) - 1, 2)]


def table(pairs: list[dict[str, dict[str, Any]]]) -> list[str]:
    """Per phase and for the step: medians (ms) of each side, skyrl / own of the medians, paired."""
    if not pairs:
        return ["no counted pairs (the run stopped within its warm-up)"]
    lines = [f"{'phase':<16}{'skyrl':>10}{'own':>10}{'skyrl/own (medians)':>22}{'paired':>10}"]
    for key in (*PHASES, "step_s"):
        if key not in pairs[0]["skyrl"] or key not in pairs[0]["own"]:
            continue
        ours, theirs = sides(pairs, key)
        medians, paired_ratio = ratios(pairs, key)
        lines.append(f"{key.removesuffix('_s'):<16}{statistics.median(ours) * 1e3:>10.1f}"
                     f"{statistics.median(theirs) * 1e3:>10.1f}{medians:>22.3f}{paired_ratio:>10.3f}")
    return lines


def sides(pairs: list[dict[str, dict[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    """``key``'s times through skyrl and through the engine's own calls, pair by pair."""
    return [p["skyrl"][key] for p in pairs], [p["own"][key] for p in pairs]


def ratios(pairs: list[dict[str, dict[str, Any]]], key: str) -> tuple[float, float]:
    """skyrl / own for ``key``: the ratio of the medians, and the median of each pair's ratio."""
    ours, theirs = sides(pairs, key)
    return statistics.median(ours) / statistics.median(theirs), paired(ours, theirs)


def learning(rows: list[dict[str, Any]]) -> str:
    """The reward at both ends of the run, and the policy's entropy: a rise to about a third with the
    entropy near 0 is a policy that collapsed onto one answer (one digit of the task's three), not
    one that learned to read the prompt."""
    summary = summarize(rows)  # the demo's own reward windows (the verdict is not printed here)
    w = summary["window"]
    entropy = [r["entropy"] for r in rows]
    return (f"reward over the run ({summary['steps']} steps, both sides): first {w} steps "
            f"{summary['reward_first']:.3f}, last {w} steps {summary['reward_last']:.3f}; policy entropy "
            f"{statistics.mean(entropy[:w]):.2f} -> {statistics.mean(entropy[-w:]):.2f} nats")


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    pairs = pairs_of(result["rows"])
    print(f"\n{args.backend}, {len(pairs)} pairs of steps, colocate {result['colocate']} (sleep level "
          f"{result['sleep_level']}), weight sync {result['weight_sync']}; milliseconds")
    print("\n".join(table(pairs)))
    print(learning(result["rows"]))
    print("goal (issue 23, P8): the step through skyrl <= 1.03x the step on the engine's own calls")


def pool(paths: list[str]) -> None:
    """Pool ``--json`` results of several machine calls (one commit, backend and model)."""
    runs = load_runs(paths, same=("commit", "backend", "engine_version", "model_shape", "colocate",
                                      "trainer_device"))
    per_call = [pairs_of(run["rows"]) for run in runs]
    pairs = [p for own in per_call for p in own]
    first = runs[0]
    print(f"{first['backend']}, {first['model_shape']}, commit {first['commit']}, {len(runs)} calls, "
          f"{len(pairs)} pairs; milliseconds")
    print("\n".join(table(pairs)))
    # Each call's own step ratio beside the pooled one: calls whose steps took different times (a
    # busier machine) can put the pooled ratio of medians above every call's, where the paired
    # ratio, each step against the one beside it, is not moved.
    for run, own in zip(runs, per_call, strict=True):
        step = ""
        if own:
            medians, paired_ratio = ratios(own, "step_s")
            step = f"step {medians:.3f} (medians), {paired_ratio:.3f} (paired); "
        print(f"  {run['date']}: {step}{learning(run['rows'])}")


def model_shape(model: str) -> str:
    config = json.loads((Path(model) / "config.json").read_text())
    return (f"{config.get('model_type')} hidden {config.get('hidden_size')} x {config.get('num_hidden_layers')} "
            f"layers, vocabulary {config.get('vocab_size')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pool"]:
        pool(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("vllm", "sglang"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", type=int, default=20, help="counted pairs of steps (one skyrl step, one own)")
    p.add_argument("--warmup", type=int, default=2, help="pairs of steps run first and not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=TrainerConfig.learning_rate,
                   help="the trainer's learning rate (the demo's default is tuned for the tiny model)")
    p.add_argument("--entropy-coef", type=float, default=TrainerConfig.entropy_coef,
                   help="the entropy bonus (a 1536-wide random model learned the task with 0.1 at --lr 5e-6)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--trainer-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-colocate", action="store_true",
                   help="no sleep / wake (the default where the engine has no sleep mode)")
    p.add_argument("--engine-option", type=_engine_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None, help="write every step's metrics here")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = asyncio.run(bench(args, keep=lambda so_far: write_json(so_far, args)))
    report(result, args)
    return 0


def write_json(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The run's steps so far with what they were measured on (rewritten after every pair)."""
    if not args.json:
        return
    Path(args.json).write_text(json.dumps({
        "benchmark": "rl_step", "backend": args.backend, "model_shape": model_shape(args.model),
        "trainer_device": args.trainer_device, "learning_rate": args.lr, "entropy_coef": args.entropy_coef,
        "commit": measured_commit(ROOT),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **result}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
