"""The wire format of a weight update: what crosses a process boundary, and its strict validation.

A non-``"tensors"`` :class:`~skyrl_backends.types.WeightUpdateRequest` carries a JSON-able
``payload``: a list of *buckets*, each one contiguous byte buffer holding several tensors, described
by a manifest of ``(name, dtype, shape, offset)``, or, from a sender that planned its buckets with
:func:`plan_buckets` (every sender of this package), by that plan (``payload["plan"]``), from which
the receiver derives the same manifests out of the request's own names, dtypes and shapes. Where
the bytes live depends on the strategy (a shared-memory segment, a CUDA IPC handle, the next
``broadcast`` of the process group); the manifest is the same for all of them. Nothing here is
ever unpickled: requests are plain JSON values and every field is checked (types, dtype allow-list,
bounds, overlaps, agreement with the request's top-level names, dtypes and shapes that the engine
facade validated) before a byte is interpreted.

This module does not import torch, so a server can validate a request before handing it on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.delivery import mismatches

WIRE_VERSION = 1
# Offsets of tensors inside a bucket are multiples of this, so every view is aligned for any dtype
# and for vectorised copies on CPU and GPU.
ALIGNMENT = 256
# Upper bound on one bucket, to reject absurd sizes before any allocation (1 TiB).
MAX_BUCKET_BYTES = 1 << 40

# dtype name (torch spelling, without "torch.") -> bytes per element. Only these travel.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
TRANSPORT_STRATEGIES: tuple[str, ...] = ("shared_memory", "cuda_ipc", "broadcast")


# A broadcast update's payload names how its bytes travel and how the engine applies them
# (skyrl_backends.weight_sync.broadcast describes both).
BROADCAST_LAYOUTS: tuple[str, ...] = ("packed", "per_tensor")
APPLY_MODES: tuple[str, ...] = ("atomic", "streamed")


def check_broadcast_modes(layout: Any, apply: Any, where: str = "") -> None:
    """Raise WeightUpdateError for an unknown ``layout`` or ``apply``, or a streamed update that is not
    packed (``where`` prefixes the field names, e.g. ``"payload."``)."""
    problems = {}
    if layout not in BROADCAST_LAYOUTS:
        problems[f"{where}layout"] = f"got {layout!r}; expected one of {list(BROADCAST_LAYOUTS)}"
    if apply not in APPLY_MODES:
        problems[f"{where}apply"] = f"got {apply!r}; expected one of {list(APPLY_MODES)}"
    elif apply == "streamed" and layout != "packed":
        problems[f"{where}apply"] = ("'streamed' applies packed buckets as they arrive; use layout='packed' "
                                     "(engines that receive per tensor natively, like SGLang, apply atomically)")
    if problems:
        raise WeightUpdateError(problems)


def is_streamed(request: WeightUpdateRequest) -> bool:
    """Whether the trainer asked for a broadcast that the engine applies bucket by bucket as it
    arrives (``payload["apply"] == "streamed"``), which a failed transfer can leave half applied."""
    payload = request.payload
    return (request.strategy == "broadcast" and isinstance(payload, Mapping)
            and payload.get("apply") == "streamed")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside its bucket."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}


@dataclass(frozen=True)
class BucketManifest:
    """The layout of one packed bucket: ``nbytes`` bytes holding ``tensors``."""

    nbytes: int
    tensors: tuple[TensorEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_trusted_json(cls, obj: dict[str, Any]) -> BucketManifest:
        """The manifest :meth:`to_json` wrote, read back unchecked: only for JSON this project wrote
        itself after validating it (a request from outside goes through :func:`parse_buckets`)."""
        return cls(obj["nbytes"], tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"])
                                        for t in obj["tensors"]))


def aligned(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def plan_buckets(specs: list[tuple[str, str, tuple[int, ...]]], bucket_bytes: int,
                 alignment: int = ALIGNMENT) -> list[BucketManifest]:
    """Group ``(name, dtype, shape)`` in order into buckets of at most ``bucket_bytes`` bytes (a
    tensor larger than that gets a bucket of its own)."""
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise WeightUpdateError({"bucket_bytes": f"got {bucket_bytes!r}; give a positive number of bytes"})
    buckets: list[BucketManifest] = []
    current: list[TensorEntry] = []
    used = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_ITEMSIZE:
            raise WeightUpdateError({name: f"dtype {dtype!r} cannot be sent; allowed: {sorted(DTYPE_ITEMSIZE)}"})
        size = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        start = aligned(used, alignment)
        if current and start + size > bucket_bytes:
            buckets.append(BucketManifest(used, tuple(current)))
            current, used, start = [], 0, 0
        current.append(TensorEntry(name, dtype, tuple(shape), start))
        used = start + size
    if current:
        buckets.append(BucketManifest(used, tuple(current)))
    return buckets


# The buckets planned last time, handed out again (the same objects) for the same tensors: a training
# run plans the same layout at every step, on the sender's side and, for a planned payload, on the
# receiver's, and the caches of both compare layouts, which is quickest when they are the very
# objects seen before. One tuple, replaced whole, so that threads planning at once never see one
# layout's key with another's buckets.
_last_planned: tuple[tuple[Any, ...], list[BucketManifest]] | None = None


def planned_once(names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]], bucket_bytes: int,
                 alignment: int = ALIGNMENT) -> list[BucketManifest]:
    """:func:`plan_buckets` of these tensors, the same manifest objects as last time for the same
    arguments (a new list: the caller may change the list, never the manifests)."""
    global _last_planned
    last = _last_planned
    # Compared as given (no copies on the way: this runs at every update); kept as copies
    if last is None or last[0] != (bucket_bytes, alignment, names, dtypes, shapes):
        key = (bucket_bytes, alignment, list(names), list(dtypes), [tuple(s) for s in shapes])
        last = _last_planned = (key, plan_buckets(list(zip(names, dtypes, shapes, strict=True)), bucket_bytes,
                                                  alignment))
    return list(last[1])


# A planned payload names how its buckets were planned instead of describing every tensor again:
# {"plan": {"bucket_bytes": N, "alignment": A}, "buckets": [{"nbytes": n, ...}, ...]}. The receiver
# plans the same buckets from the request's names, dtypes and shapes (validated once, at the top
# level). A 1.5B model's request is a sixth of the JSON of its spelled-out form, and encoding,
# sending and decoding that JSON at every step cost more than a GPU's copy of its buckets' bytes.
PLAN_FIELD = "plan"
MAX_ALIGNMENT = 1 << 16


def plan_json(bucket_bytes: int, alignment: int = ALIGNMENT) -> dict[str, int]:
    """The ``payload["plan"]`` of buckets planned by :func:`plan_buckets` with these arguments."""
    return {"bucket_bytes": bucket_bytes, "alignment": alignment}


def planned_buckets(request: WeightUpdateRequest, plan: Any) -> list[BucketManifest]:
    """The manifests that ``plan`` (a ``payload["plan"]``) gives for the request's tensors."""
    if not isinstance(plan, Mapping):
        raise WeightUpdateError({"payload.plan": f"expected an object with bucket_bytes and alignment, got "
                                                 f"{type(plan).__name__}"})
    problems = {}
    bucket_bytes, alignment = plan.get("bucket_bytes"), plan.get("alignment", ALIGNMENT)
    if not _is_int(bucket_bytes) or not 0 < bucket_bytes <= MAX_BUCKET_BYTES:
        problems["payload.plan.bucket_bytes"] = f"got {bucket_bytes!r}; expected an integer in [1, {MAX_BUCKET_BYTES}]"
    if not _is_int(alignment) or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        problems["payload.plan.alignment"] = f"got {alignment!r}; expected a power of two up to {MAX_ALIGNMENT}"
    unknown = sorted(set(plan) - {"bucket_bytes", "alignment"})
    if unknown:
        problems["payload.plan"] = f"unknown field(s) {unknown}; a plan has bucket_bytes and alignment"
    for name, shape in zip(request.names, request.shapes, strict=True):
        for dim in shape:  # integers already (WeightUpdateRequest makes them so); a plain loop, per update
            if dim < 0:
                problems[name] = f"shape must be a list of non-negative integers, got {list(shape)!r}"
                break
    if problems:
        raise WeightUpdateError(problems)
    return planned_once(request.names, request.dtypes, request.shapes, bucket_bytes, alignment)


