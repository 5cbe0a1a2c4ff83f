"""NCCL ranks of one group must share GPU memory the same way, or the group cannot connect.

NCCL moves data between GPUs through memory it shares between processes: with cuMem handles
(``NCCL_CUMEM_ENABLE=1``, NCCL's default since 2.19) or with legacy CUDA IPC handles (``=0``). A rank
of one kind cannot open the other's handles, and the group fails at its first collective with CUDA's
"invalid argument". Engines set this for their own processes: SGLang's scheduler runs with ``0``
(SGLang sets it when the engine starts), recent vLLM leaves NCCL's default. The trainer puts its
setting in the init info, and each engine-side rank compares it with its own before joining, so a
mismatch is a clear error up front instead of a failed first update and a trainer waiting for the
group's timeout.

Torch-free: a plugin that joins with its engine's own code (SGLang) checks without skyrl's receiver.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightSyncInitInfo

CUMEM_ENV = "NCCL_CUMEM_ENABLE"
INIT_INFO_KEY = "nccl_cumem_enable"  # the trainer's setting, in WeightSyncInitInfo.extra


def cumem_setting(environ: Mapping[str, str] = os.environ) -> str:
    """``"1"`` (cuMem, NCCL's default) or ``"0"`` (legacy CUDA IPC) for a process with ``environ``."""
    return "0" if environ.get(CUMEM_ENV, "1").strip().lower() in ("0", "false", "no", "off") else "1"


def check_matches_trainer(info: WeightSyncInitInfo, rank_description: str,
                          environ: Mapping[str, str] = os.environ) -> None:
    """Raise WeightUpdateError if the trainer's NCCL shares memory differently from this rank's
    (``rank_description`` names it, e.g. "SGLang's scheduler"). A trainer that did not say (not a
    skyrl sender) is not checked."""
    trainer = info.extra.get(INIT_INFO_KEY) if isinstance(info.extra, Mapping) else None
    if info.backend != "nccl" or trainer is None:
        return
    engine = cumem_setting(environ)
    if str(trainer) != engine:
        raise WeightUpdateError({CUMEM_ENV: (
            f"the trainer's NCCL runs with {CUMEM_ENV}={trainer} but {rank_description} runs with {engine}: "
            f"NCCL cannot connect ranks that share GPU memory differently (CUDA 'invalid argument' at the "
            f"first broadcast). Set {CUMEM_ENV}={engine} in the trainer's environment before it creates "
            f"any NCCL group")})
