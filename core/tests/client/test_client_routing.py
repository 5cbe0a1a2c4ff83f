"""Batch assignment and reassembly."""

import pytest
from skyrl_backends.client.hashing import ConsistentHashRing
from skyrl_backends.client.routing import LoadTracker, Router, reassemble
from skyrl_backends.types import Completion

ENGINES = ["e0", "e1", "e2"]


def router(**kw):
    return Router(ConsistentHashRing(ENGINES), LoadTracker(), **kw)


def test_a_batch_without_sessions_is_spread_evenly():
    assignment = router().assign(None, 30, ENGINES)
    assert sorted(len(v) for v in assignment.values()) == [10, 10, 10]
    assert sorted(i for v in assignment.values() for i in v) == list(range(30))


def test_load_already_in_flight_is_counted():
    r = router()
    r.load.add("e0", 10)
    assignment = r.assign(None, 12, ENGINES)
    assert "e0" not in assignment or len(assignment["e0"]) <= 1
    assert len(assignment["e1"]) + len(assignment["e2"]) >= 11


def test_sessions_follow_the_ring_and_ignore_load():
    r = router()
    r.load.add("e0", 1000)
    sessions = [f"s{i}" for i in range(50)]
    assignment = r.assign(sessions, 50, ENGINES)
    for engine, indices in assignment.items():
        for i in indices:
            assert r.ring.lookup(sessions[i]) == engine


def test_random_session_routing_is_only_a_benchmark_baseline():
    r = router(session_routing="random")
    picks = {r.engine_for_session("same", ENGINES) for _ in range(50)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="session_routing"):
        router(session_routing="sticky")


def test_no_usable_engine_is_an_error():
    with pytest.raises(LookupError):
        router().assign(None, 1, [])


def c(tag):
    return Completion(token_ids=[tag], finish_reason="length")


def test_reassemble_restores_order_with_several_samples_per_prompt():
    parts = [([1, 3], [c(10), c(11), c(30), c(31)]), ([0, 2], [c(0), c(1), c(20), c(21)])]
    out = reassemble(4, 2, parts)
    assert [x.token_ids[0] for x in out] == [0, 1, 10, 11, 20, 21, 30, 31]


def test_reassemble_refuses_missing_or_miscounted_parts():
    with pytest.raises(ValueError, match="got no completion"):
        reassemble(2, 1, [([0], [c(0)])])
    with pytest.raises(ValueError, match="completions"):
        reassemble(1, 2, [([0], [c(0)])])


def test_bounded_loads_keep_sessions_sticky_until_an_engine_is_overloaded():
    sessions = [f"s{i}" for i in range(64)]
    strict = router().assign(sessions, 64, ENGINES)
    bounded_router = router(session_load_factor=1.0)
    bounded = bounded_router.assign(sessions, 64, ENGINES)
    bound = -(-64 // 3)  # ceil(64 / 3): no engine above the average
    assert max(len(v) for v in bounded.values()) <= bound
    assert max(len(v) for v in strict.values()) > max(len(v) for v in bounded.values())
    # Sessions stay on their ring engine unless it was full: most do.
    owner = {i: e for e, idx in strict.items() for i in idx}
    kept = sum(owner[i] == e for e, idx in bounded.items() for i in idx)
    assert kept >= 0.7 * 64
    # With no load at all, every session goes to its ring engine.
    for s in sessions[:10]:
        assert bounded_router.assign([s], 1, ENGINES) == {bounded_router.ring.lookup(s): [0]}
    with pytest.raises(ValueError, match="session_load_factor"):
        router(session_load_factor=0.5)