def spelled_out(request: WeightUpdateRequest) -> WeightUpdateRequest:
    """``request`` with every bucket's manifest written out (a planned payload without its plan),
    for a reader that wants the manifests, or a test that edits one; other requests as they are."""
    payload = request.payload
    if not isinstance(payload, Mapping) or PLAN_FIELD not in payload:
        return request
    manifests = planned_buckets(request, payload[PLAN_FIELD])
    buckets = [{**bucket, **manifest.to_json()} for bucket, manifest in zip(payload["buckets"], manifests,
                                                                            strict=True)]
    rest = {k: v for k, v in payload.items() if k != PLAN_FIELD}
    return WeightUpdateRequest(request.names, request.dtypes, request.shapes, request.strategy,
                               {**rest, "buckets": buckets}, check_finite=request.check_finite)


# -- validation of what arrives ----------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_buckets(request: WeightUpdateRequest,
                  extra_fields: tuple[str, ...] = ()) -> list[tuple[BucketManifest, dict[str, Any]]]:
    """Validate ``request.payload["buckets"]`` and return ``(manifest, bucket_dict)`` per bucket.

    Raises :class:`WeightUpdateError` naming every problem: a field of the wrong type, a dtype off the
    allow-list, a negative dimension, a tensor outside its bucket or overlapping another, a tensor
    missing from the payload or one the request did not declare, or a payload entry whose dtype or
    shape disagrees with the validated top-level request. A planned payload's manifests are derived
    from its plan (:func:`planned_buckets`); its buckets must be as many and as large as planned.
    ``extra_fields`` are strategy-specific keys each bucket must carry (checked for presence only;
    the strategy checks their values)."""
    problems: dict[str, str] = {}
    payload = request.payload
    if not isinstance(payload, Mapping) or not isinstance(payload.get("buckets"), list):
        raise WeightUpdateError({"payload": f"expected an object with a 'buckets' list for strategy "
                                            f"{request.strategy!r}, got {type(payload).__name__}"})
    if PLAN_FIELD in payload:
        return _parse_planned(request, payload["buckets"], payload[PLAN_FIELD], extra_fields)
    delivered: list[TensorEntry] = []  # every well-formed entry of every bucket, in order
    seen: set[str] = set()
    result: list[tuple[BucketManifest, dict[str, Any]]] = []
    for b, bucket in enumerate(payload["buckets"]):
        where = f"payload.buckets[{b}]"
        if not isinstance(bucket, Mapping):
            problems[where] = f"expected an object, got {type(bucket).__name__}"
            continue
        missing = [k for k in ("nbytes", "tensors", *extra_fields) if k not in bucket]
        if missing:
            problems[where] = f"missing field(s) {missing}"
            continue
        nbytes = bucket["nbytes"]
        if not _is_int(nbytes) or not 0 <= nbytes <= MAX_BUCKET_BYTES:
            problems[f"{where}.nbytes"] = f"got {nbytes!r}; expected an integer in [0, {MAX_BUCKET_BYTES}]"
            continue
        if not isinstance(bucket["tensors"], list):
            problems[f"{where}.tensors"] = "expected a list"
            continue
        entries: list[TensorEntry] = []
        for t, raw in enumerate(bucket["tensors"]):
            entry = _parse_entry(raw, f"{where}.tensors[{t}]", nbytes, problems)
            if entry is None:
                continue
            delivered.append(entry)
            if entry.name not in seen:  # a second one is named by the declaration check below
                seen.add(entry.name)
                entries.append(entry)
        ordered = sorted(entries, key=lambda e: e.offset)
        for prev, nxt in zip(ordered, ordered[1:], strict=False):
            if prev.offset + prev.nbytes > nxt.offset:
                problems[nxt.name] = f"overlaps {prev.name!r} in {where}"
        result.append((BucketManifest(nbytes, tuple(entries)), dict(bucket)))
    # The tensors these manifests describe are the ones the engine will load: they must be exactly
    # the declared ones (the one rule for every strategy, skyrl_backends.weight_sync.delivery).
    for name, why in mismatches(request, [(e.name, e.dtype, e.shape) for e in delivered]).items():
        problems.setdefault(name, why)
    if problems:
        raise WeightUpdateError(problems)
    return result


