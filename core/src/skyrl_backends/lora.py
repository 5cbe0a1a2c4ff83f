"""LoRA adapters sent as tensors: the adapter's config, the tensors it must carry, and their validation.

A trainer that trains a LoRA adapter pushes it into the engines as tensors, without a folder on disk
(``InferenceEngine.load_lora_adapter_from_tensors``, or ``skyrl_backends.weight_sync.sync_lora_adapter``
through any weight-sync strategy). The adapter is described the way PEFT saves one:

* ``lora_config``: a PEFT ``LoraConfig`` as JSON (what ``adapter_config.json`` holds): ``r``,
  ``lora_alpha``, ``target_modules`` (names, a regular expression, or ``"all-linear"``),
  ``use_rslora``; :func:`config_to_json` turns a ``LoraConfig`` object into it;
* the tensors, named as in PEFT's saved state (``get_peft_model_state_dict``):
  ``base_model.model.<module>.lora_A.weight`` of shape ``(r, in_features)`` and
  ``base_model.model.<module>.lora_B.weight`` of shape ``(out_features, r)`` for every targeted
  linear module, in the dtype the engine holds the module's weight.

:func:`validate_adapter_request` checks all of it against the engine's parameters before an engine
sees a byte, naming every problem; the engine facade and the conformance suite use it. This module
does not import torch.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from skyrl_backends.errors import WeightUpdateError, closest_match
from skyrl_backends.types import TensorSpec, WeightUpdateRequest

PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# What an adapter loaded from tensors is recorded as instead of a folder (InferenceEngine.lora_adapters).
FROM_TENSORS = "<tensors>"
# PEFT options no backend maps from tensors: each must keep its default (the value accepted here).
_UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None), "modules_to_save": (None, []), "bias": ("none", None),
    "layers_to_transform": (None, []), "layers_pattern": (None, []), "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None), "target_parameters": (None, []), "lora_bias": (False, None),
    "trainable_token_indices": (None, {}, []), "fan_in_fan_out": (False, None),
}
_PEFT_DEFAULT_ALPHA = 8


def config_to_json(config: Any) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (or its ``to_dict()``, or a mapping) as a plain JSON object: sets become
    sorted lists and enumerations their values."""
    raw = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(raw, Mapping):
        raise WeightUpdateError({"lora_config": f"expected a PEFT LoraConfig or a JSON object, got "
                                                f"{type(config).__name__}"})
    return {str(key): _plain(value) for key, value in raw.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def check_config(config: Any, max_rank: int | None = None) -> dict[str, Any]:
    """The config's ``r``, ``lora_alpha``, ``target_modules`` and ``use_rslora``; raises
    :class:`WeightUpdateError` naming every field (``lora_config.<field>``) that is wrong or asks for
    an option no backend loads from tensors."""
    if not isinstance(config, Mapping):
        raise WeightUpdateError({"lora_config": f"expected a JSON object (a PEFT LoraConfig as JSON), got "
                                                f"{type(config).__name__}"})
    problems: dict[str, str] = {}
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        problems["lora_config"] = f"is not JSON ({exc}); pass LoraConfig objects through config_to_json()"
    if config.get("peft_type", "LORA") != "LORA":
        problems["lora_config.peft_type"] = f"got {config.get('peft_type')!r}; only LoRA adapters ('LORA') are loaded"
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems["lora_config.r"] = f"got {rank!r}; give the adapter's rank, a positive integer"
    elif max_rank is not None and rank > max_rank:
        problems["lora_config.r"] = (f"rank {rank} is above the engine's max_lora_rank {max_rank}; create the engine "
                                     f"with max_lora_rank={rank} or more")
    alpha = config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        problems["lora_config.lora_alpha"] = f"got {alpha!r}; give a positive number (the scaling is alpha / r)"
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as exc:
                problems["lora_config.target_modules"] = f"{targets!r} is not a regular expression: {exc}"
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        problems["lora_config.target_modules"] = (f"got {targets!r}; give module names (['q_proj', 'v_proj']), a "
                                                  f"regular expression, or 'all-linear'")
    if not isinstance(config.get("use_rslora", False), bool):
        problems["lora_config.use_rslora"] = f"got {config.get('use_rslora')!r}; expected true or false"
    for option, defaults in _UNSUPPORTED_OPTIONS.items():
        if option in config and config[option] not in defaults:
            problems[f"lora_config.{option}"] = (f"got {config[option]!r}; adapters loaded from tensors support plain "
                                                 f"LoRA on linear layers only (leave {option} at {defaults[0]!r})")
    if problems:
        raise WeightUpdateError(problems)
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets, "use_rslora": config.get("use_rslora", False)}


