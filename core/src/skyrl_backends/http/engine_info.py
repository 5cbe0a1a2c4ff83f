"""What the endpoint reads from the engines behind the client: their state (for ``/health`` and
``/metrics``), loaded LoRA adapters (``/v1/models``) and the model's context length.

In-process engines are read directly; Ray engine proxies through their actor's ``state()`` call.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

_STATE_TIMEOUT_S = 5.0
# config.json keys that hold a model's context length, in the order vLLM reads them.
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                       "max_sequence_length", "max_seq_length", "seq_len")


async def engine_state(engine: Any) -> dict[str, Any]:
    """``{"asleep": [...], "weights_loaded", "paused", "pause_mode", "lora_adapters": {name: path},
    "lora_versions": {name: version}, "weight_version"}`` (what is known; empty when the engine cannot say)."""
    if hasattr(engine, "asleep_tags"):
        return {"asleep": sorted(engine.asleep_tags), "weights_loaded": bool(getattr(engine, "weights_loaded", True)),
                "paused": bool(getattr(engine, "paused", False)), "pause_mode": getattr(engine, "pause_mode", None),
                "lora_adapters": dict(getattr(engine, "lora_adapters", {}) or {}),
                "lora_versions": dict(getattr(engine, "lora_versions", {}) or {}),
                "weight_version": getattr(engine, "weight_version", None)}
    state = getattr(engine, "state", None)
    if callable(state):
        try:
            result = state()
            if asyncio.iscoroutine(result):
                result = await asyncio.wait_for(result, _STATE_TIMEOUT_S)
            return dict(result)
        except Exception:  # an unreachable engine: the client's health says so
            return {}
    return {}


async def engine_states(client: Any) -> dict[str, dict[str, Any]]:
    ids = list(client.engine_ids)
    states = await asyncio.gather(*(engine_state(client.engine(i)) for i in ids))
    return dict(zip(ids, states))


def config_context_length(model_dir: str | None) -> int | None:
    """The context length in a model folder's ``config.json`` (the first of
    :data:`CONTEXT_LENGTH_KEYS`, also under ``text_config``), or None."""
    if not model_dir:
        return None
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_LENGTH_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def context_length(client: Any, configured: int | None = None) -> int | None:
    """The context length requests are checked against: ``configured``, else the smallest
    ``max_model_len`` an engine was created with, else the model's ``config.json``."""
    if configured is not None:
        return configured
    lengths, models = [], []
    for engine in getattr(client, "engines", []):
        config = getattr(engine, "config", None)
        if config is None:
            continue
        if getattr(config, "max_model_len", None):
            lengths.append(int(config.max_model_len))
        elif getattr(config, "model", None):
            models.append(config.model)
    lengths += [n for n in (config_context_length(m) for m in models) if n is not None]
    return min(lengths) if lengths else None
