"""Helpers for streamed generation in the client and the HTTP endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """``(stream number, item)`` from several async iterators as items arrive. The first error of
    any stream is raised; leaving early (or an error) cancels the streams still running."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None, bool]] = asyncio.Queue()

    async def pump(number: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((number, item, None, False))
            queue.put_nowait((number, None, None, True))
        except Exception as error:  # handed to the consumer
            queue.put_nowait((number, None, error, True))

    tasks = [asyncio.ensure_future(pump(number, stream)) for number, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            number, item, error, ended = await queue.get()
            if error is not None:
                raise error
            if ended:
                running -= 1
                continue
            yield number, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
