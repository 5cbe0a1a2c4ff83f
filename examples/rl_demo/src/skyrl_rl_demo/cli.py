"""``python -m skyrl_rl_demo``: train the tiny policy with RL on the backend named on the command line."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any

from skyrl_backends.engine_options import HELP as ENGINE_OPTION_HELP
from skyrl_backends.engine_options import parse_engine_option
from skyrl_backends.errors import ConfigError

from skyrl_rl_demo.metrics import WINDOW, learned_bar
from skyrl_rl_demo.trainer import COMPUTE_DTYPES, TrainerConfig, train


def _engine_option(text: str) -> tuple[str, Any]:
    try:
        return parse_engine_option(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainerConfig(model="")
    p = argparse.ArgumentParser(prog="python -m skyrl_rl_demo", description=__doc__)
    p.add_argument("--backend", default=defaults.backend, help="backend name (see `skyrl-backends plugins`)")
    p.add_argument("--model", required=True, help="local Hugging Face model folder (e.g. .cache/tiny-model)")
    p.add_argument("--out", default=defaults.out_dir, help="output folder for metrics.csv, reward_curve.png, "
                                                           "summary.json")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    p.add_argument("--group-size", type=int, default=defaults.group_size)
    p.add_argument("--digits", default=defaults.digits, help="the digits the task asks for")
    p.add_argument("--lr", type=float, default=defaults.learning_rate)
    p.add_argument("--entropy-coef", type=float, default=defaults.entropy_coef,
                   help="weight of the entropy bonus in the loss")
    p.add_argument("--max-generate-length", type=int, default=defaults.max_generate_length)
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--no-colocate", action="store_true", help="keep the engine awake (no sleep/wake cycle)")
    p.add_argument("--async", dest="async_rollouts", action="store_true",
                   help="generate step t+1 while training on step t (at most one version of staleness; "
                        "implies --no-colocate)")
    p.add_argument("--max-staleness", type=int, default=defaults.max_staleness,
                   help="tokens more versions behind the trained policy than this are dropped from the loss")
    p.add_argument("--sleep-level", type=int, default=None, help="default: the backend's highest level")
    p.add_argument("--num-engines", type=int, default=defaults.num_engines,
                   help="engines behind the client (each gets a share of every batch)")
    p.add_argument("--weight-sync", default=defaults.weight_sync,
                   choices=["auto", "tensors", "shared_memory", "cuda_ipc"],
                   help="auto: CUDA IPC for a GPU trainer, else shared memory, when the engines support it")
    p.add_argument("--trainer-device", default=defaults.trainer_device, help="device of the trainer's model")
    p.add_argument("--trainer-compute-dtype", choices=COMPUTE_DTYPES, default=defaults.trainer_compute_dtype,
                   help="dtype of the trainer's forward: the one the engine serves its weights in (autocast; "
                        "weights and optimizer stay float32), or float32")
    p.add_argument("--engine-option", type=_engine_option, action="append", default=[], metavar="KEY=VALUE",
                   help=f"generator config option for the engine: {ENGINE_OPTION_HELP}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar on screen: the training loop's
    config = TrainerConfig(
        model=args.model, backend=args.backend, out_dir=args.out, steps=args.steps, seed=args.seed,
        digits=args.digits, prompts_per_step=args.prompts_per_step, group_size=args.group_size, learning_rate=args.lr, entropy_coef=args.entropy_coef,
        max_generate_length=args.max_generate_length, temperature=args.temperature,
        colocate=not (args.no_colocate or args.async_rollouts), sleep_level=args.sleep_level,
        num_engines=args.num_engines, weight_sync=args.weight_sync, trainer_device=args.trainer_device,
        engine_options=dict(args.engine_option), async_rollouts=args.async_rollouts,
        max_staleness=args.max_staleness, trainer_compute_dtype=args.trainer_compute_dtype)
    summary = asyncio.run(train(config, progress=not args.no_progress))
    print(format_summary(summary, args.out))
    return 0


def format_summary(s: dict[str, Any], out_dir: str) -> str:
    w = s["window"]
    ratio = "inf" if math.isinf(s["reward_ratio"]) else f"{s['reward_ratio']:.1f}x"
    if s["failed_test"] == "fixed_answer":
        fixed = s["fixed_answer_reward"]
        why = (f"the last-window reward is not above {learned_bar(fixed):.2f}: one fixed answer earns "
               f"{fixed:.2f} without reading the prompt")
    else:
        why = "last-window reward < 2x the first"
    verdict = {True: "learned", False: f"did NOT learn ({why})",
               None: f"too short to judge (needs {2 * WINDOW} steps)"}[s["learned"]]
    cycle = (f"colocated, sleep level {s['sleep_level']}" if s["colocate"] else "not colocated (no sleep/wake)")
    schedule = ("asynchronous: step t+1 generated while step t trains" if s["schedule"] == "async"
                else "synchronous")
    lines = [
        f"{s['backend']} backend, seed {s['seed']}, {s['steps']} steps in {s['wall_s']:.0f}s ({cycle})",
        f"  schedule: {schedule}; {s['steps_per_s']:.2f} steps/s",
        f"  mean reward, first {w} steps: {s['reward_first']:.3f}   last {w} steps: {s['reward_last']:.3f}"
        f"   ({ratio}): {verdict}",
        f"  exact answers, first {w} steps: {s['exact_first']:.1%}   last {w} steps: {s['exact_last']:.1%}",
        f"  per step: generation {s.get('generation_s_mean', 0):.3f}s "
        f"({s.get('generation_tokens_per_s_mean', 0):.0f} tok/s), update {s.get('update_s_mean', 0):.3f}s, "
        f"weight sync ({s['weight_sync']}) {s.get('weight_sync_s_mean', 0) * 1e3:.1f}ms",
    ]
    if s["colocate"]:
        lines.append(f"  sleep {s.get('sleep_s_mean', 0) * 1e3:.1f}ms, wake kv_cache "
                     f"{s.get('wake_kv_cache_s_mean', 0) * 1e3:.1f}ms, wake weights "
                     f"{s.get('wake_weights_s_mean', 0) * 1e3:.1f}ms")
    if s["schedule"] == "async":
        lines.append(f"  tokens one version stale: {s.get('stale_token_fraction_mean', 0):.1%} (weighted by the "
                     f"clipped ratio), dropped: {s.get('dropped_token_fraction_max', 0):.1%}; training waited "
                     f"{s.get('generation_wait_s_mean', 0):.3f}s per step for generation")
    lines.append(f"  engine vs trainer log-probabilities (on-policy tokens): max |diff| "
                 f"{s.get('logprob_abs_diff_max', float('nan')):.2e} (the trainer computes in "
                 f"{s.get('trainer_compute_dtype', 'float32')})")
    lines.append(f"  wrote {out_dir}/metrics.csv, {out_dir}/reward_curve.png, {out_dir}/summary.json")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
