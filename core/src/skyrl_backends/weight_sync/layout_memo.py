"""Receiver side: remember the last validated layout and the views it gave into the receive buffers.

A trainer sends the same layout (names, dtypes, shapes, offsets) into the same buffers at every step.
Validating 300+ manifest entries and slicing as many views costs milliseconds of Python, more than
moving the bytes on a GPU. A request whose layout equals the remembered one, compared field by field
(so no validation is skipped for anything new), into buffers at the same addresses, gets the
remembered views back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.manifest import PLAN_FIELD


@dataclass
class _Remembered:
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    plan: Any  # the payload's plan (manifest.PLAN_FIELD), None for spelled-out manifests
    buckets: list[Any]  # the payload's buckets without their volatile fields, as received
    addresses: list[int | None]  # data_ptr of each bucket's buffer
    views: Any  # what the receiver made of the layout: its (name, view) pairs, grouped as it needs them


class LayoutMemo:
    """The last layout a receiver validated. ``volatile`` names bucket fields that change at every
    update without changing the layout (CUDA IPC's handle fields, which are checked separately)."""

    def __init__(self, volatile: Sequence[str] = ()) -> None:
        self._volatile = tuple(volatile)
        self._last: _Remembered | None = None

    def matches(self, request: WeightUpdateRequest) -> bool:
        """Whether ``request`` has exactly the layout validated last time."""
        last = self._last
        payload = request.payload if isinstance(request.payload, dict) else {}
        buckets = payload.get("buckets")
        # Compared as lists (WeightUpdateRequest keeps them so) with no copies: a layout named by id
        # (layout_refs) arrives as the very lists (and shape tuples) remembered here, so each element
        # compares by identity first.
        return (last is not None and isinstance(buckets, list) and request.names == last.names
                and request.dtypes == last.dtypes and request.shapes == last.shapes
                and payload.get(PLAN_FIELD) == last.plan and self._layout(buckets) == last.buckets)

    def views(self, buffers: Sequence[torch.Tensor | None]) -> Any:
        """The remembered views, if ``buffers`` are the remembered ones (call after :meth:`matches`);
        else None."""
        last = self._last
        if last is None or _addresses(buffers) != last.addresses:
            return None
        return last.views

    def remember(self, request: WeightUpdateRequest, buffers: Sequence[torch.Tensor | None], views: Any) -> None:
        """Called with a request that passed validation and the views made for it."""
        # Shapes are tuples (WeightUpdateRequest makes them so): the copy keeps those very objects.
        self._last = _Remembered(list(request.names), list(request.dtypes),
                                 [s if type(s) is tuple else tuple(s) for s in request.shapes],
                                 request.payload.get(PLAN_FIELD), self._layout(request.payload["buckets"]),
                                 _addresses(buffers), views)

    def forget(self) -> None:
        self._last = None

    def _layout(self, buckets: list[Any]) -> list[Any]:
        if not self._volatile:
            return list(buckets)
        return [{k: v for k, v in b.items() if k not in self._volatile} if isinstance(b, dict) else b
                for b in buckets]


def _addresses(buffers: Sequence[torch.Tensor | None]) -> list[int | None]:
    return [None if b is None else b.data_ptr() for b in buffers]