def _is_linear(module: str, spec: TensorSpec) -> bool:
    """A linear layer of the model's blocks: a 2-D weight that is neither an embedding nor the head."""
    leaf = module.rsplit(".", 1)[-1]
    return len(spec.shape) == 2 and "embed" not in leaf and leaf != "lm_head"


def _targeted(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a list matches a module by its full name or its last dotted parts; a string is a
    regular expression the full name must match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def expected_tensors(config: Mapping[str, Any], specs: Mapping[str, TensorSpec],
                     max_rank: int | None = None) -> dict[str, TensorSpec]:
    """Every tensor an adapter of ``config`` must carry for a model of ``specs`` (the engine's
    parameters), with its shape and the dtype of the module's weight."""
    checked = check_config(config, max_rank)
    targets, rank = checked["target_modules"], checked["r"]
    expected: dict[str, TensorSpec] = {}
    refused: dict[str, str] = {}
    for name, spec in specs.items():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if targets == ALL_LINEAR:
            if not _is_linear(module, spec):
                continue
        elif not _targeted(module, targets):
            continue
        elif not _is_linear(module, spec):
            refused[f"lora_config.target_modules ({module})"] = (
                "LoRA from tensors adapts linear layers of the model's blocks, not embeddings, the output head "
                "or other modules")
            continue
        out_features, in_features = spec.shape
        for part, shape in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
            tensor = f"{PEFT_PREFIX}{module}.{part}.weight"
            expected[tensor] = TensorSpec(tensor, shape, spec.dtype)
    if refused:
        raise WeightUpdateError(refused)
    if not expected:
        raise WeightUpdateError({"lora_config.target_modules": (
            f"{targets!r} matches no linear layer of this model; name layers as the model does "
            f"(e.g. 'q_proj', 'v_proj')")})
    return expected


def validate_adapter_request(request: WeightUpdateRequest, config: Mapping[str, Any],
                             specs: Mapping[str, TensorSpec], max_rank: int | None = None) -> None:
    """Raise :class:`WeightUpdateError` naming every problem of an adapter sent as ``request``: config
    fields, tensors missing or not of this adapter (with a did-you-mean), wrong shapes and dtypes."""
    check_adapter_tensors(request, expected_tensors(config, specs, max_rank))


def check_adapter_tensors(request: WeightUpdateRequest, expected: Mapping[str, TensorSpec]) -> None:
    """The tensor half of :func:`validate_adapter_request`, against :func:`expected_tensors`' answer
    (which a caller may keep: it depends on the config and the engine's parameters only)."""
    problems: dict[str, str] = {}
    for name, shape, dtype in zip(request.names, request.shapes, request.dtypes, strict=True):
        spec = expected.get(name)
        if spec is None:
            hint = closest_match(name, expected)
            problems[name] = ("is not a tensor of this adapter" + (f" (did you mean {hint!r}?)" if hint else "")
                              + f"; adapter tensors are named {PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight "
                                f"for the modules lora_config.target_modules selects")
        elif tuple(shape) != tuple(spec.shape):
            problems[name] = f"shape {tuple(shape)} does not match {tuple(spec.shape)} (rank r and the layer's size)"
        elif dtype != spec.dtype:
            problems[name] = f"dtype {dtype} does not match the engine's {spec.dtype}; convert before sending"
    for name in sorted(set(expected) - set(request.names)):
        problems[name] = "missing: every module lora_config.target_modules selects needs its lora_A and lora_B"
    if problems:
        raise WeightUpdateError(problems)


def adapter_dtypes(names: Sequence[str], specs: Mapping[str, TensorSpec]) -> dict[str, str]:
    """The dtype each adapter tensor travels in: that of its module's weight in the engine."""
    dtypes = {}
    for name in names:
        module = name.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
        spec = specs.get(module + ".weight")
        if spec is not None:
            dtypes[name] = spec.dtype
    return dtypes