def _parse_planned(request: WeightUpdateRequest, buckets: list[Any], plan: Any,
                   extra_fields: tuple[str, ...]) -> list[tuple[BucketManifest, dict[str, Any]]]:
    # Planned from the declared tensors (unique names, as WeightUpdateRequest ensures): every one is
    # delivered once, as declared, and no two overlap.
    manifests = planned_buckets(request, plan)
    problems: dict[str, str] = {}
    if len(buckets) != len(manifests):
        problems["payload.buckets"] = (f"has {len(buckets)} bucket(s), but payload.plan gives {len(manifests)} for "
                                       f"the declared tensors; send the buckets of that plan")
        raise WeightUpdateError(problems)
    result: list[tuple[BucketManifest, dict[str, Any]]] = []
    for b, (bucket, manifest) in enumerate(zip(buckets, manifests, strict=True)):
        where = f"payload.buckets[{b}]"
        if not isinstance(bucket, Mapping):
            problems[where] = f"expected an object, got {type(bucket).__name__}"
            continue
        missing = [k for k in ("nbytes", *extra_fields) if k not in bucket]
        if missing:
            problems[where] = f"missing field(s) {missing}"
            continue
        if "tensors" in bucket:
            problems[f"{where}.tensors"] = "a planned payload's buckets list no tensors; send the plan or the tensors"
        nbytes = bucket["nbytes"]
        if not _is_int(nbytes) or nbytes != manifest.nbytes:
            problems[f"{where}.nbytes"] = f"got {nbytes!r}, but payload.plan gives this bucket {manifest.nbytes} bytes"
        result.append((manifest, dict(bucket)))
    if problems:
        raise WeightUpdateError(problems)
    return result


