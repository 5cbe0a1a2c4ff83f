"""What the conformance suite runs against: a backend, a model and the engine options.

A backend author normally sets these as class attributes of their ``BackendConformanceSuite``
subclass (``backend = "mybackend"``, ``engine_options = {...}``); the command line and environment
may override them (``--conformance-backend``, ``SKYRL_CONFORMANCE_BACKEND``...), which is how this
repository runs one suite against each in-repo backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# How far a backend's log-probabilities may be from the float32 teacher-forced reference, per
# engine dtype (absolute, in nats). Half-precision engines round every logit, so they get more room.
DEFAULT_LOGPROB_TOLERANCE: dict[str, float] = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
# For engines not in float32, greedy output is checked token by token: each chosen token's
# reference log-probability may fall short of the reference maximum by at most this (a near tie
# that rounding may break either way). float32 engines must match the reference decode exactly.
# Measured with the transformers backend in bfloat16 on the tiny model (CPU): log-probability errors
# up to about 0.2 and greedy margins up to about 0.36, hence 0.25. On an H200, GPU kernels in
# bfloat16 gave rarer but larger outliers (single log-probabilities 0.3-0.7 nats off in vLLM 0.26 and
# in Hugging Face's own forward pass; a greedy choice 0.61 nats below the argmax in SGLang 0.5.17),
# hence a bfloat16 greedy margin of 1.0. Sampling instead of argmax still fails it: on this model
# most sampled tokens lie 2-3 nats below the maximum.
DEFAULT_GREEDY_MARGIN: dict[str, float] = {"float32": 0.0, "bfloat16": 1.0, "float16": 0.1}


@dataclass(frozen=True)
class ConformanceConfig:
    """One backend under test.

    ``model`` None means the suite's own tiny test model (built once, offline, into pytest's cache).
    ``engine_options`` go to :func:`skyrl_backends.create_engine` (e.g. ``dtype``, ``device``,
    ``gpu_memory_utilization``); the suite adds ``enable_lora=True`` when the backend declares LoRA,
    unless the options say otherwise. ``remote`` runs every engine through the wire: each is a
    ``skyrl-backends serve`` process on loopback, driven by a
    :class:`~skyrl_backends.remote.RemoteEngine` (the report's column is ``<backend>-remote``).
    ``server`` runs every engine as the engine's own, unmodified server (``vllm serve``, SGLang's
    ``launch_server``) driven through its HTTP API (:mod:`skyrl_backends.remote.native`; the column
    is ``<backend>-server``).
    """

    backend: str
    model: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    remote: bool = False
    server: bool = False
    logprob_tolerance: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOGPROB_TOLERANCE))
    greedy_margin: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GREEDY_MARGIN))
    # Bounds that keep the suite quick on two CPU cores; raise them for a deeper soak.
    state_machine_examples: int = 20
    state_machine_steps: int = 12
    concurrent_requests: int = 64

    def replace(self, **changes: Any) -> ConformanceConfig:
        return dataclasses.replace(self, **changes)

    def key(self) -> tuple[Any, ...]:
        """Identifies configs that can share engines."""
        return (self.backend, self.model, tuple(sorted((k, repr(v)) for k, v in self.engine_options.items())),
                self.remote, self.server)

    def tolerance_for(self, dtype: str) -> float:
        return self._lookup(self.logprob_tolerance, dtype, "logprob_tolerance")

    def greedy_margin_for(self, dtype: str) -> float:
        return self._lookup(self.greedy_margin, dtype, "greedy_margin")

    @staticmethod
    def _lookup(table: dict[str, float], dtype: str, name: str) -> float:
        if dtype not in table:
            raise KeyError(f"ConformanceConfig.{name} has no entry for engine dtype {dtype!r}; "
                           f"add one (known: {sorted(table)}).")
        return table[dtype]
