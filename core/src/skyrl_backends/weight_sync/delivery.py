"""What a weight update delivers, checked against what it declares, before the first byte is applied.

A :class:`~skyrl_backends.types.WeightUpdateRequest` *declares* its tensors (``names``, ``dtypes``,
``shapes``); the engine facade checks that declaration against the engine's parameters. This module
owns the second half of the promise: the tensors actually *delivered* must be the declared ones,
exactly. :func:`mismatches` is that rule (every declared name delivered once, nothing undeclared,
each with its declared dtype and shape), and it is applied wherever the delivered tensors are first
known, always before anything is loaded:

* in-process tensors (strategy ``"tensors"``): by the engine facade, on the payload itself
  (:func:`check_delivered`), before the backend's hook is called;
* tensors that travel (shared memory, CUDA IPC, broadcast): by the receiver, on the manifests that
  describe every byte (:func:`skyrl_backends.weight_sync.manifest.parse_buckets`), before a byte is
  received; the tensors the receivers hand to a backend are views made from those manifests.

Declared-against-parameters (the facade) and delivered-against-declared (here) together mean that
what reaches a backend's loader matches the engine's parameters tensor by tensor.

:func:`check_finite` is the opt-in check of the values (``WeightUpdateRequest.check_finite``): NaN
or infinite weights are refused, naming the tensors, before anything is applied.

Nothing here imports torch at module level, so the facade uses it in processes without torch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest

# What was delivered for one tensor: (name, dtype name as torch spells it without "torch.", shape).
Delivered = tuple[str, str, tuple[int, ...]]


def mismatches(request: WeightUpdateRequest, delivered: Iterable[Delivered]) -> dict[str, str]:
    """Problems, by tensor name, of ``delivered`` against ``request``'s declaration: a name delivered
    twice, a name not declared, a dtype or shape other than declared, a declared name not delivered."""
    declared = {n: (d, tuple(s)) for n, d, s in zip(request.names, request.dtypes, request.shapes, strict=False)}
    problems: dict[str, str] = {}
    seen: set[str] = set()
    for name, dtype, shape in delivered:
        if name in seen:
            problems[name] = "appears more than once in the payload"
            continue
        seen.add(name)
        if name not in declared:
            problems[name] = "is in the payload but not among the request's names"
        elif declared[name] != (dtype, tuple(shape)):
            want_dtype, want_shape = declared[name]
            problems[name] = (f"payload says {dtype}{list(shape)} but the request declares "
                              f"{want_dtype}{list(want_shape)}")
    for name in declared:
        if name not in seen:
            problems.setdefault(name, "is declared in the request but missing from the payload")
    return problems


def check_delivered(request: WeightUpdateRequest, named_tensors: Sequence[tuple[str, Any]]) -> None:
    """Raise :class:`WeightUpdateError` naming every tensor of ``named_tensors`` (``(name, tensor)``
    pairs) that is not a torch tensor or does not match ``request``'s declaration (:func:`mismatches`).
    Values are not looked at (see :func:`check_finite`)."""
    problems: dict[str, str] = {}
    delivered: list[Delivered] = []
    tensor_type = _tensor_type()
    for index, pair in enumerate(named_tensors):
        name, tensor = pair
        if tensor_type is None or not isinstance(tensor, tensor_type):
            problems[str(name)] = f"payload[{index}] is a {type(tensor).__name__}, not a torch.Tensor"
            continue
        delivered.append((name, dtype_name(tensor.dtype), tuple(tensor.shape)))
    for name, why in mismatches(request, delivered).items():
        problems.setdefault(name, why)
    if problems:
        raise WeightUpdateError(problems)


def payload_pairs(request: WeightUpdateRequest) -> list[tuple[str, Any]]:
    """The ``(name, tensor)`` pairs of an in-process (``"tensors"``) request: its payload holds one
    tensor per name, in the order of ``names``. Tensors beyond the names are refused here; names
    without a tensor are left to :func:`check_delivered`, which names them."""
    payload = request.payload
    if not isinstance(payload, (list, tuple)):
        raise WeightUpdateError({"payload": f"strategy 'tensors' carries a list of tensors, one per name; got "
                                            f"{type(payload).__name__}"})
    if len(payload) > len(request.names):
        raise WeightUpdateError({"payload": f"holds {len(payload)} tensors for {len(request.names)} names; send "
                                            f"one tensor per name, in the order of names"})
    return list(zip(request.names, payload, strict=False))


def check_finite(named_tensors: Sequence[tuple[str, Any]]) -> None:
    """Raise :class:`WeightUpdateError` naming every floating-point tensor that holds a NaN or an
    infinity (integer and boolean tensors always pass).

    Costs one reduction over the bytes: each tensor is summed in its own dtype, and a sum is finite
    only if every element is (a NaN or an infinity never leaves a sum); the rare tensor whose sum is
    not finite is looked at element-wise, since finite values may overflow a sum. On a GPU the host
    waits once for all the sums, not once per tensor."""
    import torch

    floats = [(name, tensor) for name, tensor in named_tensors if tensor.is_floating_point() and tensor.numel()]
    if not floats:
        return
    by_device: dict[Any, list[int]] = {}
    for index, (_, tensor) in enumerate(floats):
        by_device.setdefault(tensor.device, []).append(index)
    suspects: list[int] = []
    for indices in by_device.values():
        # float8 is summed as float32 (float16 could overflow a sum of finite values).
        sums = [(t if t.element_size() > 1 else t.float()).sum().float() for t in (floats[i][1] for i in indices)]
        finite = torch.isfinite(torch.stack(sums)).tolist()
        suspects += [i for i, ok in zip(indices, finite, strict=True) if not ok]
    bad = [floats[i][0] for i in sorted(suspects) if not bool(torch.isfinite(_widened(floats[i][1])).all())]
    if bad:
        raise WeightUpdateError({name: "holds NaN or infinite values (check_finite=True)" for name in bad})


def _widened(tensor: Any) -> Any:
    # float8 has neither sum nor isfinite on every device; float16 holds every float8 value (and
    # keeps NaN and infinity as they are), so the check reads the same values.
    return tensor.half() if tensor.element_size() == 1 else tensor


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling of requests and weight specs."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _tensor_type() -> type | None:
    # A torch tensor can only exist once torch is imported; a facade without torch then refuses any
    # in-process payload without importing it.
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)
