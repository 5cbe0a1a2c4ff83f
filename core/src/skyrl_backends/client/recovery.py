"""Bringing lost engines back into a pool: restart, restore the current weights, rejoin routing.

The client fails over by itself (an engine that stops answering is marked unhealthy and its requests
go to the others); it does not start engines, which depends on where they run. ``EngineRecovery``
does, with two functions the trainer gives it::

    recovery = EngineRecovery(client, restart=lambda engine_id, lost: restart_ray_engine(lost),
                              restore=push_current_weights)
    await recovery.recover()      # after a failure, or periodically

* ``restart(engine_id, lost_engine)`` returns a new engine (or an awaitable of one): a Ray actor on a
  live node (:func:`skyrl_backends.ray_wrapper.restart_ray_engine`), a remote engine reconnected to a
  restarted server, a new local engine;
* ``restore(engine)`` gives it the weights the pool serves now (a broadcast over a group of its own,
  shared memory...), before any request reaches it;

then :meth:`InferenceEngineClient.replace_engine` puts it in the lost engine's place, healthy, under
the same id, so the sessions of that id return to it. An engine whose restart or restore fails stays
out of rotation and is tried again by the next :meth:`recover`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from skyrl_backends.protocols import Engine

logger = logging.getLogger(__name__)

Restart = Callable[[str, Engine], "Engine | Awaitable[Engine]"]
Restore = Callable[[Engine], Awaitable[Any]]


@dataclass
class Recovered:
    """One engine brought back: its id, the engine now serving and the one it replaced."""

    engine_id: str
    engine: Engine
    replaced: Engine


class EngineRecovery:
    def __init__(self, client: Any, restart: Restart, restore: Restore) -> None:
        self.client = client
        self.restart = restart
        self.restore = restore
        self.failures: dict[str, str] = {}

    def lost(self) -> list[str]:
        """The ids of the pool's engines that are out of rotation."""
        return [engine_id for engine_id, health in self.client.health().items() if not health["healthy"]]

    async def recover(self) -> list[Recovered]:
        """Restart, restore and put back every engine that is out of rotation; returns those brought back
        (the others' errors are in :attr:`failures` and the log)."""
        recovered = []
        for engine_id in self.lost():
            lost = self.client.engine(engine_id)
            try:
                engine = self.restart(engine_id, lost)
                if inspect.isawaitable(engine):
                    engine = await engine
                await self.restore(engine)
            except Exception as exc:  # left out of rotation; the next recover() tries again
                self.failures[engine_id] = f"{type(exc).__name__}: {exc}"
                logger.warning("could not bring engine %s back: %r", engine_id, exc)
                continue
            self.failures.pop(engine_id, None)
            replaced = self.client.replace_engine(engine_id, engine)
            logger.info("engine %s is back in rotation", engine_id)
            recovered.append(Recovered(engine_id, engine, replaced))
        return recovered


__all__ = ["EngineRecovery", "Recovered"]
