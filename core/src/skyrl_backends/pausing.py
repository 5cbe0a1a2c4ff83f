"""The engine facade's admission gate: new requests wait here while the engine must take none.

The gate closes for a pause (every mode admits nothing new until resume) and, on a backend that does
not label tokens with weight versions, while a weight update waits for the requests in flight to
finish (so no request of such a backend ever spans an update). Requests waiting at the gate hold no
engine resources; an abort that names them (or aborts everything) lets them through at once with
nothing generated, and a teardown lets them through to find the engine closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class AdmissionGate:
    """Closed by any number of holders (a pause, an update barrier); open when none holds it."""

    def __init__(self) -> None:
        self._holders: set[str] = set()
        self._changed: asyncio.Event | None = None
        self._aborted: set[str] = set()
        self._abort_epoch = 0
        self._waiting: set[str] = set()

    @property
    def is_open(self) -> bool:
        return not self._holders

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def close(self, holder: str) -> None:
        self._holders.add(holder)
        self._notify()

    def open(self, holder: str) -> None:
        self._holders.discard(holder)
        self._notify()

    def release_all(self) -> None:
        """Let every waiter through (the engine is closing: they will find it closed)."""
        self._holders.clear()
        self._notify()

    def abort(self, request_ids: Iterable[str] | None) -> None:
        """Abort waiting requests (None: all of them); they pass the gate with nothing to run."""
        if request_ids is None:
            self._abort_epoch += 1
        else:
            self._aborted.update(rid for rid in request_ids if rid in self._waiting)
        self._notify()

    async def enter(self, request_ids: list[str]) -> set[str]:
        """Wait until the gate is open; returns the ids aborted while waiting (all of them when
        the whole engine was aborted meanwhile)."""
        if self.is_open:
            return set()
        epoch = self._abort_epoch
        self._waiting.update(request_ids)
        try:
            while not self.is_open:
                if self._abort_epoch != epoch or all(rid in self._aborted for rid in request_ids):
                    break
                await self._event().wait()
            if self._abort_epoch != epoch:
                return set(request_ids)
            return {rid for rid in request_ids if rid in self._aborted}
        finally:
            self._waiting.difference_update(request_ids)
            self._aborted.difference_update(request_ids)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        # Created lazily inside the engine's loop; replaced on every change, waking every waiter.
        event, self._changed = self._changed, None
        if event is not None:
            event.set()
