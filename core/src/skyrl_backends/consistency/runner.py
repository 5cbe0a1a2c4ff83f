"""One consistency run: generate the plan's rollouts on a backend, recompute every sampled token's
log-probability as a trainer would, and summarize the gap with :mod:`.metrics`.

The trainer's forward pass is the conformance suite's :class:`ReferenceModel` (Hugging Face
transformers, teacher-forced over prompt + response), loaded twice: in the trainer's dtype (with a
float32 LM head when the run says the trainer uses one) and in float32. The engine is compared with
both: "trainer" is the gap a trainer in that dtype sees, "float32" the engine's distance from the
model's exact values.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skyrl_backends.consistency.metrics import mismatch_metrics
from skyrl_backends.consistency.plan import DEFAULT_PLAN, Length, RolloutPlan, Setting
from skyrl_backends.consistency.report import REPORT_FORMAT, column_name
from skyrl_backends.errors import ConfigError
from skyrl_backends.testing.hardware import cpu_vector_isa

# Environment variables that change an engine's numerics or the path its log-probabilities take; the
# report records those that are set.
NUMERICS_ENV = ("VLLM_BATCH_INVARIANT", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_ATTENTION_BACKEND",
                "VLLM_ENABLE_V1_MULTIPROCESSING", "SGLANG_ENABLE_DETERMINISTIC_INFERENCE", "SGLANG_USE_CPU_ENGINE",
                "SGLANG_RETURN_ORIGINAL_LOGPROB", "SGLANG_ENABLE_TORCH_COMPILE")
REFERENCE_NAMES = ("trainer", "float32")


@dataclass
class RunConfig:
    """What one column is: the backend, its engine options, and the trainer it is compared with."""

    backend: str
    model: str
    dtype: str = "float32"
    engine_options: dict[str, Any] = field(default_factory=dict)
    trainer_dtype: str | None = None  # None: the engine's dtype
    trainer_lm_head: str = "model"  # "float32": the trainer computes its logits in float32
    trainer_device: str | None = None  # None: cuda when available, else cpu
    label: str = ""  # the variant's name, appended to the column (e.g. "fp32-head")
    plan: RolloutPlan = DEFAULT_PLAN

    def resolved_trainer_dtype(self) -> str:
        return self.trainer_dtype or self.dtype

    def resolved_trainer_device(self) -> str:
        return self.trainer_device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Rollout:
    setting: str
    length: int
    prompt: list[int]
    token_ids: list[int]
    engine_logprobs: list[float]
    reference_logprobs: dict[str, list[float]] = field(default_factory=dict)


def torch_dtype(name: str, field_name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError.out_of_range(field_name, name, "float32, bfloat16 or float16")
    return dtype


async def generate_rollouts(config: RunConfig, prompts: dict[int, list[list[int]]],
                            max_model_len: int) -> tuple[list[Rollout], Any]:
    """Generate every rollout of the plan (one request per prompt, all in flight at once), in the
    plan's order. Returns the rollouts and the engine's description (for the report)."""
    import skyrl_backends

    options = dict(config.engine_options)
    options.setdefault("dtype", config.dtype)
    options.setdefault("seed", config.plan.engine_seed)
    options.setdefault("max_model_len", max_model_len)
    engine = skyrl_backends.create_engine(config.backend, model=config.model, **options)

    async def one(setting: Setting, length: Length, prompt: list[int], seed: int | None) -> Rollout:
        params = {"max_generate_length": length.tokens, "temperature": setting.temperature,
                  "top_p": setting.top_p, "logprobs": 0, "ignore_eos": True, "seed": seed}
        completion = (await engine.generate([prompt], params))[0]
        if len(completion.token_ids) != length.tokens or completion.logprobs is None:
            raise RuntimeError(f"{config.backend} returned {len(completion.token_ids)} tokens (finish reason "
                               f"{completion.finish_reason!r}) for a {length.tokens}-token request with ignore_eos, "
                               "or no log-probabilities")
        return Rollout(setting.name, length.tokens, list(prompt), list(completion.token_ids),
                       [float(x) for x in completion.logprobs])

    calls = [(setting, length, prompt, config.plan.request_seed(setting, length, index))
             for setting, length in config.plan.requests() for index, prompt in enumerate(prompts[length.tokens])]
    try:
        # All at once, as a trainer's rollout batch: an engine that batches runs the longest
        # response's steps once instead of every request's steps in turn. A seed per request keeps
        # each draw independent of how the engine happened to batch them.
        rollouts = await asyncio.gather(*(one(*call) for call in calls))
        described = await describe_engine(engine)
    finally:
        await engine.teardown()
    return list(rollouts), described


async def describe_engine(engine: Any) -> dict[str, Any]:
    specs = [s.dtype for s in (await engine.weight_specs()).values()]
    return {"engine_version": engine.engine_version(), "served_dtype": max(set(specs), key=specs.count)}


def teacher_force(rollouts: list[Rollout], config: RunConfig) -> None:
    """Fill each rollout's reference log-probabilities: the trainer's dtype and float32."""
    from skyrl_backends.conformance.oracles import ReferenceModel

    device = config.resolved_trainer_device()
    trainer_dtype = config.resolved_trainer_dtype()
    wanted = {"float32": (torch.float32, "model")}
    if trainer_dtype != "float32" or config.trainer_lm_head != "model":
        wanted["trainer"] = (torch_dtype(trainer_dtype, "trainer_dtype"), config.trainer_lm_head)
    for name, (dtype, lm_head) in wanted.items():
        reference = ReferenceModel(config.model, dtype=dtype, device=device)
        if lm_head == "float32":
            from skyrl_backends.consistency.lm_head import use_float32_lm_head

            use_float32_lm_head(reference.module, "trainer_lm_head")
        for rollout in rollouts:
            logprobs = reference.teacher_forced_logprobs(rollout.prompt, rollout.token_ids)
            chosen = logprobs.gather(-1, torch.tensor(rollout.token_ids).unsqueeze(-1)).squeeze(-1)
            rollout.reference_logprobs[name] = chosen.tolist()
        del reference
    if "trainer" not in wanted:  # a float32 trainer is the float32 reference
        for rollout in rollouts:
            rollout.reference_logprobs["trainer"] = rollout.reference_logprobs["float32"]


def summarize(rollouts: Sequence[Rollout], reference: str) -> dict[str, Any]:
    """Metrics of the engine against one reference: over everything, per setting, per length."""

    def metrics(selected: Sequence[Rollout]) -> dict[str, Any]:
        found = mismatch_metrics([r.engine_logprobs for r in selected],
                                 [r.reference_logprobs[reference] for r in selected]).to_dict()
        return _rounded(found)

    out = metrics(rollouts)
    out["by_setting"] = {s: metrics([r for r in rollouts if r.setting == s])
                         for s in dict.fromkeys(r.setting for r in rollouts)}
    out["by_length"] = {str(n): metrics([r for r in rollouts if r.length == n])
                        for n in dict.fromkeys(r.length for r in rollouts)}
    return out


def fingerprints(rollouts: Sequence[Rollout]) -> dict[str, str]:
    """The fingerprint of all rollouts (``"all"``) and of each length's."""
    out = {"all": fingerprint(rollouts)}
    for n in dict.fromkeys(r.length for r in rollouts):
        out[str(n)] = fingerprint([r for r in rollouts if r.length == n])
    return out