def _parse_entry(raw: Any, where: str, bucket_nbytes: int, problems: dict[str, str]) -> TensorEntry | None:
    if not isinstance(raw, Mapping):
        problems[where] = f"expected an object, got {type(raw).__name__}"
        return None
    name, dtype, shape, offset = raw.get("name"), raw.get("dtype"), raw.get("shape"), raw.get("offset")
    if not isinstance(name, str) or not name:
        problems[where] = f"name must be a non-empty string, got {name!r}"
        return None
    if dtype not in DTYPE_ITEMSIZE:
        problems[name] = f"dtype {dtype!r} is not allowed; allowed: {sorted(DTYPE_ITEMSIZE)}"
        return None
    if not isinstance(shape, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in shape):
        problems[name] = f"shape must be a list of non-negative integers, got {shape!r}"
        return None
    if not _is_int(offset) or offset < 0:
        problems[name] = f"offset must be a non-negative integer, got {offset!r}"
        return None
    entry = TensorEntry(name, dtype, tuple(shape), offset)
    if offset % DTYPE_ITEMSIZE[dtype]:
        problems[name] = f"offset {offset} is not a multiple of the {dtype} item size"
        return None
    if offset + entry.nbytes > bucket_nbytes:
        problems[name] = (f"bytes [{offset}, {offset + entry.nbytes}) lie outside its bucket of "
                          f"{bucket_nbytes} bytes")
        return None
    return entry


# -- errors that crossed a process boundary as text ---------------------------------------------
_REJECTED = "Weight update rejected ("


def weight_update_error_from_text(text: str) -> WeightUpdateError | None:
    """The :class:`WeightUpdateError` whose message is embedded in ``text``, or None.

    Engines that run their workers in other processes (vLLM's ``collective_rpc``, SGLang's
    scheduler) hand a worker's exception back as a string; a backend calls this on that string to
    raise the same error, with the same offending tensors, to the trainer."""
    start = text.find(_REJECTED)
    if start < 0:
        return None
    # A wrapper that quoted the message ("... error '<message>', see above") ends it with that quote.
    quote = text[start - 1] if start and text[start - 1] in "'\"" else None
    problems: dict[str, str] = {}
    lines = text[start:].splitlines()[1:]
    for i, line in enumerate(lines):
        if not line.startswith("  "):
            break
        name, sep, why = line[2:].partition(": ")
        if not sep:
            break
        last = i + 1 == len(lines) or not lines[i + 1].startswith("  ")
        if last and quote and quote in why:
            why = why[:why.rindex(quote)]
        problems[name] = why.rstrip()
    return WeightUpdateError(problems, partly_applied="of this streamed update" in text[start:]) if problems else None


