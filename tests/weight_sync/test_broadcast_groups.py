"""Forming a broadcast group over a pool: refused before any engine joins when one cannot, and abandoned
(releasing every member at once) when one fails to join."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import socket
import threading
import time
from typing import Any

import pytest
import skyrl_backends as sb
import torch
from skyrl_backends.errors import EngineClosedError, UnsupportedCapabilityError, WeightUpdateError
from skyrl_backends.types import ParallelSizes
from skyrl_backends.weight_sync import BroadcastSender, connect_broadcast, sync_weights
from skyrl_backends.weight_sync.broadcast import BroadcastReceiver, new_group


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


class FailingJoinEngine(NoBroadcastEngine):
    """Test double: an engine that declares broadcast but fails its join after ``delay_s``, by when
    the other members are waiting inside the group's rendezvous."""

    backend = "failing-join-double"

    def __init__(self, like, delay_s: float) -> None:
        super().__init__(like)
        self.capabilities = like.capabilities
        self.delay_s = delay_s

    async def init_weight_update_communicator(self, init_info) -> None:
        self.joins += 1
        await asyncio.sleep(self.delay_s)
        raise WeightUpdateError({"init_info": "this engine cannot join (test double)"})


async def _sync_through_new_group(engine, group_name: str) -> None:
    """The trainer's next group reaches ``engine`` at once and carries an update."""
    sender = await asyncio.wait_for(connect_broadcast(engine, backend="gloo", timeout_s=60, group_name=group_name),
                                    15)
    try:
        weights = {n: p.detach() + 0.5 for n, p in engine.impl.model.named_parameters()}
        versions = await sync_weights(engine, weights, "broadcast", sender=sender)
        assert versions == [engine.weight_version]
        for name, param in engine.impl.model.named_parameters():
            assert torch.equal(param.detach(), weights[name]), name
    finally:
        sender.close()


@pytest.mark.parametrize("failure", ["closed engine", "join fails in the rendezvous"])
def test_an_engine_failing_to_join_releases_the_others_at_once(model_dir, failure):
    """One engine of the call fails its join (a closed engine at once; a test double after the others
    are waiting in the rendezvous): connect_broadcast raises that engine's error within seconds, not at
    the group's timeout (60 s here), and the able engine is released with it, free for the trainer's
    next group (before, it waited in the abandoned group until the timeout)."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        other = None
        try:
            if failure == "closed engine":
                other = sb.create_engine("transformers", model=model_dir, dtype="float32")
                await other.teardown()
                expected: type[Exception] = EngineClosedError
            else:
                other = FailingJoinEngine(engine, delay_s=1.5)
                expected = WeightUpdateError
            started = time.perf_counter()
            with pytest.raises(expected):
                await connect_broadcast([engine, other], backend="gloo", timeout_s=60, group_name="abandoned")
            assert time.perf_counter() - started < 30
            await _sync_through_new_group(engine, "after_abandoned")
        finally:
            await engine.teardown()

    asyncio.run(scenario())


def test_a_receiver_waiting_in_an_abandoned_group_or_arriving_after_fails_at_once():
    """BroadcastSender.abandon releases a receiver blocked in the rendezvous (its connection to the
    store closes), and one that connects afterwards reads why the group was abandoned instead of
    waiting for the timeout."""
    sender = BroadcastSender(3, timeout_s=60, group_name="given_up")
    outcome: dict[str, Any] = {}

    def join_and_wait() -> None:
        started = time.perf_counter()
        try:
            BroadcastReceiver(sender.init_info(1), "cpu")
            outcome["error"] = None
        except WeightUpdateError as exc:
            outcome["error"] = exc
        outcome["waited_s"] = time.perf_counter() - started

    waiting = threading.Thread(target=join_and_wait, daemon=True)
    waiting.start()
    time.sleep(1.5)  # the receiver is in the rendezvous, waiting for rank 2 and the trainer
    assert waiting.is_alive()
    sender.abandon("rank 2 is gone (test)")
    waiting.join(20)
    assert not waiting.is_alive()
    assert isinstance(outcome["error"], WeightUpdateError) and "did not form" in str(outcome["error"])
    assert outcome["waited_s"] < 15

    started = time.perf_counter()
    with pytest.raises(WeightUpdateError, match="rank 2 is gone"):
        BroadcastReceiver(sender.init_info(2), "cpu")
    assert time.perf_counter() - started < 10

    # A rank that reached the marker store before its key was set (a narrow window, wider on a
    # loaded machine) waits in it like in any rendezvous: putting the marker up again releases it.
    slipped: dict[str, Any] = {}

    def wait_in_the_marker() -> None:
        store = torch.distributed.TCPStore("127.0.0.1", sender.master_port, 3, is_master=False,
                                           timeout=datetime.timedelta(seconds=60))
        started = time.perf_counter()
        try:
            new_group(store, 1, 3, "gloo", "given_up", "127.0.0.1", 60)
        except torch.distributed.DistError as exc:
            slipped["error"] = exc
        slipped["waited_s"] = time.perf_counter() - started

    waiting = threading.Thread(target=wait_in_the_marker, daemon=True)
    waiting.start()
    time.sleep(1.5)
    assert waiting.is_alive()
    sender.abandon("rank 2 is gone (test)")
    waiting.join(20)
    assert not waiting.is_alive() and "error" in slipped and slipped["waited_s"] < 15
    sender.close()


def test_an_abandoned_group_frees_its_port_for_the_next_group(model_dir):
    """A trainer that names its port (vLLM's RL API and many launchers do) forms the next group on the
    same port right after connect_broadcast gave up on the first."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            with socket.socket() as probe:  # a free port, named explicitly below
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            with pytest.raises(WeightUpdateError, match="cannot join"):
                await connect_broadcast([engine, FailingJoinEngine(engine, delay_s=0.5)], backend="gloo",
                                        master_port=port, timeout_s=60, group_name="first")
            sender = await asyncio.wait_for(connect_broadcast(engine, backend="gloo", master_port=port, timeout_s=60,
                                                              group_name="second"), 15)
            sender.close()
        finally:
            await engine.teardown()

    asyncio.run(scenario())
