"""Code that runs inside each vLLM worker process (``worker_extension_cls``).

vLLM mixes this class into its worker, so ``self`` is the worker: ``self.model_runner``,
``self.vllm_config``, ``self.device``, ``self.rank``. The engine reaches these methods through
``collective_rpc``; each worker of a tensor- or pipeline-parallel engine runs them, and vLLM's
``load_weights`` keeps the shard that belongs to it. This is the way weights reach the workers on
vLLM releases without the weight-transfer engine API (and where it is chosen, see
:mod:`skyrl_backend_vllm.weight_transfer`); how they are loaded is :mod:`skyrl_backend_vllm.loading`.

Importing this module (vLLM does, in every worker) registers the plugin's weight-transfer engine
with vLLM, so the plugin's engines need no installed entry point to use it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from skyrl_backend_vllm.loading import NamedTensors, ServedModelLoader
from skyrl_backend_vllm.weight_transfer import register

logger = logging.getLogger(__name__)

register()


class SkyRLWorkerExtension:
    """Weight updates and weight-sync set-up for skyrl_backends, mixed into vLLM's worker."""

    # -- entry points (collective_rpc) ---------------------------------------------------------
    def skyrl_init_communicator(self, init_info_pickle: bytes) -> None:
        """Join the trainer's process group for broadcast weight sync."""
        from skyrl_backends.weight_sync import make_receiver

        init_info = pickle.loads(init_info_pickle)
        # Each worker of the engine joins at rank_offset + its rank within the engine.
        self._skyrl_communicator = make_receiver(init_info, self._skyrl_device(), local_rank=int(self.rank))

    def skyrl_apply_weights(self, transfer: dict[str, Any]) -> int:
        """Receive the tensors of ``transfer`` and load them into the served model. Everything is
        received before the first parameter changes, except in a broadcast the trainer sent
        ``apply="streamed"``, loaded bucket by bucket as it arrives. Returns the number of tensors
        loaded."""
        if transfer["kind"] == "request":
            return self._skyrl_load_request(pickle.loads(transfer["data"]))
        named = self._skyrl_receive(transfer)
        self._skyrl_loader().load(named)
        return len(named)

    def skyrl_save_adapter(self, transfer: dict[str, Any], folder: str) -> int:
        """Receive a LoRA adapter's tensors (every worker takes part, as in a weight update) and write
        them into ``folder`` as PEFT's ``adapter_model.safetensors`` (the first worker; the engine
        then loads the folder with vLLM's own adapter loading). Returns the number of tensors."""
        if transfer["kind"] == "request":
            from skyrl_backends.weight_sync import receive_named_tensors

            named = list(receive_named_tensors(pickle.loads(transfer["data"]), self._skyrl_device(),
                                               self._skyrl_group()))
        else:
            named = self._skyrl_receive(transfer)
        if int(self.rank) == 0:
            from safetensors.torch import save_file

            from skyrl_backend_vllm.adapters import WEIGHTS_FILE

            save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in named},
                      os.path.join(folder, WEIGHTS_FILE))
        return len(named)

    def skyrl_replayed_loads(self) -> dict[str, Any]:
        """How this worker's colocated CUDA IPC loads went (:mod:`skyrl_backends.weight_sync.replay`):
        loads recorded, loads replayed, and why the last recorded one cannot be replayed (None)."""
        return self._skyrl_loader().replay_counts()

    def skyrl_pid(self) -> int:
        return os.getpid()

    def skyrl_platform(self) -> str:
        return "cpu" if self._skyrl_device().type == "cpu" else "cuda"

    # -- receiving -----------------------------------------------------------------------------
    def _skyrl_device(self) -> torch.device:
        device = getattr(self, "device", None)
        return device if isinstance(device, torch.device) else torch.device("cpu")

    def _skyrl_group(self) -> Any:
        """The trainer's broadcast group this worker joined: through the worker extension
        (``skyrl_init_communicator``), or through vLLM's weight-transfer API, where the ``"skyrl"``
        weight-transfer engine holds it (LoRA adapters from tensors still come through here)."""
        own = getattr(self, "_skyrl_communicator", None)
        if own is not None:
            return own
        transfer_engine = getattr(self, "weight_transfer_engine", None)
        return getattr(transfer_engine, "communicator", None)

    def _skyrl_loader(self) -> ServedModelLoader:
        loader = getattr(self, "_skyrl_model_loader", None)
        if loader is None:
            loader = ServedModelLoader(self.vllm_config, lambda: self.model_runner.model, self._skyrl_device(),
                                       lambda weights: self.model_runner.reload_weights(weights_iterator=weights))
            self._skyrl_model_loader = loader
        return loader

    def _skyrl_receive(self, transfer: dict[str, Any]) -> NamedTensors:
        kind = transfer["kind"]
        if kind == "shared_memory":
            return _receive_shared_memory(transfer)
        if kind == "cuda_ipc":
            return _receive_cuda_ipc(transfer, self._skyrl_device())
        raise ValueError(f"unknown weight transfer kind {kind!r}")

    def _skyrl_load_request(self, request: Any) -> int:
        """A request the worker receives itself (a broadcast), through skyrl's receiver."""
        from skyrl_backends.weight_sync import load_named_tensors

        communicator = self._skyrl_group()
        device = self._skyrl_device()
        loader = self._skyrl_loader()
        if loader.on_cpu:
            # The CPU path reloads whole layers (skyrl_backend_vllm.loading), so buckets of a streamed
            # update are collected (copied out of the receiver's reused buffers) and reloaded once.
            collected: NamedTensors = []
            load_named_tensors(request, device, lambda named: collected.extend((n, t.clone()) for n, t in named),
                               communicator=communicator)
            loader.load(collected)
            return len(collected)
        loaded = 0
        load = loader.in_place_loader(request)

        def load_in_place(named: NamedTensors) -> None:
            nonlocal loaded
            load(named)
            loaded += len(named)

        load_named_tensors(request, device, load_in_place, communicator=communicator)
        torch.cuda.synchronize()
        return loaded


def _receive_shared_memory(transfer: dict[str, Any]) -> NamedTensors:
    with _mapped_segment(transfer["segment"]) as buffer:
        view = torch.frombuffer(buffer, dtype=torch.uint8)
        named = []
        for name, dtype, shape, offset, nbytes in transfer["items"]:
            # Copied out: the sender unlinks the segment as soon as the call returns.
            raw = view[offset:offset + nbytes].clone()
            named.append((name, raw.view(getattr(torch, dtype)).reshape(shape)))
        del view
    return named


@contextlib.contextmanager
def _mapped_segment(name: str) -> Iterator[Any]:
    """Map the sender's shared-memory segment without registering it with this process's resource
    tracker: the sender owns and unlinks it (a registration here would make the tracker, shared
    with the engine's processes, unlink or warn about it a second time)."""
    path = os.path.join("/dev/shm", name.lstrip("/"))
    if os.path.exists(path):
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
            yield mapped
        return
    from multiprocessing import shared_memory

    segment = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]  # Python >= 3.13
    try:
        yield segment.buf
    finally:
        segment.close()


def _receive_cuda_ipc(transfer: dict[str, Any], device: torch.device) -> NamedTensors:
    handles = pickle.loads(transfer["data"])
    named = []
    for name, (rebuild, args) in handles:
        args = list(args)
        # Colocated trainer and worker share one physical GPU, which each process may number
        # differently; the worker opens the handle on its own device.
        args[6] = device.index if device.index is not None else torch.cuda.current_device()
        named.append((name, rebuild(*args)))
    return named
