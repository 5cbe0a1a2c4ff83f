"""``skyrl-backends consistency BACKEND --model DIR``: how far a backend's log-probabilities are
from a trainer's.

Registered into the core CLI through ``add_subcommand``. Generates the fixed rollouts of
:mod:`.plan` on the backend, recomputes every token's log-probability with a Hugging Face forward
pass in the trainer's dtype and in float32, prints the gap and writes the JSON report that
``docs/consistency.md`` is generated from. A variant of an engine (an fp32 LM head, batch-invariant
kernels) is given as engine options or environment variables plus a ``--label`` naming the column::

    skyrl-backends consistency vllm --model DIR --dtype bfloat16 --label fp32-head \\
        --engine-option 'engine_init_kwargs={"hf_overrides": {"head_dtype": "float32"}}' \\
        --trainer-lm-head float32 --report out/vllm-fp32-head.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

LABEL = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "consistency", help="measure how far a backend's log-probabilities are from a trainer's",
        description="Generate fixed rollouts on BACKEND, recompute their log-probabilities as a trainer would "
                    "(Hugging Face, teacher-forced, in the trainer's dtype and in float32) and report the gap.")
    parser.add_argument("backend", help="the backend's name (as `skyrl-backends plugins` lists it)")
    parser.add_argument("--model", default=None,
                        help="model folder (default: the tiny test model, built offline on first use)")
    parser.add_argument("--dtype", default="bfloat16", help="the engine's dtype (default bfloat16)")
    parser.add_argument("--trainer-dtype", default=None, help="the trainer's dtype (default: the engine's)")
    parser.add_argument("--trainer-lm-head", default="model", choices=("model", "float32"),
                        help="float32: the trainer computes its logits in float32, as with an fp32 LM head")
    parser.add_argument("--trainer-device", default=None, help="where the trainer's forward runs (default: cuda "
                                                               "when available, else cpu)")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra create_engine option (VALUE parsed as JSON when it can be), repeatable")
    parser.add_argument("--label", default="", help="the variant's name, appended to the column (e.g. fp32-head)")
    parser.add_argument("--lengths", default=None, metavar="TOKENSxPROMPTS,...",
                        help="response lengths and prompts per length (default 32x8,256x4,1000x2)")
    parser.add_argument("--unseeded", action="store_true",
                        help="requests carry no seed (only the engine does); see skyrl_backends.consistency.plan")
    parser.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    parser.set_defaults(func=run)


def parse_engine_options(items: list[str]) -> dict[str, Any]:
    from skyrl_backends.errors import ConfigError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--engine-option", f"{item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_config(args: argparse.Namespace) -> Any:
    from skyrl_backends.consistency.plan import DEFAULT_PLAN, parse_lengths
    from skyrl_backends.consistency.runner import RunConfig
    from skyrl_backends.errors import ConfigError

    if args.label and not LABEL.match(args.label):
        raise ConfigError("--label", f"{args.label!r}: use lower-case letters, digits and dashes (e.g. fp32-head)")
    plan = DEFAULT_PLAN
    if args.lengths:
        plan = dataclasses.replace(plan, lengths=parse_lengths(args.lengths))
    if args.unseeded:
        plan = dataclasses.replace(plan, seeded=False)
    model = args.model
    if model is None:
        from skyrl_backends.conformance.pytest_plugin import default_model_dir

        model = default_model_dir()
    return RunConfig(backend=args.backend, model=str(Path(model).resolve()), dtype=args.dtype,
                     engine_options=parse_engine_options(args.engine_option), trainer_dtype=args.trainer_dtype,
                     trainer_lm_head=args.trainer_lm_head, trainer_device=args.trainer_device, label=args.label,
                     plan=plan)


def summary_lines(report: dict[str, Any]) -> list[str]:
    trainer = report["trainer"]
    lines = [f"{report['column']}: {report['engine']} {report['engine_version']} in {report['dtype']}, "
             f"{report['rollouts']['sequences']} sequences, {report['rollouts']['tokens']} tokens "
             f"(generated in {report['rollouts']['generate_seconds']} s)"]
    for name, m in report["against"].items():
        against = (f"trainer ({trainer['dtype']}{', fp32 head' if trainer['lm_head'] == 'float32' else ''})"
                   if name == "trainer" else "float32")
        q = m["sequence_ratio"] or {}
        lines.append(f"  vs {against}: mean |delta| {m['mean_abs_delta']:.3g}, max {m['max_abs_delta']:.3g}, "
                     f"k3 {m['k3_kl']:.3g}, |delta|>0.1 {100 * m['frac_over_threshold']:.2g}%, sequence ratio "
                     f"p05/p50/p95 {q.get('p05', 0):.3g}/{q.get('p50', 0):.3g}/{q.get('p95', 0):.3g}")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("the consistency measurement needs torch and transformers: pip install 'skyrl-backends[testing]'")
        return 2
    from skyrl_backends.consistency.runner import run as measure
    from skyrl_backends.errors import ConfigError

    try:
        config = run_config(args)
        report = asyncio.run(measure(config))
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    print("\n".join(summary_lines(report)))
    if args.report:
        target = Path(args.report)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {target}")
    return 0
