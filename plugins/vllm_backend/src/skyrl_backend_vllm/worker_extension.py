"""Code that runs inside each vLLM worker process (``worker_extension_cls``).

vLLM mixes this class into its worker, so ``self`` is the worker: ``self.model_runner``,
``self.vllm_config``, ``self.device``, ``self.rank``. The engine reaches these methods through
``collective_rpc``; each worker of a tensor- or pipeline-parallel engine runs them, and vLLM's
``load_weights`` keeps the shard that belongs to it.

How weights are applied depends on the platform:

* CUDA: ``model.load_weights`` copies checkpoint-format tensors into the parameters in place, so a
  partial update touches only the tensors named (fused ``qkv_proj`` shards included).
* CPU: after loading, vLLM repacks linear weights for its CPU kernels and drops the original
  parameter (it becomes an empty tensor), so ``load_weights`` afterwards has no effect on what is
  served. The worker's ``reload_weights`` path rebuilds each layer from checkpoint-format tensors
  and repacks it; a layer must receive all of its tensors at once, so the whole model is reloaded
  from the checkpoint with every tensor updated so far taken from memory instead.

With LoRA enabled, vLLM wraps the target layers and their weights live at
``<module>.base_layer.<param>``; checkpoint names are renamed to that form before loading.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


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
        self._skyrl_load(named)
        return len(named)

    def skyrl_save_adapter(self, transfer: dict[str, Any], folder: str) -> int:
        """Receive a LoRA adapter's tensors (every worker takes part, as in a weight update) and write
        them into ``folder`` as PEFT's ``adapter_model.safetensors`` (the first worker; the engine
        then loads the folder with vLLM's own adapter loading). Returns the number of tensors."""
        if transfer["kind"] == "request":
            from skyrl_backends.weight_sync import receive_named_tensors

            named = list(receive_named_tensors(pickle.loads(transfer["data"]), self._skyrl_device(),
                                               getattr(self, "_skyrl_communicator", None)))
        else:
            named = self._skyrl_receive(transfer)
        if int(self.rank) == 0:
            from safetensors.torch import save_file

            from skyrl_backend_vllm.adapters import WEIGHTS_FILE

            save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in named},
                      os.path.join(folder, WEIGHTS_FILE))
        return len(named)

    def skyrl_pid(self) -> int:
        return os.getpid()

    def skyrl_platform(self) -> str:
        return "cpu" if self._skyrl_device().type == "cpu" else "cuda"

    # -- receiving -----------------------------------------------------------------------------
    def _skyrl_device(self) -> torch.device:
        device = getattr(self, "device", None)
        return device if isinstance(device, torch.device) else torch.device("cpu")

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

        communicator = getattr(self, "_skyrl_communicator", None)
        device = self._skyrl_device()
        if device.type == "cpu":
            # The CPU path reloads whole layers (module docstring), so buckets of a streamed update
            # are collected (copied out of the receiver's reused buffers) and reloaded once.
            collected: NamedTensors = []
            load_named_tensors(request, device, lambda named: collected.extend((n, t.clone()) for n, t in named),
                               communicator=communicator)
            self._skyrl_load(collected)
            return len(collected)
        loaded = 0

        def load_in_place(named: NamedTensors) -> None:
            nonlocal loaded
            model = self.model_runner.model
            model.load_weights(weights=_rename_for_lora(model, named))
            loaded += len(named)

        load_named_tensors(request, device, load_in_place, communicator=communicator)
        torch.cuda.synchronize()
        return loaded

    # -- loading -------------------------------------------------------------------------------
    def _skyrl_load(self, named: NamedTensors) -> None:
        if self._skyrl_device().type == "cpu":
            self._skyrl_reload_on_cpu(named)
        else:
            model = self.model_runner.model
            model.load_weights(weights=_rename_for_lora(model, named))
            if self._skyrl_device().type == "cuda":
                torch.cuda.synchronize()

    def _skyrl_reload_on_cpu(self, named: NamedTensors) -> None:
        previous: dict[str, torch.Tensor] = getattr(self, "_skyrl_updated", {})
        updated = dict(previous)
        updated.update((name, tensor.detach().to("cpu").clone()) for name, tensor in named)
        try:
            self._skyrl_reload_all(updated)
        except Exception:
            logger.exception("weight reload failed; restoring the previous weights")
            self._skyrl_reload_all(previous)
            raise
        self._skyrl_updated = updated

    def _skyrl_reload_all(self, updated: dict[str, torch.Tensor]) -> None:
        model = self.model_runner.model
        weights = _rename_for_lora(model, _checkpoint_with_updates(self, updated))
        # Reloading logs a warning for every layer the checkpoint has nothing for (rotary
        # embeddings, tied heads): expected here, and noise on every update.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self.model_runner.reload_weights(weights_iterator=weights)
        finally:
            layerwise.setLevel(level)


def _checkpoint_with_updates(worker: Any, updated: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor, in checkpoint order, with updated ones taken from ``updated``."""
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(worker.vllm_config.load_config)
    seen = set()
    for name, tensor in loader.get_all_weights(worker.vllm_config.model_config, worker.model_runner.model):
        seen.add(name)
        yield name, updated.get(name, tensor)
    for name, tensor in updated.items():  # e.g. a tied lm_head the checkpoint leaves out
        if name not in seen:
            yield name, tensor


def _rename_for_lora(model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names -> the names vLLM's ``load_weights`` expects once LoRA wrapped a layer:
    ``...q_proj.weight`` -> ``...q_proj.base_layer.weight`` when ``qkv_proj`` is wrapped.

    Recent vLLM (0.32) LoRA wrappers load checkpoint names themselves (they have ``load_weights``);
    older ones (0.26) need the renaming."""
    wrapped = {name.split(".base_layer.")[0] for name, _ in model.named_parameters() if ".base_layer." in name}
    if not wrapped or _lora_wrappers_load_plain_names():
        yield from named
        return
    # Checkpoint module name -> the fused module that holds it (q_proj -> qkv_proj).
    fused = {part: whole for whole, parts in (getattr(model, "packed_modules_mapping", None) or {}).items()
             for part in parts}
    for name, tensor in named:
        module, _, param = name.rpartition(".")
        if ".base_layer" not in name and module:
            parent, _, leaf = module.rpartition(".")
            served = f"{parent}.{fused.get(leaf, leaf)}" if parent else fused.get(leaf, leaf)
            if served in wrapped:
                name = f"{module}.base_layer.{param}"
        yield name, tensor


def _lora_wrappers_load_plain_names() -> bool:
    from vllm.lora.layers import BaseLayerWithLoRA

    return callable(getattr(BaseLayerWithLoRA, "load_weights", None))


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
