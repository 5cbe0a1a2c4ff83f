"""The ``"skyrl"`` weight-transfer engine inside vLLM's workers (vLLM creates one per worker).

Receives the payloads of :mod:`skyrl_backends.weight_sync.phases` through skyrl's receivers
(:func:`skyrl_backends.weight_sync.load_named_tensors`) and loads them with
:mod:`skyrl_backend_vllm.loading`:

* ``init_transfer_engine``: a broadcast's worker joins the trainer's group at ``rank_offset`` plus
  its rank across the engine's data-parallel replicas (as vLLM's NCCL engine numbers them);
* ``update_weights``: every name, shape and dtype is checked against the checkpoint before a byte
  is received, and everything is received before a parameter changes (except a broadcast the
  trainer sent ``apply="streamed"``), so a rejected update changes nothing. On GPU the tensors are
  loaded in place as they are received; on CPU, where vLLM repacks what it loads, they are
  collected and the model is reloaded once, in ``finish_weight_update``, restoring the previous
  weights if that fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from skyrl_backends.checkpoint import checkpoint_specs
from skyrl_backends.errors import WeightUpdateError, closest_match
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.phases import TransferInit, init_info_from_json, update_info_from_json
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from skyrl_backend_vllm.loading import NamedTensors, ServedModelLoader


@dataclass
class SkyRLInitInfo(WeightTransferInitInfo):
    """The parsed ``init_info`` (vLLM's typing; the payload is :func:`init_info_from_json`'s)."""

    init: TransferInit


@dataclass
class SkyRLUpdateInfo(WeightTransferUpdateInfo):
    """The parsed ``update_info``: one skyrl weight-update request."""

    request: WeightUpdateRequest


class SkyRLWeightTransferEngine(WeightTransferEngine[SkyRLInitInfo, SkyRLUpdateInfo]):
    init_info_cls = SkyRLInitInfo
    update_info_cls = SkyRLUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self._communicator: Any = None
        self._loader = ServedModelLoader(vllm_config, lambda: self.model, self.device, self._reload)
        self._collected: NamedTensors | None = None
        self._specs: dict[str, tuple[tuple[int, ...], str]] | None = None

    @staticmethod
    def trainer_send_weights(iterator: Any, trainer_args: Any) -> None:
        """The trainer-side entry point of vLLM releases before the trainer engine registry (0.26
        declares it abstract on the worker class: without it the workers cannot create this engine).
        The ``"skyrl"`` trainer side is :class:`~skyrl_backend_vllm.weight_transfer.trainer.
        SkyRLTrainerWeightTransferEngine`, or the engine facade's own weight sync."""
        raise NotImplementedError(
            "the 'skyrl' weight-transfer backend sends from the trainer through "
            "skyrl_backend_vllm.weight_transfer.trainer.SkyRLTrainerWeightTransferEngine (vLLM's trainer-side "
            "engine API) or skyrl_backends' weight sync (engine.update_named_weights / connect_broadcast), "
            "not through trainer_send_weights")

    # -- parsing (ValueError for a bad payload, as vLLM's own engines raise) -----------------------
    def parse_init_info(self, init_dict: dict[str, Any]) -> SkyRLInitInfo:
        return SkyRLInitInfo(init_info_from_json(init_dict))

    def parse_update_info(self, update_dict: Any) -> SkyRLUpdateInfo:
        request = update_info_from_json(update_dict)
        self._check_against_checkpoint(request)
        return SkyRLUpdateInfo(request)

    def _check_against_checkpoint(self, request: WeightUpdateRequest) -> None:
        if self._specs is None:
            dtype = str(self.model_config.dtype).removeprefix("torch.")
            self._specs = {s.name: (tuple(s.shape), s.dtype) for s in checkpoint_specs(self.model_config.model, dtype)}
        problems: dict[str, str] = {}
        for name, shape, dtype in zip(request.names, request.shapes, request.dtypes, strict=True):
            spec = self._specs.get(name)
            if spec is None:
                hint = closest_match(name, self._specs)
                problems[name] = "no such parameter" + (f" (did you mean {hint!r}?)" if hint else "")
            elif tuple(shape) != spec[0]:
                problems[name] = f"shape {tuple(shape)} does not match the engine's {spec[0]}"
            elif dtype != spec[1]:
                problems[name] = f"dtype {dtype} does not match the engine's {spec[1]}; convert before sending"
        if problems:
            raise WeightUpdateError(problems)

    # -- the phases ---------------------------------------------------------------------------------
    def init_transfer_engine(self, init_info: SkyRLInitInfo) -> None:
        group = init_info.init.group
        if group is None:
            return  # colocated strategies need no set-up
        from skyrl_backends.weight_sync import make_receiver

        if self._communicator is not None:
            self._communicator.close()
        self._communicator = make_receiver(group, self.device, local_rank=self._worker_rank())

    @property
    def communicator(self) -> Any:
        """The trainer's broadcast group (None until a broadcast init): the worker extension
        receives LoRA adapters from tensors through it too."""
        return self._communicator

    def _worker_rank(self) -> int:
        """This worker's rank across the engine's data-parallel replicas."""
        parallel = self.parallel_config
        dp_index = getattr(parallel, "data_parallel_index", None)
        if dp_index is None:
            dp_index = getattr(parallel, "data_parallel_rank", 0)
        return int(dp_index) * int(parallel.world_size) + int(parallel.rank)

    def start_weight_update(self) -> None:
        self._collected = [] if self._loader.on_cpu else None

    def update_weights(self, update_info: Any) -> None:
        # The base class synchronises the accelerator, which fails on a CPU worker.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: SkyRLUpdateInfo) -> None:
        from skyrl_backends.weight_sync import load_named_tensors

        request = update_info.request
        if self._loader.on_cpu:
            collected = self._collected if self._collected is not None else []
            # Copied out of the receiver's buffers, which the next chunk reuses.
            load_named_tensors(request, self.device, lambda named: collected.extend((n, t.clone()) for n, t in named),
                               communicator=self._communicator)
            if self._collected is None:  # no start_weight_update: apply now
                self._loader.load(collected)
            return
        load_named_tensors(request, self.device, self._loader.in_place_loader(request), communicator=self._communicator)

    def finish_weight_update(self) -> None:
        collected, self._collected = self._collected, None
        if collected:
            self._loader.load(collected)

    def shutdown(self) -> None:
        if self._communicator is not None:
            self._communicator.close()
            self._communicator = None

    def _reload(self, weights: Any) -> None:
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        reload_weights(self.vllm_config, self.model, weights_iterator=weights, weights_path=None,
                       is_checkpoint_format=True)


__all__ = ["SkyRLInitInfo", "SkyRLUpdateInfo", "SkyRLWeightTransferEngine"]
