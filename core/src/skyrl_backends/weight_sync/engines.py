"""The engines an update goes to: who they are, the dtypes they hold, and one request checked by all
of them before any applies it.

Shared by every trainer-side path: :func:`~skyrl_backends.weight_sync.sync_weights` (one trainer
process), :mod:`~skyrl_backends.weight_sync.sharded` (a model sharded across trainer ranks) and
:func:`~skyrl_backends.weight_sync.sync_lora_adapter` (an adapter).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skyrl_backends.protocols import Engine
from skyrl_backends.types import TensorSpec, WeightUpdateRequest

# ``dtype_for``'s default: send each tensor in the dtype the (first) engine holds it in.
ENGINE_DTYPES = "engine"
Targets = Engine | Sequence[Engine]


def as_list(targets: Targets) -> list[Engine]:
    """One engine or a sequence of them, as a list."""
    if isinstance(targets, Sequence) and not isinstance(targets, (str, bytes)):
        return list(targets)
    return [targets]


def pool_of(target: Engine) -> list[Engine] | None:
    """The engines of a client (an object with an ``engines`` list), else None."""
    engines = getattr(target, "engines", None)
    return list(engines) if isinstance(engines, (list, tuple)) else None


async def engine_specs(targets: list[Engine]) -> dict[str, TensorSpec]:
    """The first engine's weight specs by name (every engine of one update holds the same model)."""
    specs = await targets[0].weight_specs()
    values = specs.values() if isinstance(specs, Mapping) else specs
    return {s.name: s for s in values if isinstance(s, TensorSpec)}


async def engine_dtypes(targets: list[Engine]) -> dict[str, str]:
    """Each weight's dtype in the first engine."""
    return {name: spec.dtype for name, spec in (await engine_specs(targets)).items()}


@dataclass(frozen=True)
class Delivery:
    """What every engine does with an update's request: check it, then apply it (returning a version)."""

    validate: Callable[[Engine, WeightUpdateRequest], Awaitable[None]]
    apply: Callable[[Engine, WeightUpdateRequest], Awaitable[Any]]


BASE_WEIGHTS = Delivery(lambda engine, request: engine.validate_weight_update(request),
                        lambda engine, request: engine.update_named_weights(request))


async def validate_all(engines: list[Engine], request: WeightUpdateRequest,
                       delivery: Delivery = BASE_WEIGHTS) -> None:
    """Every engine checks ``request``; the first refusal raises, before any engine applies it."""
    for engine in engines:
        await delivery.validate(engine, request)


async def apply_all(engines: list[Engine], request: WeightUpdateRequest,
                    delivery: Delivery = BASE_WEIGHTS) -> list[Any]:
    """Every engine checks ``request``, then all apply it at once; their results, in order.

    A weight update for one engine (or one client, which checks its engines itself) is not checked
    apart: ``update_named_weights`` checks everything before it changes anything, and the check
    alone would cost a Ray engine or a server a second round trip at every sync."""
    if len(engines) > 1 or delivery is not BASE_WEIGHTS:
        await validate_all(engines, request, delivery)
    return list(await asyncio.gather(*(delivery.apply(e, request) for e in engines)))


def versions_of(targets: list[Engine], results: Sequence[Any]) -> list[int]:
    """One weight version per engine: a client's result stands for its pool, whose engines report
    their own versions."""
    found: list[int] = []
    for target, result in zip(targets, results, strict=False):
        members = pool_of(target)
        if members is not None and all(isinstance(getattr(e, "weight_version", None), int) for e in members):
            found.extend(e.weight_version for e in members)
        else:
            found.extend(int(v) for v in (result if isinstance(result, (list, tuple)) else [result]))
    return found