def fingerprint(rollouts: Sequence[Rollout]) -> str:
    """A hash of every sampled token: equal fingerprints mean the same rollouts were drawn."""
    digest = hashlib.sha256()
    for r in rollouts:
        digest.update(f"{r.setting}|{r.length}|{','.join(map(str, r.prompt))}|{','.join(map(str, r.token_ids))};"
                      .encode())
    return digest.hexdigest()


def prompts_for(plan: RolloutPlan, reference: Any) -> dict[int, list[list[int]]]:
    """The plan's prompts, per response length (the same for every setting; a plan with fewer
    lengths draws the same prompts for the lengths it keeps)."""
    low, high = plan.prompt_tokens
    return {length.tokens: reference.prompts(length.prompts, seed=plan.prompt_seed + length.tokens, min_len=low,
                                             max_len=high)
            for length in plan.lengths}


async def run(config: RunConfig) -> dict[str, Any]:
    """The whole measurement; returns the JSON report."""
    from skyrl_backends.conformance.oracles import ReferenceModel
    from skyrl_backends.discovery import get_backend

    torch_dtype(config.dtype, "dtype")
    torch_dtype(config.resolved_trainer_dtype(), "trainer_dtype")
    from skyrl_backends.consistency.lm_head import check_lm_head_dtype

    check_lm_head_dtype(config.trainer_lm_head, "trainer_lm_head")
    probe = ReferenceModel(config.model)
    max_positions = probe.max_positions  # the engine gets the model's whole context
    config.plan.check_fits(max_positions)
    prompts = prompts_for(config.plan, probe)
    del probe
    started = time.perf_counter()
    rollouts, engine = await generate_rollouts(config, prompts, max_positions)
    generate_seconds = time.perf_counter() - started
    teacher_force(rollouts, config)
    backend = get_backend(config.backend)
    device_kind = _device_kind(config)
    import transformers

    return {
        "format": REPORT_FORMAT,
        "column": column_name(config.backend, device_kind, engine["served_dtype"], config.label),
        "backend": config.backend,
        "label": config.label,
        "distribution": backend.distribution,
        "distribution_version": backend.distribution_version,
        "engine": backend.info.engine if backend.info else None,
        "engine_version": engine["engine_version"],
        "dtype": engine["served_dtype"],
        "engine_options": _jsonable(config.engine_options),
        "environment": {k: os.environ[k] for k in sorted(NUMERICS_ENV) if k in os.environ},
        "model": {"name": os.path.basename(config.model.rstrip("/")), "weights": weights_fingerprint(config.model)},
        "hardware": _hardware(device_kind),
        **({"cpu_isa": cpu_vector_isa()} if device_kind == "cpu" else {}),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "trainer": {"dtype": config.resolved_trainer_dtype(), "lm_head": config.trainer_lm_head,
                    "device": config.resolved_trainer_device(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "plan": config.plan.to_dict(),
        "rollouts": {"sequences": len(rollouts), "tokens": sum(len(r.token_ids) for r in rollouts),
                     "fingerprint": fingerprints(rollouts), "generate_seconds": round(generate_seconds, 1)},
        "against": {name: summarize(rollouts, name) for name in REFERENCE_NAMES},
    }


def weights_fingerprint(model_dir: str) -> str:
    """A short hash of the model's weight files (the numbers depend on nothing else of the folder)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _device_kind(config: RunConfig) -> str:
    device = str(config.engine_options.get("device", "auto"))
    if device.startswith("cpu"):
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def _hardware(kind: str) -> str:
    if kind == "gpu":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    from skyrl_backends.testing.hardware import cpu_model

    return f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} cores)"


def _rounded(value: Any) -> Any:
    """Six significant digits: enough to compare runs, few enough to keep committed reports readable."""
    if isinstance(value, float):
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    import json

    out = {}
    for key, value in options.items():
        try:
            json.dumps(value)
            out[key] = value
        except TypeError:
            out[key] = repr(value)
    return out
