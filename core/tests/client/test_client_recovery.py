"""EngineRecovery and replace_engine: lost engines come back under their ids, with their sessions,
only once restored (routing logic, on the recording test double)."""

from __future__ import annotations

import asyncio

from engine_doubles import RecordingEngineDouble
from skyrl_backends.client import EngineRecovery, InferenceEngineClient

PARAMS = {"max_generate_length": 4}


def run(coro):
    return asyncio.run(coro)


def test_a_lost_engine_is_restarted_restored_and_gets_its_sessions_back():
    engines = [RecordingEngineDouble("d0"), RecordingEngineDouble("d1")]

    async def main():
        client = InferenceEngineClient(engines)
        lost_id = client.engine_ids[1]
        session = next(f"s{i}" for i in range(1000) if client.route_session(f"s{i}") == lost_id)
        engines[1].dead = True
        await client.generate([[1, 2]], PARAMS, session_ids=[session])  # fails over to d0
        assert not client.health()[lost_id]["healthy"]
        order = []
        replacement = RecordingEngineDouble("d1-restarted")

        async def restart(engine_id, lost):
            order.append(("restart", engine_id, lost.name))
            return replacement

        async def restore(engine):
            order.append(("restore", engine.name))
            assert not client.health()[lost_id]["healthy"], "back in rotation before its weights were restored"

        recovered = await EngineRecovery(client, restart, restore).recover()
        assert order == [("restart", lost_id, "d1"), ("restore", "d1-restarted")]
        assert [(r.engine_id, r.engine, r.replaced) for r in recovered] == [(lost_id, replacement, engines[1])]
        assert client.engine(lost_id) is replacement and client.health()[lost_id]["healthy"]
        await client.generate([[3, 4]], PARAMS, session_ids=[session], request_ids=["back"])
        assert "back" in replacement.received_request_ids

    run(main())


def test_a_failed_restore_leaves_the_engine_out_and_the_next_recover_tries_again():
    engines = [RecordingEngineDouble("d0"), RecordingEngineDouble("d1")]

    async def main():
        client = InferenceEngineClient(engines)
        lost_id = client.engine_ids[0]
        client.mark_unhealthy(lost_id, "node lost")
        attempts = []

        async def restore(engine):
            attempts.append(engine.name)
            if len(attempts) == 1:
                raise ConnectionError("weight group timed out")

        recovery = EngineRecovery(client, lambda _id, lost: RecordingEngineDouble(f"{lost.name}-new"), restore)
        assert await recovery.recover() == []
        assert not client.health()[lost_id]["healthy"] and "weight group timed out" in recovery.failures[lost_id]
        assert client.engine(lost_id) is engines[0]
        assert [r.engine_id for r in await recovery.recover()] == [lost_id]
        assert recovery.failures == {} and client.health()[lost_id]["healthy"]

    run(main())
