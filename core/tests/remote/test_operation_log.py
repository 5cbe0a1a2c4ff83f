"""The server's operation log (the logic behind retries that never run a call twice), on plain
coroutines: no engine is involved."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from skyrl_backends.errors import ConfigError, WeightUpdateError  # noqa: E402
from skyrl_backends.http.engine_operations import OperationLog  # noqa: E402


def run(coro):
    return asyncio.run(coro)


def test_a_key_runs_its_call_once_and_every_reader_gets_the_same_outcome():
    async def main():
        log = OperationLog()
        runs = []

        async def call(op):
            runs.append(op.key)
            op.emit({"event": "accepted"})
            await asyncio.sleep(0.01)
            op.finish({"event": "result", "result": len(runs)})

        first = log.get_or_start("k", "body", call)
        again = log.get_or_start("k", "body", call)  # a retry while it runs
        assert first is again
        assert (await first.wait())["result"] == 1
        after = log.get_or_start("k", "body", call)  # a retry after it finished
        assert after is first and runs == ["k"]
        events = [e async for e in after.read(0)]
        assert [e["event"] for e in events] == ["accepted", "result"]
        resumed = [e async for e in after.read(1)]  # a reader that already saw "accepted"
        assert [e["event"] for e in resumed] == ["result"]

    run(main())


def test_a_key_reused_for_another_body_is_refused():
    async def main():
        log = OperationLog()

        async def call(op):
            op.finish({"event": "result", "result": None})

        log.get_or_start("k", "one body", call)
        with pytest.raises(ConfigError) as info:
            log.get_or_start("k", "another body", call)
        assert info.value.field == "Idempotency-Key"

    run(main())


def test_a_failing_call_is_an_error_event_with_the_wire_error():
    async def main():
        log = OperationLog()

        async def call(op):
            raise WeightUpdateError({"w": "no such parameter"})

        op = log.get_or_start("k", "b", call)
        terminal = await op.wait()
        assert terminal["event"] == "error" and terminal["status"] == 400
        assert terminal["error"]["exception"] == "WeightUpdateError"
        assert terminal["error"]["fields"]["problems"] == {"w": "no such parameter"}

    run(main())


def test_a_quiet_call_sends_heartbeats():
    async def main():
        log = OperationLog()
        release = asyncio.Event()

        async def call(op):
            await release.wait()
            op.finish({"event": "result", "result": None})

        op = log.get_or_start("k", "b", call)
        seen = []
        async for event in op.read(0, heartbeat_s=0.01):
            seen.append(event["event"])
            if seen.count("heartbeat") == 3:
                release.set()
        assert seen[:3] == ["heartbeat"] * 3 and seen[-1] == "result"

    run(main())


def test_finished_operations_expire_after_the_retention_window():
    async def main():
        log = OperationLog(retention_s=0.0, max_finished=10)

        async def call(op):
            op.finish({"event": "result", "result": None})

        op = log.get_or_start("old", "b", call)
        await op.wait()
        await asyncio.sleep(0.01)
        log.get_or_start("new", "b", call)
        assert len(log) == 1  # "old" is gone: a retry that late starts a new call

    run(main())


def test_aborts_of_requests_not_received_yet_are_applied_when_they_arrive():
    async def main():
        log = OperationLog(tombstone_s=60)
        release = asyncio.Event()

        async def generation(op):
            await release.wait()
            op.finish({"event": "result", "result": None})

        running = log.get_or_start("g1", "b", generation)
        log.track(running, ["r1", "r2"])
        here, elsewhere = log.split_abort(["r1", "late"])
        assert here == ["r1"] and elsewhere == ["late"]
        arriving = log.get_or_start("g2", "b", generation)
        log.track(arriving, ["late", "other"])
        assert log.aborted_before_arrival(arriving) == ["late"]
        assert log.aborted_before_arrival(arriving) == []  # used once
        release.set()
        await running.wait()

    run(main())


def test_an_abandoned_generation_is_reported_after_the_grace_period_and_not_before():
    async def main():
        log = OperationLog(orphan_grace_s=0.05)
        release = asyncio.Event()
        abandoned = []

        async def generation(op):
            await release.wait()
            op.finish({"event": "result", "result": None})

        op = log.get_or_start("g", "b", generation)
        log.track(op, ["r"])
        op.attach()
        op.detach(abandoned.append, log.orphan_grace_s)
        op.attach()  # the caller came back (a retry) within the grace period
        await asyncio.sleep(0.1)
        assert abandoned == []
        op.detach(abandoned.append, log.orphan_grace_s)
        await asyncio.sleep(0.1)
        assert abandoned == [op]
        release.set()
        await op.wait()

    run(main())


def test_a_reader_waiting_for_the_next_event_gets_it_at_once():
    """An event emitted while a reader starts waiting wakes it then, not at the next heartbeat."""
    async def main():
        log = OperationLog()
        go = asyncio.Event()

        release = asyncio.Event()

        async def call(op):
            await go.wait()
            op.emit({"event": "accepted"})  # right after the reader began to wait
            await release.wait()  # nothing else happens until the reader got "accepted"
            op.finish({"event": "result", "result": None})

        op = log.get_or_start("k", "b", call)
        await asyncio.sleep(0)  # the call is waiting for `go`
        reader = op.read(0, heartbeat_s=30)
        first = asyncio.ensure_future(reader.__anext__())
        # The call emits in the loop iteration in which the reader starts waiting, before its wait's
        # own task has run: the moment a wait that looks the event up late would miss.
        go.set()
        event = await asyncio.wait_for(first, 5)
        assert event["event"] == "accepted"
        release.set()
        assert [e["event"] async for e in reader] == ["result"]

    run(main())
