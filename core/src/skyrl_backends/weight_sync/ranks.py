"""The trainer's ranks during one collective weight sync: who sends, and how the ranks agree.

A model sharded across trainer processes (FSDP2) is synced by every rank of the trainer's process
group together: each rank holds part of every tensor. One rank (rank 0 of the group, the *sending
rank*) talks to the engines; the others contribute their shards. Every rank must therefore make the
same call, and a rank that calls differently must not leave the others waiting in a collective.

:class:`TrainerRanks` does the agreeing, over the group's own key-value store (the one
``init_process_group`` created) rather than over collectives, so every wait has a timeout and a
rank that is missing or out of step is named in the error:

1. every rank posts what it was asked to do (:meth:`TrainerRanks.handshake`); a difference in
   strategy, bucket size or model between ranks is a :class:`WeightUpdateError` on every rank;
2. the sending rank posts the plan, or the error that stopped it (validation by the engines comes
   before any byte moves), and the others read it (:meth:`publish` / :meth:`receive`);
3. after the bytes moved, the sending rank posts the engines' versions or their error, so every rank
   returns the same versions or raises the same error.

Keys are numbered by a per-process count of syncs on the group: every rank counts the syncs it
entered, so a rank that skipped one is found at the next handshake.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from skyrl_backends.errors import WeightUpdateError

KEY_PREFIX = "skyrl_weight_sync/"
DEFAULT_TIMEOUT_S = 300.0
# Syncs entered per group, in this process (keys of the n-th sync carry n).
_sequence: dict[Any, int] = {}
# The keys the sending rank used in the last sync per group, deleted once every rank has entered the
# next one (and so has read them all).
_keys_in_use: dict[Any, list[str]] = {}


def _group_store(group: Any) -> Any:
    """The key-value store the process group was created with."""
    try:
        store = dist.distributed_c10d._get_process_group_store(group)
    except (AttributeError, KeyError):
        raise WeightUpdateError({"group": "cannot reach the process group's store; create the group with "
                                          "torch.distributed.init_process_group (or new_group)"}) from None
    return dist.PrefixStore(KEY_PREFIX, store)


class TrainerRanks:
    """This process's view of the trainer's group for one sync (``group=None``: the default group)."""

    def __init__(self, group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise WeightUpdateError({"group": "a model sharded across ranks needs torch.distributed initialised "
                                              "(init_process_group) on every trainer rank"})
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.global_ranks: list[int] = dist.get_process_group_ranks(self.group)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = _group_store(self.group)
        self._group_key = id(self.group)
        self.sequence = _sequence.get(self._group_key, 0) + 1
        _sequence[self._group_key] = self.sequence
        self._keys: list[str] = []

    @property
    def is_sender(self) -> bool:
        """Whether this rank talks to the engines (rank 0 of the group)."""
        return self.rank == 0

    @property
    def sender_global_rank(self) -> int:
        return self.global_ranks[0]

    def _key(self, what: str, sequence: int | None = None) -> str:
        return f"{self.sequence if sequence is None else sequence}/{what}"

    # -- posting and waiting --------------------------------------------------------------------
    def post(self, what: str, value: Any) -> None:
        key = self._key(what)
        self._keys.append(key)
        self.store.set(key, json.dumps(value))

    def wait_for(self, whats: Sequence[str], waiting_for: str, labels: Sequence[str] | None = None) -> list[Any]:
        """The values posted under ``whats`` (each a JSON value), waiting up to the timeout;
        ``labels`` name them in the error (default: the keys)."""
        keys = [self._key(w) for w in whats]
        self._keys.extend(keys)
        try:
            self.store.wait(keys, self.timeout)
        except Exception:  # torch raises DistStoreError (or RuntimeError) on timeout
            missing = [label for label, k in zip(labels or whats, keys, strict=True) if not self.store.check([k])]
            raise WeightUpdateError({"ranks": (
                f"sync #{self.sequence}: gave up after {self.timeout.total_seconds():g}s waiting for "
                f"{waiting_for} (missing: {', '.join(missing)}); every rank of the trainer's group must call the "
                f"same sync (a rank that skipped it, crashed or is stuck is the cause)")}) from None
        return [json.loads(self.store.get(k)) for k in keys]

    def wait_unless_failed(self, what: str, waiting_for: str) -> Any:
        """The value posted under ``what``; if the sending rank posts its result first (it failed),
        raise its error instead of waiting for the timeout."""
        key, result = self._key(what), self._key("result")
        deadline = time.monotonic() + self.timeout.total_seconds()
        delay = 0.0002
        while not self.store.check([key]):
            if self.store.check([result]):
                raise_posted_error(json.loads(self.store.get(result)))
            if time.monotonic() > deadline:
                self.wait_for([what], waiting_for)  # raises the timeout error naming what is missing
            time.sleep(delay)
            delay = min(2 * delay, 0.005)
        return json.loads(self.store.get(key))

    # -- the three steps ------------------------------------------------------------------------
    def handshake(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        """Post this rank's ``call`` (what it was asked to do) and read every rank's. Raises the same
        :class:`WeightUpdateError` on every rank if they differ in any key but ``"local"`` (facts
        about the rank itself, returned for the caller to combine)."""
        self.post(f"hello/{self.rank}", call)
        try:
            calls = self.wait_for([f"hello/{r}" for r in range(self.size)], "every rank to enter the sync",
                                  [f"rank {r}" for r in range(self.size)])
        except WeightUpdateError:
            # This sync did not happen: the next call takes its number again, so a rank that was late
            # (or skipped it) meets this one there instead of the ranks staying out of step.
            self.store.delete_key(self._key(f"hello/{self.rank}"))
            _sequence[self._group_key] = self.sequence - 1
            raise
        if self.is_sender:
            self._forget_previous_sync()
        problems = {}
        for rank, other in enumerate(calls[1:], start=1):
            for field, mine in calls[0].items():
                if field == "local" or other.get(field) == mine:
                    continue
                problems[f"rank {rank}: {field}"] = _difference(field, mine, other.get(field))
        if problems:
            problems["ranks"] = ("every rank of the trainer's group must call the sync with the same strategy, "
                                 "bucket size and model (differences above are against rank 0)")
            raise WeightUpdateError(problems)
        return calls

    def publish(self, what: str, value: Any) -> None:
        """The sending rank's word to the others (a plan, a result or an error)."""
        self.post(what, value)

    def receive(self, what: str, waiting_for: str) -> Any:
        [value] = self.wait_for([what], waiting_for)
        return value

    def _forget_previous_sync(self) -> None:
        """Delete the keys of the group's previous sync: every rank has entered this one, so every
        rank has read them."""
        for key in _keys_in_use.pop(self._group_key, []):
            try:
                self.store.delete_key(key)
            except Exception:  # pragma: no cover - a store that cannot delete keeps them
                break
        _keys_in_use[self._group_key] = self._keys


def raise_posted_error(value: Any) -> None:
    """Re-raise an error the sending rank posted (``{"error": problems}``)."""
    if isinstance(value, dict) and "error" in value:
        error = value["error"]
        raise WeightUpdateError(error if isinstance(error, dict) else {"sender": str(error)})


def error_value(exc: BaseException) -> dict[str, Any]:
    """``exc`` as a value to post: a WeightUpdateError keeps its problems."""
    if isinstance(exc, WeightUpdateError):
        return {"error": dict(exc.problems)}
    return {"error": {"sending rank": f"{type(exc).__name__}: {exc}"}}


def _difference(field: str, mine: Any, other: Any) -> str:
    if field == "model" and isinstance(mine, list) and isinstance(other, list):
        for index, (a, b) in enumerate(zip(mine, other, strict=False)):
            if a != b:
                return f"tensor {index} is {b!r} here but {a!r} on rank 0"
        return f"{len(other)} tensors here but {len(mine)} on rank 0"
    return f"{other!r} here but {mine!r} on rank 0"
