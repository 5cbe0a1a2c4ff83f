"""Engine-side peers for the broadcast tests, run in spawned processes.

``join_like_native_engines`` joins the trainer's group the way SGLang's ``init_weights_update_group``
does (its ``init_custom_process_group``, 0.5.17 and 0.5.23): a ``tcp://`` rendezvous, a
``PrefixStore`` named after the group, and torch's ``_new_process_group_helper``; then it receives
one typed broadcast per tensor, as SGLang's ``update_weights_from_distributed`` does. It shares no
code with skyrl_backends.weight_sync on purpose.
"""

from __future__ import annotations

import datetime
import json
from typing import Any


def join_like_native_engines(conn: Any, addr: str, port: int, rank: int, world_size: int, group_name: str,
                             specs: list[list[Any]]) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    init_method = f"tcp://{addr}:{port}"
    timeout = datetime.timedelta(seconds=120)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], "gloo", store, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    sums = []
    for _name, dtype, shape in specs:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(tensor, src=0, group=pg)
        sums.append(float(tensor.double().sum()))
    conn.send_bytes(json.dumps(sums).encode())


def receive_with_skyrl(conn: Any, init_info: dict[str, Any] | None, device: str = "cpu") -> None:
    """A skyrl receiver in its own process, loading like an engine: it copies what it receives into
    its own tensors (queued on the current stream, on a GPU). It joins (broadcast; None for colocated
    strategies), then answers each request (JSON) with ``sums`` (the sum of each loaded tensor),
    ``loads`` (how many times its loader was called), ``staging_bytes`` (what the broadcast
    receiver holds afterwards) and ``handles_opened`` (CUDA IPC handles opened so far), or with the
    rejection."""
    import torch
    from skyrl_backends.errors import WeightUpdateError
    from skyrl_backends.types import WeightSyncInitInfo
    from skyrl_backends.weight_sync import load_named_tensors, make_receiver
    from skyrl_backends.weight_sync.manifest import request_from_json

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    communicator = make_receiver(WeightSyncInitInfo(**init_info), device) if init_info else None
    params: dict[str, torch.Tensor] = {}
    conn.send_bytes(b"joined")
    while True:
        msg = conn.recv_bytes()
        if msg == b"stop":
            return
        loads = []

        def load(named: list[tuple[str, torch.Tensor]]) -> None:
            loads.append(len(named))
            for name, tensor in named:
                if name not in params or params[name].shape != tensor.shape or params[name].dtype != tensor.dtype:
                    params[name] = torch.empty_like(tensor)
                params[name].copy_(tensor, non_blocking=True)

        try:
            request = request_from_json(json.loads(msg))
            load_named_tensors(request, device, load, communicator)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            reply: Any = {"sums": {name: float(params[name].double().sum()) for name in request.names},
                          "loads": len(loads), "staging_bytes": getattr(communicator, "staging_bytes", 0),
                          "handles_opened": _handles_opened(device)}
        except WeightUpdateError as exc:
            reply = {"error": exc.problems}
        conn.send_bytes(json.dumps(reply).encode())


def _handles_opened(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    from skyrl_backends.weight_sync import cuda_ipc

    return cuda_ipc.handles_opened()
