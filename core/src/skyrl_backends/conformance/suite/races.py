"""Bounded waits and retried races for the tests that land an abort while a request runs.

An abort sent once a request is in flight (or once a stream has handed out its first tokens) races
the engine: a fast engine behind a wire (a tiny model on a server, a loaded machine delaying the
abort's HTTP call) can finish ``long_generation`` tokens before the abort arrives. That attempt says
nothing about the engine's abort, so it is run again, a few times; an engine that ignores aborts
loses every attempt and fails with a message that says so. Waits are bounded, so an engine that
never takes a request fails the test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion

T = TypeVar("T")

# How long a request may take to be in flight, or an aborted request to return, before the test gives
# up on it: a bound against hanging on a broken engine, not a speed requirement.
WAIT_S = 120.0
# Attempts at landing an abort mid-way before the engine is judged to ignore it.
RACE_ATTEMPTS = 3


async def until_inflight(engine: Any, count: int = 1, timeout_s: float = WAIT_S) -> None:
    """Until the engine holds at least ``count`` requests (``num_inflight``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while engine.num_inflight < count:
        if loop.time() > deadline:
            raise AssertionError(f"{count} request(s) were sent but the engine held {engine.num_inflight} after "
                                 f"{timeout_s:.0f} s (num_inflight never counted them)")
        await asyncio.sleep(0.005)


def ran_to_the_end(completion: Completion, params: SamplingParams) -> bool:
    """Whether a request the test meant to abort finished on its own first: every token it asked for,
    finish reason ``length``. (An engine that aborts but reports ``length`` stops short: that is not a
    lost race, and the test's own assertion names it.)"""
    return completion.finish_reason == "length" and len(completion.token_ids) >= params.max_generate_length


def retry_lost_race(attempt: Callable[[int], T], lost: Callable[[T], bool], what: str,
                    attempts: int = RACE_ATTEMPTS) -> T:
    """``attempt(0)``, ``attempt(1)``, ... until one did not lose the race (``lost(result)`` false);
    returns that result for the test's own assertions. Fails when every attempt lost."""
    for number in range(attempts):
        result = attempt(number)
        if not lost(result):
            return result
    raise AssertionError(f"{what}: in {attempts} attempts the request always ran to its full length before the "
                         f"abort arrived; the engine ignores aborts, or finishes long_generation tokens faster "
                         f"than an abort reaches it")


__all__ = ["RACE_ATTEMPTS", "WAIT_S", "ran_to_the_end", "retry_lost_race", "until_inflight"]
