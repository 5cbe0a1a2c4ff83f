"""An event loop on a thread of its own, for synchronous callers of async engines.

Some engines bind background tasks to the loop that first used them (vLLM's output handler), so
everything that drives them must run on one loop: tests, a notebook, and the HTTP server alike.
``LoopThread`` is that loop; ``run`` submits a coroutine and waits for its result (bounded).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "skyrl-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 600.0) -> T:
        """Run ``coro`` on the loop and return its result; after ``timeout_s`` it is cancelled and
        TimeoutError raised (nothing waits forever)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run was called from its own loop thread, which would wait for "
                               "itself forever; await the coroutine instead.")
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"coroutine did not finish within {timeout_s}s") from None

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a synchronous function on the loop thread (for objects that must be created there)."""
        async def wrapper() -> Any:
            return fn(*args, **kwargs)

        return self.run(wrapper())

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
