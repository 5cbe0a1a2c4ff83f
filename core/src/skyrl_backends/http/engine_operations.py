"""The server's log of engine operations: what makes calls over an unreliable network safe to retry.

Every POST of the engine API is an :class:`Operation`, identified by the caller's
``Idempotency-Key``. The operation runs once, detached from the connection that started it, and
writes its outcome as a list of events (``accepted``, stream ``chunk`` s, then one ``result`` or
``error``). A caller whose connection broke sends the same call again with the same key and the
number of events it has already seen: it is attached to the running operation (or handed the
finished outcome) instead of starting a second generation or a second weight update.

* A key reused for a different body is refused (409), so a key can never return another call's result.
* Finished operations are kept ``retention_s`` seconds (and at most ``max_finished``), the window in
  which a retry finds them.
* A generation whose every streaming reader went away and did not come back within
  ``orphan_grace_s`` is aborted, so an abandoned stream stops consuming the engine.
* An abort naming a request the server has not received yet (the caller's generate and abort crossed
  on the network) is remembered ``tombstone_s`` seconds, and that request is aborted as soon as it
  arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from skyrl_backends.errors import ConfigError, EngineDeadError
from skyrl_backends.remote import wire

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 300.0
DEFAULT_MAX_FINISHED = 4096
DEFAULT_ORPHAN_GRACE_S = 30.0
DEFAULT_TOMBSTONE_S = 60.0
DEFAULT_MAX_TOMBSTONES = 100_000
HEARTBEAT_S = 5.0


class Operation:
    """One engine call and its events; read by any number of connections, each from any event."""

    def __init__(self, key: str, fingerprint: str, on_finish: Callable[[Operation], None] | None = None) -> None:
        self.key = key
        self._on_finish = on_finish
        self.fingerprint = fingerprint
        self.events: list[dict[str, Any]] = []
        self.status = 200
        self.done = False
        self.finished_at: float | None = None
        self.readers = 0
        self.sample_ids: list[str] = []  # a generation's engine-level request ids
        self.task: asyncio.Task[Any] | None = None
        self.accepted = asyncio.Event()
        self._changed = asyncio.Event()
        self._orphan_timer: asyncio.TimerHandle | None = None

    def emit(self, event: dict[str, Any]) -> None:
        if self.done:
            return
        if event.get("event") == "accepted":
            if self.accepted.is_set():
                return
            self.accepted.set()
        self.events.append(event)
        self._notify()

    def finish(self, event: dict[str, Any], status: int = 200) -> None:
        if self.done:
            return
        self.accepted.set()
        self.events.append(event)
        self.status = status
        self.done = True
        self.finished_at = time.monotonic()
        self._cancel_orphan_timer()
        self._notify()
        if self._on_finish is not None:
            self._on_finish(self)

    def fail(self, exc: BaseException) -> None:
        status = wire.status_of(exc)
        if status >= 500 and not isinstance(exc, TimeoutError):
            logger.warning("engine operation %s failed", self.key, exc_info=exc)
        self.finish({"event": "error", "status": status, **wire.error_to_json(exc, status)}, status)

    @property
    def terminal(self) -> dict[str, Any] | None:
        return self.events[-1] if self.done else None

    async def wait(self) -> dict[str, Any]:
        while not self.done:
            await self._changed.wait()
        return self.events[-1]

    async def read(self, start: int = 0, heartbeat_s: float = HEARTBEAT_S) -> AsyncIterator[dict[str, Any]]:
        """The events from index ``start`` on, as they come, with a heartbeat whenever nothing was
        sent for ``heartbeat_s`` (so a reader can tell a slow engine from a lost server)."""
        position = max(0, start)
        while True:
            # Taken before anything can run: an event emitted from here on sets this one (the wait
            # below runs in a task of its own, which would otherwise read a newer, unset event).
            changed = self._changed
            while position < len(self.events):
                event = self.events[position]
                position += 1
                yield event
            if self.done:
                return
            if changed is not self._changed:
                continue  # something changed while the reader had the events handed out
            try:
                await asyncio.wait_for(changed.wait(), heartbeat_s)
            except TimeoutError:
                yield {"event": "heartbeat"}

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- readers and orphans -------------------------------------------------------------------------
    def attach(self) -> None:
        self.readers += 1
        self._cancel_orphan_timer()

    def detach(self, on_orphaned: Callable[[Operation], None], grace_s: float) -> None:
        self.readers -= 1
        if self.readers == 0 and not self.done and self.sample_ids:
            self._orphan_timer = asyncio.get_running_loop().call_later(grace_s, self._orphaned, on_orphaned)

    def _orphaned(self, on_orphaned: Callable[[Operation], None]) -> None:
        self._orphan_timer = None
        if self.readers == 0 and not self.done:
            on_orphaned(self)

    def _cancel_orphan_timer(self) -> None:
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None


class OperationLog:
    """Operations by idempotency key, the ids of running generations, and early aborts."""

    def __init__(self, *, retention_s: float = DEFAULT_RETENTION_S, max_finished: int = DEFAULT_MAX_FINISHED,
                 orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S, tombstone_s: float = DEFAULT_TOMBSTONE_S,
                 max_tombstones: int = DEFAULT_MAX_TOMBSTONES) -> None:
        self.retention_s = retention_s
        self.max_finished = max_finished
        self.orphan_grace_s = orphan_grace_s
        self.tombstone_s = tombstone_s
        self.max_tombstones = max_tombstones
        self._operations: dict[str, Operation] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # key -> when, oldest first
        self._running_ids: dict[str, Operation] = {}
        self._tombstones: OrderedDict[str, float] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._operations)

    def get(self, key: str) -> Operation | None:
        self._expire()
        return self._operations.get(key)

    def get_or_start(self, key: str, fingerprint: str, run: Callable[[Operation], Awaitable[None]]) -> Operation:
        """The operation under ``key``, started with ``run`` if it is new. Raises the ConfigError of
        :func:`key_reused` when ``key`` was used for a different body."""
        self._expire()
        existing = self._operations.get(key)
        if existing is not None:
            if existing.fingerprint != fingerprint:
                raise key_reused(key)
            return existing
        operation = Operation(key, fingerprint, self._finish)
        self._operations[key] = operation

        async def guarded() -> None:
            try:
                await run(operation)
            except asyncio.CancelledError:
                operation.fail(EngineDeadError("the engine server shut down during the call"))
                raise
            except Exception as exc:  # reported to every reader
                operation.fail(exc)

        task = asyncio.ensure_future(guarded())
        operation.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return operation

    def _finish(self, operation: Operation) -> None:
        self._finished[operation.key] = time.monotonic()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._finished:
            key, finished_at = next(iter(self._finished.items()))
            if now - finished_at <= self.retention_s and len(self._finished) <= self.max_finished:
                break
            del self._finished[key]
            self._operations.pop(key, None)
        while self._tombstones:
            key, expires = next(iter(self._tombstones.items()))
            if expires > now and len(self._tombstones) <= self.max_tombstones:
                break
            del self._tombstones[key]

    # -- generations and aborts ------------------------------------------------------------------------
    def track(self, operation: Operation, sample_ids: Sequence[str]) -> None:
        operation.sample_ids = list(sample_ids)
        for rid in operation.sample_ids:
            self._running_ids[rid] = operation

    def untrack(self, operation: Operation) -> None:
        for rid in operation.sample_ids:
            if self._running_ids.get(rid) is operation:
                del self._running_ids[rid]

    def split_abort(self, request_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """``request_ids`` as (running here, not received yet); the second are remembered so the
        requests are aborted on arrival."""
        running, unknown = [], []
        for rid in request_ids:
            (running if rid in self._running_ids else unknown).append(rid)
        self.remember_aborted(unknown)
        return running, unknown

    def remember_aborted(self, request_ids: Sequence[str]) -> None:
        expires = time.monotonic() + self.tombstone_s
        for rid in request_ids:
            self._tombstones[rid] = expires
            self._tombstones.move_to_end(rid)
        self._expire()

    def aborted_before_arrival(self, operation: Operation) -> list[str]:
        """The ids of a newly admitted generation that an earlier abort named (each is used once)."""
        now = time.monotonic()
        hits = [rid for rid in operation.sample_ids if self._tombstones.get(rid, 0.0) > now]
        for rid in hits:
            del self._tombstones[rid]
        return hits

    def running_ids(self) -> list[str]:
        return list(self._running_ids)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def key_reused(key: str) -> ConfigError:
    """An Idempotency-Key sent again with a different body (answered 409)."""
    return ConfigError("Idempotency-Key", f"{key!r} was already used for a different request; use a new key for "
                                          f"each call (the same key only to retry the same call)")


__all__ = ["HEARTBEAT_S", "Operation", "OperationLog", "key_reused"]
