"""Weight-update requests in JSON that name their layout instead of spelling it out again.

A trainer sends the same layout (names, dtypes, shapes) at every step, and in JSON the layout is most
of a request: 22 KB for a 1.5B model, 176 KB for the 2,361 tensors of a 6-layer Qwen3 MoE shape,
whose encoding, parsing and checking took 4 ms of each 22 ms sync on an H100's host. A receiver
that keeps layouts (:class:`ReceivedLayouts`; a server says so in its ``/info``,
:data:`INFO_FIELD`) is sent each layout once in full, with an id (:data:`LAYOUT_FIELD`), and from
then on the id alone, with the strategy's payload.

The receiver keeps the last :data:`KEPT` layouts it checked. An id it does not know (it restarted,
or was sent :data:`KEPT` other layouts since) is refused with a ``WeightUpdateError`` naming
``layout_id``, before anything is applied, and :class:`SentLayouts` forgets that the receiver knew
it, so the sender sends the request in full again (:func:`refused_layout` tells that refusal apart).
Nothing else changes: a request by id is checked by the engine as a spelled-out one is.

Torch-free, like :mod:`skyrl_backends.weight_sync.manifest`: a server decodes requests with it.
"""

from __future__ import annotations

import copy
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.manifest import check_envelope, envelope_to_json, request_from_json, request_to_json

LAYOUT_FIELD = "layout_id"
INFO_FIELD = "kept_layouts"  # in a server's /info: how many layouts it keeps (absent: none)
KEPT = 8
_LAYOUT_FIELDS = ("names", "dtypes", "shapes")
_LAYOUT_ID = re.compile(r"^[0-9a-f]{16,64}$")
_Layout = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...]]


class SentLayouts:
    """The sender's side, one per receiver: an id for each layout it sends, and which ids the
    receiver has taken (call :meth:`taken` after the receiver accepted a request, :meth:`refused`
    with any error it raised)."""

    def __init__(self, remembered: int = 64) -> None:
        self._ids: OrderedDict[_Layout, str] = OrderedDict()
        self._taken: set[str] = set()
        self._remembered = remembered  # layouts this side names (a trainer has one or two)
        # The layout sent last, as lists of its names, dtypes and shapes, and its id: a trainer sends
        # the same layout at every step, as the very lists (PackPlan.request), which compare element
        # by element by identity first, where a lookup would build and hash tuples of every shape.
        self._last: tuple[list[str], list[str], list[Any], str] | None = None

    def to_json(self, request: WeightUpdateRequest) -> tuple[dict[str, Any], str]:
        """``request`` as JSON, by id if the receiver has taken its layout, else in full with its id;
        and the id."""
        last = self._last
        if (last is not None and last[3] in self._taken and request.names == last[0]
                and request.dtypes == last[1] and request.shapes == last[2]):  # lists (WeightUpdateRequest)
            return envelope_to_json(request) | {LAYOUT_FIELD: last[3]}, last[3]
        layout = (tuple(request.names), tuple(request.dtypes), tuple(request.shapes))
        layout_id = self._ids.get(layout)
        if layout_id is None:
            layout_id = self._ids[layout] = secrets.token_hex(8)
            if len(self._ids) > self._remembered:
                self._taken.discard(self._ids.popitem(last=False)[1])
        else:
            self._ids.move_to_end(layout)
        self._last = (list(layout[0]), list(layout[1]), list(layout[2]), layout_id)
        if layout_id in self._taken:
            return envelope_to_json(request) | {LAYOUT_FIELD: layout_id}, layout_id
        return request_to_json(request) | {LAYOUT_FIELD: layout_id}, layout_id

    def taken(self, layout_id: str) -> None:
        """The receiver accepted a request of this layout: from now on it is sent by id."""
        self._taken.add(layout_id)

    def refused(self, layout_id: str, exc: BaseException) -> bool:
        """After the receiver refused a request of ``layout_id``: whether it refused the id itself
        (then it is sent in full again, and the caller may resend at once)."""
        if not refused_layout(exc):
            return False
        self._taken.discard(layout_id)
        return True


def refused_layout(exc: BaseException) -> bool:
    """Whether ``exc`` is a receiver's refusal of a layout id it does not know."""
    problems = getattr(exc, "problems", None)
    return isinstance(exc, WeightUpdateError) and isinstance(problems, Mapping) and LAYOUT_FIELD in problems


class ReceivedLayouts:
    """The receiver's side: the last ``kept`` layouts it checked, by id."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self._layouts: OrderedDict[str, WeightUpdateRequest] = OrderedDict()

    def from_json(self, obj: Any) -> WeightUpdateRequest:
        """The request of ``obj`` (checked as :func:`manifest.request_from_json` checks it), whether it
        spells its layout out (with an id or without) or names it by id."""
        if not isinstance(obj, Mapping) or LAYOUT_FIELD not in obj:
            return request_from_json(obj)
        layout_id = obj[LAYOUT_FIELD]
        if not isinstance(layout_id, str) or not _LAYOUT_ID.match(layout_id):
            raise WeightUpdateError({LAYOUT_FIELD: f"expected 16-64 lowercase hex digits, got {layout_id!r}"})
        if any(field in obj for field in _LAYOUT_FIELDS):
            request = request_from_json(obj)
            self._layouts[layout_id] = copy.copy(request)
            self._layouts[layout_id].payload = None  # the layout is kept, not the payload
            while len(self._layouts) > self.kept:
                self._layouts.popitem(last=False)
            return request
        strategy, check_finite = check_envelope(obj)
        known = self._layouts.get(layout_id)
        if known is None:
            raise WeightUpdateError({LAYOUT_FIELD: (
                f"{layout_id} is not a layout this engine keeps (it restarted, or was sent {self.kept} other layouts "
                f"since): send the request in full, with its names, dtypes and shapes")})
        self._layouts.move_to_end(layout_id)
        # A copy of the checked request: its lists are shared (read-only) and nothing is checked twice.
        request = copy.copy(known)
        request.strategy, request.payload, request.check_finite = strategy, obj.get("payload"), check_finite
        return request


__all__ = ["INFO_FIELD", "KEPT", "LAYOUT_FIELD", "ReceivedLayouts", "SentLayouts", "refused_layout"]
