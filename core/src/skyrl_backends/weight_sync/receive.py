"""Engine side: what a backend calls to receive a weight update, whatever the strategy.

:func:`load_named_tensors` is the one call: it receives ``request`` and hands its tensors to the
engine's loader. Every strategy stages the whole update before the loader sees a tensor (segments
mapped, handles opened, broadcasts received, every manifest checked against the request's
declaration, the values checked when the request asks ``check_finite``), so an engine that loads
them only fails midway for its own reasons, and one that stages them too (as the transformers
backend does) is all-or-nothing. The exception is a broadcast the trainer sent ``apply="streamed"``:
the loader gets one bucket at a time while the next arrives, so engine memory stays at two buckets,
and each bucket's values are checked just before it is loaded. :func:`receive_named_tensors` is the
staged half alone, for engines that load in one call.

In-process tensors (``"tensors"``) were checked by the engine facade before the backend's hook ran,
values included; they are handed on as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync import broadcast, cuda_ipc, shared_memory
from skyrl_backends.weight_sync.delivery import check_finite
from skyrl_backends.weight_sync.manifest import is_streamed

NamedTensors = list[tuple[str, torch.Tensor]]


def receiver_strategies() -> tuple[str, ...]:
    """Strategies a backend in this process can receive (CUDA IPC only where CUDA is available)."""
    strategies = [shared_memory.STRATEGY, broadcast.STRATEGY]
    if torch.cuda.is_available():
        strategies.insert(1, cuda_ipc.STRATEGY)
    return tuple(strategies)


def make_receiver(init_info: WeightSyncInitInfo, device: torch.device | str, local_rank: int = 0) -> Any:
    """Join the trainer's group for ``init_info.strategy`` (blocks until every rank joined) and return
    the communicator to pass to :func:`receive_named_tensors`. Colocated strategies need none."""
    if init_info.strategy == broadcast.STRATEGY:
        return broadcast.BroadcastReceiver(init_info, device, local_rank=local_rank)
    if init_info.strategy in (shared_memory.STRATEGY, cuda_ipc.STRATEGY):
        return None
    raise WeightUpdateError({"strategy": f"got {init_info.strategy!r}; expected one of {list(receiver_strategies())}"})


def receive_named_tensors(request: WeightUpdateRequest, device: torch.device | str,
                          communicator: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of ``request``, all received and validated before the first is
    yielded. Tensors may be views into transfer buffers that are valid only while the update is being
    applied: copy them into the engine's parameters, do not keep them."""
    strategy = request.strategy
    if strategy == "tensors":  # checked by the engine facade
        return iter(list(zip(request.names, request.payload, strict=False)))
    if strategy == shared_memory.STRATEGY:
        received = shared_memory.receive(request)
    elif strategy == cuda_ipc.STRATEGY:
        if not torch.cuda.is_available():
            raise WeightUpdateError({"strategy": "cuda_ipc needs CUDA in the engine process; use shared_memory on CPU"})
        received = cuda_ipc.receive(request, device)
    elif strategy == broadcast.STRATEGY:
        received = _broadcast_receiver(communicator).receive(request)
    else:
        raise WeightUpdateError({"strategy": f"got {strategy!r}; expected one of "
                                             f"{['tensors', *receiver_strategies()]}"})
    if not request.check_finite:
        return received
    pairs = list(received)
    check_finite(pairs)
    return iter(pairs)


def load_named_tensors(request: WeightUpdateRequest, device: torch.device | str,
                       load: Callable[[NamedTensors], None], communicator: Any = None) -> None:
    """Receive ``request`` and call ``load`` with its ``(name, tensor)`` pairs: once with all of them,
    or, for a streamed broadcast, once per bucket as each arrives. The tensors may be views into
    transfer buffers that are reused afterwards: ``load`` copies them into the engine (queuing the
    copies on the current CUDA stream is enough) and keeps no reference."""
    if is_streamed(request):
        receiver = _broadcast_receiver(communicator)
        if not request.check_finite:
            receiver.receive_streamed(request, load)
            return
        problems: dict[str, str] = {}

        def checked(named: NamedTensors) -> None:
            # Each bucket is checked just before it is loaded (the ones before it are applied
            # already). After an offending bucket the rest are still received, to keep the group in
            # step with the trainer, and checked, to name every offender, but not loaded.
            try:
                check_finite(named)
            except WeightUpdateError as exc:
                problems.update(exc.problems)
            if not problems:
                load(named)

        receiver.receive_streamed(request, checked)
        if problems:
            raise WeightUpdateError(problems, partly_applied=True)
        return
    load(list(receive_named_tensors(request, device=device, communicator=communicator)))


def _broadcast_receiver(communicator: Any) -> broadcast.BroadcastReceiver:
    if not isinstance(communicator, broadcast.BroadcastReceiver):
        raise WeightUpdateError({"communicator": "broadcast needs the group first: call "
                                                 "init_weight_update_communicator(init_info) on the engine"})
    return communicator
