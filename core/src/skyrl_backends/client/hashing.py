"""Consistent hashing of session ids onto engines.

Every engine owns many points ("virtual nodes") on a 64-bit ring; a session belongs to the first
point clockwise of its own hash. Adding an engine moves only the sessions that now fall on the new
engine's points (about 1/N of them); removing one moves only that engine's sessions. Virtual nodes
keep the shares even: with 160 points per engine the largest share stays within a few percent of
1/N. The hash is BLAKE2b, not Python's ``hash()``, so routes are stable across processes and runs
(a restarted client sends every session to the engine that holds its prefix cache).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Collection, Iterable

DEFAULT_VIRTUAL_NODES = 160


def stable_hash(key: str) -> int:
    """A 64-bit hash that is the same in every process (unlike the salted builtin ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class ConsistentHashRing:
    """A hash ring of node names with ``virtual_nodes`` points per node."""

    def __init__(self, nodes: Iterable[str] = (), virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self._nodes: set[str] = set()
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def add(self, node: str) -> None:
        if node in self._nodes:
            raise ValueError(f"node {node!r} is already on the ring")
        self._nodes.add(node)
        for replica in range(self.virtual_nodes):
            point = stable_hash(f"{node}#{replica}")
            index = bisect.bisect_left(self._points, point)
            # Equal points (a 64-bit collision) are ordered by owner so the ring does not depend on
            # insertion order.
            while index < len(self._points) and self._points[index] == point and self._owners[index] < node:
                index += 1
            self._points.insert(index, point)
            self._owners.insert(index, node)

    def remove(self, node: str) -> None:
        if node not in self._nodes:
            raise KeyError(f"node {node!r} is not on the ring")
        self._nodes.discard(node)
        kept = [(p, o) for p, o in zip(self._points, self._owners) if o != node]
        self._points = [p for p, _ in kept]
        self._owners = [o for _, o in kept]

    def lookup(self, key: str, usable: Callable[[str], bool] | Collection[str] | None = None) -> str | None:
        """The node owning ``key``: the first point clockwise whose node is usable.

        Skipping unusable nodes instead of removing them means a session of a failed engine moves
        to that engine's clockwise neighbour while every other session stays put, and comes back
        when the engine recovers. None when no node is usable."""
        if not self._points:
            return None
        if usable is None:
            accept: Callable[[str], bool] = lambda _node: True  # noqa: E731
        elif callable(usable):
            accept = usable
        else:
            allowed = set(usable)
            accept = allowed.__contains__
        start = bisect.bisect_right(self._points, stable_hash(key))
        rejected: set[str] = set()
        for offset in range(len(self._points)):
            owner = self._owners[(start + offset) % len(self._points)]
            if owner in rejected:
                continue
            if accept(owner):
                return owner
            rejected.add(owner)
            if len(rejected) == len(self._nodes):
                return None
        return None