# -- whole requests as JSON ---------------------------------------------------------------------
def request_to_json(request: WeightUpdateRequest) -> dict[str, Any]:
    """A JSON-able form of a request whose bytes travel out of band (every strategy but "tensors")."""
    return {**envelope_to_json(request), "names": list(request.names), "dtypes": list(request.dtypes),
            "shapes": [list(s) for s in request.shapes]}


def envelope_to_json(request: WeightUpdateRequest) -> dict[str, Any]:
    """:func:`request_to_json` without the layout (names, dtypes, shapes)."""
    if request.strategy not in TRANSPORT_STRATEGIES:
        raise WeightUpdateError({"strategy": f"{request.strategy!r} cannot cross a process boundary; use one of "
                                             f"{list(TRANSPORT_STRATEGIES)}"})
    return {"wire_version": WIRE_VERSION, "strategy": request.strategy, "payload": request.payload,
            "check_finite": request.check_finite}


def _are_json_shapes(shapes: list[Any]) -> bool:
    # Plain loops, no call per dimension: a model's request has hundreds of shapes, checked at every
    # update (JSON numbers are plain ints, so a type check is exact; it also refuses bools).
    for shape in shapes:
        if type(shape) is not list:
            return False
        for dim in shape:
            if type(dim) is not int or dim < 0:
                return False
    return True


def check_envelope(obj: Any) -> tuple[str, bool]:
    """A JSON request's fields besides its layout, checked: its strategy and ``check_finite``."""
    if not isinstance(obj, Mapping):
        raise WeightUpdateError({"request": f"expected a JSON object, got {type(obj).__name__}"})
    if obj.get("wire_version") != WIRE_VERSION:
        raise WeightUpdateError({"wire_version": f"got {obj.get('wire_version')!r}; this side speaks {WIRE_VERSION}"})
    strategy = obj.get("strategy")
    if strategy not in TRANSPORT_STRATEGIES:
        raise WeightUpdateError({"strategy": f"got {strategy!r}; expected one of {list(TRANSPORT_STRATEGIES)}"})
    check_finite = obj.get("check_finite", False)  # optional: absent from requests of older senders
    if not isinstance(check_finite, bool):
        raise WeightUpdateError({"check_finite": f"must be true or false, got {check_finite!r}"})
    return strategy, check_finite


def request_from_json(obj: Any) -> WeightUpdateRequest:
    """Rebuild a request from :func:`request_to_json`'s output (e.g. parsed from an HTTP body), checking
    the top-level fields; the payload is checked by the receiver (:func:`parse_buckets`)."""
    strategy, check_finite = check_envelope(obj)
    names, dtypes, shapes = obj.get("names"), obj.get("dtypes"), obj.get("shapes")
    problems: dict[str, str] = {}
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        problems["names"] = "must be a list of non-empty strings"
    if not isinstance(dtypes, list) or not all(d in DTYPE_ITEMSIZE for d in dtypes):
        problems["dtypes"] = f"must be a list of dtype names among {sorted(DTYPE_ITEMSIZE)}"
    if not isinstance(shapes, list) or not _are_json_shapes(shapes):
        problems["shapes"] = "must be a list of shapes, each a list of non-negative integers"
    if problems:
        raise WeightUpdateError(problems)
    from skyrl_backends.errors import ConfigError

    try:
        return WeightUpdateRequest(names=names, dtypes=dtypes, shapes=[tuple(s) for s in shapes],
                                   strategy=strategy, payload=obj.get("payload"), check_finite=check_finite)
    except ConfigError as exc:
        raise WeightUpdateError({exc.field: str(exc)}) from None
