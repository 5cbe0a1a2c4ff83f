"""The consistent-hash ring: stable, balanced, and moving only the sessions it must."""

from collections import Counter

import pytest
from skyrl_backends.client.hashing import ConsistentHashRing, stable_hash

SESSIONS = [f"session-{i}" for i in range(4000)]


def owners(ring, usable=None):
    return {s: ring.lookup(s, usable) for s in SESSIONS}


def test_stable_hash_is_the_same_in_every_process():
    # A pinned value: the salted builtin hash() would differ between runs.
    assert stable_hash("session-0") == 0xB65F95CF544107CF
    assert stable_hash("session-0") != stable_hash("session-1")
    assert 0 <= stable_hash("abc") < 2**64


def test_same_nodes_give_the_same_routes_whatever_the_insertion_order():
    a = ConsistentHashRing(["e0", "e1", "e2"])
    b = ConsistentHashRing(["e2", "e0", "e1"])
    assert owners(a) == owners(b)


def test_shares_are_balanced():
    ring = ConsistentHashRing([f"e{i}" for i in range(4)])
    counts = Counter(owners(ring).values())
    assert set(counts) == {"e0", "e1", "e2", "e3"}
    assert max(counts.values()) / min(counts.values()) < 1.5


def test_adding_an_engine_moves_only_sessions_to_it_and_about_one_in_n():
    ring = ConsistentHashRing(["e0", "e1", "e2"])
    before = owners(ring)
    ring.add("e3")
    after = owners(ring)
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "e3" for s in moved)
    assert 0.15 < len(moved) / len(SESSIONS) < 0.35  # ideal: 1/4


def test_removing_an_engine_moves_only_its_sessions():
    ring = ConsistentHashRing(["e0", "e1", "e2", "e3"])
    before = owners(ring)
    ring.remove("e1")
    after = owners(ring)
    for s in SESSIONS:
        if before[s] != "e1":
            assert after[s] == before[s]
        else:
            assert after[s] in {"e0", "e2", "e3"}


def test_skipping_an_unusable_engine_is_the_same_as_removing_it():
    ring = ConsistentHashRing(["e0", "e1", "e2", "e3"])
    skipped = owners(ring, usable=lambda node: node != "e2")
    ring.remove("e2")
    assert skipped == owners(ring)


def test_no_usable_engine_gives_none_and_errors_name_the_node():
    ring = ConsistentHashRing(["e0"])
    assert ring.lookup("s", usable=[]) is None
    assert ConsistentHashRing().lookup("s") is None
    with pytest.raises(ValueError, match="e0"):
        ring.add("e0")
    with pytest.raises(KeyError, match="e9"):
        ring.remove("e9")
