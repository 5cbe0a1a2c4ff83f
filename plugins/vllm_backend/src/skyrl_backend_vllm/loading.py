"""Loading checkpoint-format tensors into the model a vLLM worker serves.

Used inside each worker by both ways weights reach it: the worker extension
(:mod:`skyrl_backend_vllm.worker_extension`, through ``collective_rpc``) and the plugin's
weight-transfer engine (:mod:`skyrl_backend_vllm.weight_transfer.worker`, through vLLM's own
weight-transfer API). How weights are applied depends on the platform:

* CUDA: ``model.load_weights`` copies checkpoint-format tensors into the parameters in place, so a
  partial update touches only the tensors named (fused ``qkv_proj`` shards included).
* CPU: after loading, vLLM repacks linear weights for its CPU kernels and drops the original
  parameter (it becomes an empty tensor), so ``load_weights`` afterwards has no effect on what is
  served. vLLM's in-place reload rebuilds each layer from checkpoint-format tensors and repacks
  it; a layer must receive all of its tensors at once, so the whole model is reloaded with every
  tensor updated so far taken from memory, and the rest from the checkpoint (not read at all once
  every checkpoint tensor has been updated). A model with tied embeddings has no head in its
  checkpoint, so the reload would leave the head packed from the old embedding: the embedding is
  given to the head by its name too (a trainer sending ``named_parameters()`` sends it once).

With LoRA enabled, vLLM wraps the target layers and their weights live at
``<module>.base_layer.<param>``; checkpoint names are renamed to that form before loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from skyrl_backends.checkpoint import TIED_EMBEDDING, TIED_HEAD

if TYPE_CHECKING:
    from skyrl_backends.types import WeightUpdateRequest
    from skyrl_backends.weight_sync.replay import ReplayedLoad

logger = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]
Reload = Callable[[Iterable[tuple[str, torch.Tensor]]], None]


class ServedModelLoader:
    """One worker's loader. ``model`` returns the served model; ``reload`` reloads it in place from
    checkpoint-format pairs (CPU only)."""

    def __init__(self, vllm_config: Any, model: Callable[[], torch.nn.Module], device: torch.device,
                 reload: Reload) -> None:
        self.vllm_config = vllm_config
        self._model = model
        self.device = device
        self._reload = reload
        self._updated: dict[str, torch.Tensor] = {}  # CPU: every tensor updated so far
        self._checkpoint_names: list[str] | None = None
        self._replayed: ReplayedLoad | None = None  # GPU: the load of colocated updates, recorded

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def load(self, named: NamedTensors) -> None:
        """Apply ``named`` (all or nothing on CPU: a failed reload restores the previous weights)."""
        if self.on_cpu:
            self._reload_on_cpu(named)
            return
        model = self._model()
        model.load_weights(weights=rename_for_lora(model, named))
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def load_in_place(self, named: NamedTensors) -> None:
        """GPU: load without synchronising (the caller synchronises once after the last bucket)."""
        model = self._model()
        model.load_weights(weights=rename_for_lora(model, named))

    def in_place_loader(self, request: WeightUpdateRequest) -> Callable[[NamedTensors], None]:
        """GPU: what loads ``request``'s tensors in place. Tensors in buffers their sender keeps
        (colocated CUDA IPC) are the same memory at every update, so the load is recorded once and
        then replayed as one fused copy (:mod:`skyrl_backends.weight_sync.replay`)."""
        from skyrl_backends.weight_sync import replay
        from skyrl_backends.weight_sync.cuda_ipc import keeps_buffers

        if not keeps_buffers(request) or not replay.enabled():
            return self.load_in_place
        if self._replayed is None:
            self._replayed = replay.ReplayedLoad(lambda: replay.parameters_and_buffers(self._model()))
        replayed = self._replayed
        return lambda named: replayed.load(named, self.load_in_place)

    def replay_counts(self) -> dict[str, Any]:
        replayed = self._replayed
        if replayed is None:
            return {"recorded": 0, "replayed": 0, "refused": None}
        return {"recorded": replayed.recorded, "replayed": replayed.replayed, "refused": replayed.refused}

    def _reload_on_cpu(self, named: NamedTensors) -> None:
        previous = self._updated
        updated = dict(previous)
        updated.update((name, tensor.detach().to("cpu").clone()) for name, tensor in named)
        try:
            self._reload_all(updated)
        except Exception:
            logger.exception("weight reload failed; restoring the previous weights")
            self._reload_all(previous)
            raise
        self._updated = updated

    def _reload_all(self, updated: dict[str, torch.Tensor]) -> None:
        model = self._model()
        weights = rename_for_lora(model, self._checkpoint_with_updates(updated))
        # Reloading logs a warning for every layer the checkpoint has nothing for (rotary
        # embeddings, tied heads): expected here, and noise on every update.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self._reload(weights)
        finally:
            layerwise.setLevel(level)

    def _checkpoint_with_updates(self, updated: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every checkpoint tensor, in checkpoint order, with updated ones taken from ``updated``,
        then a tied head (module docstring)."""
        embedding = None
        head_given = False
        for name, tensor in self._checkpoint_tensors(updated):
            embedding = tensor if name == TIED_EMBEDDING else embedding
            head_given = head_given or name == TIED_HEAD
            yield name, tensor
        if self._tied and not head_given and embedding is not None:
            yield TIED_HEAD, embedding

    @property
    def _tied(self) -> bool:
        return bool(getattr(self.vllm_config.model_config.hf_config, "tie_word_embeddings", False))

    def _checkpoint_tensors(self, updated: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every checkpoint tensor, in checkpoint order, with updated ones taken from ``updated``; the
        checkpoint is not read when every tensor of it has been updated."""
        names = self._names_in_checkpoint()
        if names is not None and all(name in updated for name in names):
            in_checkpoint = set(names)
            yield from ((name, updated[name]) for name in names)
            yield from ((name, t) for name, t in updated.items() if name not in in_checkpoint)
            return
        from vllm.model_executor.model_loader import get_model_loader

        loader = get_model_loader(self.vllm_config.load_config)
        seen = set()
        for name, tensor in loader.get_all_weights(self.vllm_config.model_config, self._model()):
            seen.add(name)
            yield name, updated.get(name, tensor)
        for name, tensor in updated.items():  # e.g. a tied lm_head the checkpoint leaves out
            if name not in seen:
                yield name, tensor

    def _names_in_checkpoint(self) -> list[str] | None:
        if self._checkpoint_names is None:
            from skyrl_backends.checkpoint import read_header, safetensors_files

            try:
                self._checkpoint_names = [name for path in safetensors_files(self.vllm_config.model_config.model)
                                          for name in read_header(path)]
            except Exception:  # not a local safetensors folder: read through the loader
                return None
        return self._checkpoint_names


def rename_for_lora(model: torch.nn.Module,
                    named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
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
