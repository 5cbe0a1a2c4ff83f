"""The trainer side of the ``"skyrl"`` weight-transfer backend, for vLLM's trainer-side API.

::

    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from skyrl_backend_vllm.weight_transfer.trainer import SkyRLTrainerInitInfo   # registers "skyrl"

    client = HTTPVLLMWeightSyncClient("http://127.0.0.1:8000")   # vllm serve, or skyrl-backends serve
    engine = WeightTransferTrainerFactory.trainer_init(
        SkyRLTrainerInitInfo(strategy="shared_memory", dtype="bfloat16", rank=0),
        client=client, source=ModuleSource(model))
    engine.send_weights()        # every step: start_weight_update, update_weights, finish_weight_update
    engine.shutdown()

The server side is ``vllm serve --weight-transfer-config '{"backend": "skyrl"}'`` with this plugin
installed, or ``skyrl-backends serve ... --weight-transfer-config '{"backend": "skyrl"}'`` over any
backend. One update is one request: the server validates all of it before a parameter changes.

Strategies: ``shared_memory`` (trainer and server on one machine, CPU buffers), ``cuda_ipc`` (one GPU
node), ``broadcast`` (anywhere: the trainer is rank 0 of a gloo or NCCL group the server's engines
join; give ``world_size`` = 1 + the server's ``/get_world_size``). Buffers are kept from one
``send_weights`` to the next.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync.chunks import DEFAULT_BUCKET_BYTES, plan
from skyrl_backends.weight_sync.manifest import TRANSPORT_STRATEGIES
from skyrl_backends.weight_sync.phases import BACKEND, init_info_to_json, update_info_to_json
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
)

from skyrl_backend_vllm.weight_transfer import register

register()


@dataclass
class SkyRLTrainerInitInfo(TrainerInitInfo):
    """How the trainer sends. ``rank`` (keyword, vLLM's): this trainer process's rank; rank 0 sends.

    ``dtype``: convert every tensor to it before sending (the engines' dtype: the server checks it;
    ``GET /server_info`` names it); None sends tensors as they are. ``bucket_bytes`` bounds each
    packed buffer. Broadcast only: ``world_size`` (required), ``master_address``/``master_port``
    (0: a free port), ``group_backend`` (``gloo`` or ``nccl``; default by ``device``), ``layout``
    (``packed`` or ``per_tensor``; default ``per_tensor`` on gloo, where packing costs a copy as slow
    as the transfer, else ``packed``), ``apply`` (``atomic`` or ``streamed``), ``timeout_s``."""

    backend: ClassVar[str] = BACKEND

    strategy: str = "shared_memory"
    dtype: str | None = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    device: str = "cpu"
    world_size: int | None = None
    master_address: str = "127.0.0.1"
    master_port: int = 0
    group_backend: str | None = None
    group_name: str = "skyrl_weight_sync"
    layout: str | None = None
    apply: str = "atomic"
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.strategy not in TRANSPORT_STRATEGIES:
            raise ValueError(f"strategy: got {self.strategy!r}; expected one of {list(TRANSPORT_STRATEGIES)}")
        if self.strategy == "broadcast" and (not isinstance(self.world_size, int) or self.world_size < 2):
            raise ValueError(f"world_size: got {self.world_size!r}; a broadcast needs 1 + the server's ranks "
                             "(GET /get_world_size on the server)")


class SkyRLTrainerWeightTransferEngine(TrainerWeightTransferEngine[SkyRLTrainerInitInfo]):
    """Sends a :class:`~vllm.distributed.weight_transfer.base.WeightSource` with one of skyrl's
    strategies; see the module docstring."""

    init_info_cls = SkyRLTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource | None, init_info: SkyRLTrainerInitInfo,
                 is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.init_info = init_info
        self.sender: Any = None

    @classmethod
    def trainer_init(cls, init_info: SkyRLTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError("the skyrl weight-transfer backend sends a WeightSource: pass source=")
        engine = cls(client=client, source=source, init_info=init_info, is_sender=init_info.is_sender)
        if engine.is_sender:
            engine._connect()
        return engine

    def _connect(self) -> None:
        info = self.init_info
        if info.strategy == "shared_memory":
            from skyrl_backends.weight_sync import SharedMemorySender

            self.client.init_weight_transfer_engine(init_info_to_json(info.strategy))
            self.sender = SharedMemorySender()
            return
        if info.strategy == "cuda_ipc":
            from skyrl_backends.weight_sync import CudaIpcSender

            self.client.init_weight_transfer_engine(init_info_to_json(info.strategy))
            self.sender = CudaIpcSender(torch.device(info.device))
            return
        from skyrl_backends.weight_sync import BroadcastSender

        device = torch.device(info.device)
        group_backend = info.group_backend or ("nccl" if device.type == "cuda" else "gloo")
        layout = info.layout or ("per_tensor" if group_backend == "gloo" else "packed")
        if info.apply == "streamed":
            layout = info.layout or "packed"
        sender = BroadcastSender(info.world_size, info.master_address, info.master_port, group_backend,
                                 info.group_name, device, info.timeout_s, layout, info.apply)
        # The server's engines join inside init_weight_transfer_engine while rank 0 joins here; an
        # init the server refuses (a bad world size, say) is raised instead of waiting for the group,
        # and the group is given up so that the server's workers still joining are released too.
        try:
            _run_beside(lambda: self.client.init_weight_transfer_engine(init_info_to_json(sender.init_info(1))),
                        sender.join)
        except BaseException:
            # The server's call has ended (or this rank's join did, at its timeout), so no rank is
            # still to arrive: closing takes the store's server down, which ends every wait in it
            # within a second and frees the port for a trainer that names it and retries.
            sender.close()
            raise
        self.sender = sender

    def send_weights(self) -> None:
        """One update of every tensor of the source: ``start_weight_update``, one ``update_weights``
        (with the bytes moving beside it for a broadcast), ``finish_weight_update``."""
        assert self.source is not None
        pairs = list(self.source)  # materialized on every rank: a collective for sharded trainers
        if not self.is_sender:
            return
        info = self.init_info
        layout = plan(pairs, info.bucket_bytes, _dtype_for(info.dtype))
        self.client.start_weight_update()
        if info.strategy == "broadcast":
            request = layout.request("broadcast", self.sender.payload(layout))
            _run_beside(lambda: self.client.update_weights(update_info_to_json(request)),
                        lambda: self.sender.send(layout))
        else:
            request = layout.request(info.strategy, self.sender.write(layout))
            self.client.update_weights(update_info_to_json(request))
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


def _dtype_for(dtype: str | None) -> Any:
    if dtype is None:
        return None
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise WeightUpdateError({"dtype": f"got {dtype!r}; give a torch dtype name such as 'bfloat16'"})
    return dtype


def _run_beside(call: Any, local: Any) -> None:
    """Run ``call`` (the server's side of a collective step, over HTTP) and ``local`` (this rank's
    side) at once, and raise the first failure as soon as it happens: the other side, in a daemon
    thread, waits for a peer that will not come until the caller abandons the group (joining) or
    until the group's timeout (an update; the group cannot be used again, as vLLM's own trainer
    engines leave it)."""
    futures = [_in_daemon_thread(call), _in_daemon_thread(local)]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    for future in futures:
        if future in done and future.exception() is not None:
            raise future.exception()
    for future in futures:
        future.result()


def _in_daemon_thread(fn: Any) -> Future:
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="skyrl-weight-transfer").start()
    return future


__all__ = ["SkyRLTrainerInitInfo", "SkyRLTrainerWeightTransferEngine"]
