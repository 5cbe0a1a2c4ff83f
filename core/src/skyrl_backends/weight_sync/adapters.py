"""Trainer side: push a LoRA adapter's tensors into engines, by any weight-sync strategy.

::

    versions = await sync_lora_adapter(engines, "policy", peft_model, strategy="shared_memory")

The adapter travels like base weights (packed buckets in shared memory, CUDA IPC handles, a
broadcast, or the tensors themselves in one process) as one request that every engine validates
against the adapter's config and its own parameters before any engine loads it
(:mod:`skyrl_backends.lora`), then loads under ``lora_name``, replacing an adapter of that name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from skyrl_backends import lora
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync import sharded, shared_memory
from skyrl_backends.weight_sync.chunks import DEFAULT_BUCKET_BYTES, DtypeFor, named_columns, plan_named
from skyrl_backends.weight_sync.engines import ENGINE_DTYPES, Delivery, Targets, as_list, engine_specs
from skyrl_backends.weight_sync.sync import deliver

Adapter = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def adapter_of(model: Any, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PEFT model's adapter (default: the active one) as its tensors, named as PEFT saves them,
    and its config as JSON."""
    from peft import get_peft_model_state_dict

    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise WeightUpdateError({"adapter_name": f"{name!r} is not an adapter of this model; it has "
                                                 f"{sorted(model.peft_config)}"})
    return (get_peft_model_state_dict(model, adapter_name=name), lora.config_to_json(model.peft_config[name]))


async def sync_lora_adapter(targets: Targets, lora_name: str, adapter: Adapter, lora_config: Any = None,
                            strategy: str = shared_memory.STRATEGY, *, sender: Any = None,
                            bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype_for: DtypeFor | str = ENGINE_DTYPES,
                            pinned: bool = False) -> list[int]:
    """Load (or replace) the LoRA adapter ``lora_name`` in every engine of ``targets`` from tensors;
    returns the adapter's version in each target (a client counts as one), stamped on the
    completions generated with it.

    ``adapter``: a PEFT model (its active adapter, and its config unless ``lora_config`` is given),
    or the adapter's tensors named as ``get_peft_model_state_dict`` names them
    (``base_model.model.<module>.lora_A.weight``). ``lora_config``: a PEFT ``LoraConfig`` or its JSON.
    Tensors travel in the dtype each engine holds the adapted layers in, unless ``dtype_for`` says
    otherwise. ``strategy`` and ``sender`` are those of :func:`~skyrl_backends.weight_sync.sync_weights`
    (a broadcast sender from ``connect_broadcast`` serves base weights and adapters alike)."""
    engines = as_list(targets)
    if not engines:
        raise WeightUpdateError({"targets": "no engine given"})
    if hasattr(adapter, "peft_config"):
        by_name, config_of_model = adapter_of(adapter)
        names, tensors = named_columns(by_name)
        config = lora.config_to_json(lora_config) if lora_config is not None else config_of_model
    else:
        if lora_config is None:
            raise WeightUpdateError({"lora_config": "give the adapter's PEFT LoraConfig (or its JSON) with its "
                                                    "tensors"})
        names, tensors = named_columns(adapter)  # checked once: plan_named below takes them as they are
        config = lora.config_to_json(lora_config)
    if sharded.is_sharded(tensors):
        raise WeightUpdateError({"adapter": "the adapter's tensors are sharded across ranks; gather them first "
                                            "(DTensor.full_tensor() on every rank; adapters are small), then send "
                                            "from one rank"})
    if dtype_for == ENGINE_DTYPES:
        dtype_for = lora.adapter_dtypes(names, await engine_specs(engines))
    layout = plan_named(names, tensors, bucket_bytes, dtype_for)
    delivery = Delivery(
        lambda engine, request: engine.validate_lora_adapter_from_tensors(lora_name, config, request),
        lambda engine, request: engine.load_lora_adapter_from_tensors(lora_name, config, request, pinned))
    return [int(version) for version in await deliver(engines, layout, strategy, sender, delivery)]
