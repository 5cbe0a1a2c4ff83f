"""Forming a broadcast group over a pool: refused before any engine joins when one cannot."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import skyrl_backends as sb
from skyrl_backends.errors import UnsupportedCapabilityError
from skyrl_backends.types import ParallelSizes
from skyrl_backends.weight_sync import connect_broadcast, sync_weights


class NoBroadcastEngine:
    """Test double: an engine of a pool that declares no broadcast strategy (it counts join attempts)."""

    backend = "no-broadcast-double"

    def __init__(self, like) -> None:
        self.capabilities = dataclasses.replace(like.capabilities, weight_sync_strategies=("shared_memory",))
        self.joins = 0

    def parallel_sizes(self) -> ParallelSizes:
        return ParallelSizes()

    async def init_weight_update_communicator(self, init_info) -> None:
        self.joins += 1


def test_a_group_one_engine_cannot_join_is_refused_before_any_engine_joins(model_dir):
    """An engine that joins a broadcast group waits until the whole group forms. When another engine
    of the call cannot receive broadcasts, the call is refused before anyone joins: the able engine is
    not left waiting in a group that never forms, and the trainer's next group reaches it at once
    (before, it waited out the first group's timeout, then failed)."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            unable = NoBroadcastEngine(engine)
            with pytest.raises(UnsupportedCapabilityError, match="no-broadcast-double"):
                await connect_broadcast([engine, unable], backend="gloo", timeout_s=20, group_name="refused")
            assert unable.joins == 0
            sender = await asyncio.wait_for(connect_broadcast(engine, backend="gloo", timeout_s=20,
                                                              group_name="after_refusal"), 15)
            try:
                weights = {n: p.detach() + 0.25 for n, p in engine.impl.model.named_parameters()}
                assert await sync_weights(engine, weights, "broadcast", sender=sender) == [1]
            finally:
                sender.close()
        finally:
            await engine.teardown()

    asyncio.run(scenario())
