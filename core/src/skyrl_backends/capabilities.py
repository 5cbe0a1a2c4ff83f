"""The capability vocabulary: what a backend declares, and every question asked of it.

This module owns the one vocabulary. A backend declares a :class:`Capabilities`; everything else
asks this module:

* the engine facade, whether a call or a sampling parameter may reach the backend
  (:func:`require`, :func:`check_sampling`);
* engine validation, which hooks a declared capability makes mandatory (:func:`missing_hooks`);
* weight sync, which broadcast layouts an engine receives (:func:`broadcast_layouts_of`);
* the conformance suite, which tests a backend can run (typed :class:`Requirement` constants such as
  :data:`LORA` or ``sleep_level(2)``; :func:`missing`).

No behaviour anywhere is keyed on a backend's name: a backend is what it declares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyrl_backends.errors import SamplingParamsError, UnsupportedCapabilityError

if TYPE_CHECKING:
    from skyrl_backends.sampling import SamplingParams

BROADCAST_LAYOUTS: tuple[str, ...] = ("packed", "per_tensor")
# The pause modes (skyrl_backends.types.PAUSE_MODES; repeated here so this module imports no types),
# and those an engine lists in Capabilities.pause_modes ("keep" is native_pause).
PAUSE_MODE_NAMES: tuple[str, ...] = ("abort", "wait", "keep")
NATIVE_PAUSE_MODES: tuple[str, ...] = ("abort", "wait")


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. The conformance suite reports a test needing an absent capability as
    *unsupported (declared)*, naming the capability, and fails a declared one that does not work.

    ``streaming`` means the engine hands out tokens as they are generated
    (``skyrl_backends_generate_stream``); without it ``generate_stream`` still works, with one chunk
    per completion at its end.

    ``broadcast_layouts`` are the layouts of a ``broadcast`` update the engine receives: skyrl's
    receiver takes both, and ``apply="streamed"`` (loading each bucket as it arrives) needs
    ``"packed"``; an engine that receives broadcasts with its own code may take ``"per_tensor"`` only.

    ``lora_from_tensors`` are the weight-sync strategies by which the engine loads (or replaces) a
    LoRA adapter sent as tensors (``skyrl_backends_load_lora_adapter_from_tensors``); empty: only
    from a folder.

    ``sleep_levels`` empty means no sleep. ``discards_weights_at_level`` is the lowest sleep level
    at which weights are dropped (the engine must then receive weights before generating again);
    None means weights always survive sleep. ``sleep_clears_prefix_cache``: the backend's sleep hook
    leaves no prefix-cache entry behind (an entry kept across a sleep would point into KV memory that
    the wake gives back uninitialised, vLLM issue 17103); without it the facade resets the prefix
    cache before every sleep, one more call to the engine.

    Pausing (docs/weight-sync.md, "Pause modes"). ``native_pause``: the engine freezes in-flight
    requests with their caches (pause mode ``keep``). ``pause_modes``: the other modes (``abort``,
    ``wait``) its ``skyrl_backends_pause_generation`` performs itself; the facade does those it does
    not list. ``recompute_on_resume``: a kept request's cache can be recomputed with the new
    weights when generation resumes (``pause_generation("keep", recompute=True)``).
    ``token_versions``: the engine labels every token it hands out with the weight version that
    produced it (the ``version`` its ``skyrl_backends_update_named_weights`` received), so a weight
    update may land while requests run; without it the facade lets in-flight requests finish
    before an update is applied, and refuses an update under requests a ``keep`` pause holds.
    """

    sleep_levels: tuple[int, ...] = ()
    discards_weights_at_level: int | None = None
    sleep_tags: bool = False
    sleep_clears_prefix_cache: bool = False
    lora: bool = False
    lora_from_tensors: tuple[str, ...] = ()
    top_logprobs: bool = False
    max_top_logprobs: int = 0
    stop_strings: bool = False
    min_new_tokens: bool = False
    seeded_sampling: bool = False
    min_p: bool = False
    repetition_penalty: bool = False
    prefix_caching: bool = False
    abort: bool = False
    native_pause: bool = False
    weight_sync_strategies: tuple[str, ...] = ()
    broadcast_layouts: tuple[str, ...] = BROADCAST_LAYOUTS
    streaming: bool = False
    pause_modes: tuple[str, ...] = ()
    recompute_on_resume: bool = False
    token_versions: bool = False

    def __post_init__(self) -> None:
        wrong = [m for m in self.pause_modes if m not in NATIVE_PAUSE_MODES]
        if wrong:
            raise ValueError(f"pause_modes {wrong}: list 'abort' or 'wait' there (the pause mode 'keep' is "
                             f"declared by native_pause)")

    def pauses_natively(self, mode: str) -> bool:
        """Whether the engine's own pause hook performs ``mode``."""
        return self.native_pause if mode == "keep" else mode in self.pause_modes

    @property
    def sleep(self) -> bool:
        return bool(self.sleep_levels)

    def names(self) -> list[str]:
        """The names of the capabilities that are present (for listings and reports)."""
        present = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("discards_weights_at_level", "max_top_logprobs", "broadcast_layouts"):
                continue
            if f.name == "pause_modes" and value:
                present.append("native_pause_modes(" + ",".join(value) + ")")
            elif f.name == "sleep_levels" and value:
                present.append("sleep(levels " + ",".join(map(str, value)) + ")")
            elif f.name in ("weight_sync_strategies", "lora_from_tensors") and value:
                label = "weight_sync" if f.name == "weight_sync_strategies" else f.name
                present.append(label + "(" + ",".join(value) + ")")
            elif value is True:
                present.append(f.name)
        return present

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Capabilities:
        """The inverse of :meth:`to_dict` (lists back to tuples); unknown keys are ignored, so an
        engine of a newer version that declares more can still be described."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**kwargs)

    @classmethod
    def common(cls, declared: Sequence[Capabilities]) -> Capabilities:
        """What every one of several engines supports (a pool behind one client)."""
        if not declared:
            return cls()
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            items = [getattr(c, f.name) for c in declared]
            if isinstance(items[0], bool):
                values[f.name] = all(items)
            elif isinstance(items[0], tuple):
                values[f.name] = tuple(x for x in items[0] if all(x in other for other in items[1:]))
            elif f.name == "max_top_logprobs":
                values[f.name] = min(items)
            elif f.name == "discards_weights_at_level":
                known = [i for i in items if i is not None]
                values[f.name] = min(known) if known else None
            else:  # pragma: no cover - a new field must say how engines combine
                raise TypeError(f"Capabilities.common does not know how to combine {f.name!r}")
        return cls(**values)


# -- requirements: typed names for what a caller needs ------------------------------------------
@dataclass(frozen=True)
class Requirement:
    """Something a caller needs a backend to declare, under the name reports use for it.

    ``root`` is reported instead when it is absent itself: a backend without sleep lacks ``sleep``,
    not each sleep level. ``label`` is how an error message names it (the name, unless given)."""

    name: str
    present: Callable[[Capabilities], bool] = field(compare=False, repr=False)
    root: Requirement | None = field(default=None, compare=False, repr=False)
    label: str = field(default="", compare=False, repr=False)

    def __call__(self, caps: Capabilities) -> bool:
        return bool(self.present(caps))

    def __str__(self) -> str:
        return self.label or self.name


def _flag(name: str, root: Requirement | None = None) -> Requirement:
    return Requirement(name, lambda caps: getattr(caps, name), root)


SLEEP = Requirement("sleep", lambda caps: caps.sleep)
SLEEP_TAGS = _flag("sleep_tags", SLEEP)
DISCARDS_WEIGHTS = Requirement(
    "discards_weights", lambda caps: caps.discards_weights_at_level is not None and any(
        level >= caps.discards_weights_at_level for level in caps.sleep_levels), SLEEP)
LORA = _flag("lora")
LORA_FROM_TENSORS = Requirement("lora_from_tensors", lambda caps: caps.lora and bool(caps.lora_from_tensors), LORA)
TOP_LOGPROBS = _flag("top_logprobs")
STOP_STRINGS = _flag("stop_strings")
MIN_NEW_TOKENS = _flag("min_new_tokens")
SEEDED_SAMPLING = _flag("seeded_sampling")
MIN_P = _flag("min_p")
REPETITION_PENALTY = _flag("repetition_penalty")
PREFIX_CACHING = _flag("prefix_caching")
ABORT = _flag("abort")
NATIVE_PAUSE = _flag("native_pause")
STREAMING = _flag("streaming")
RECOMPUTE_ON_RESUME = _flag("recompute_on_resume", NATIVE_PAUSE)
TOKEN_VERSIONS = _flag("token_versions")


def pause_mode(mode: str, recompute: bool = False) -> Requirement:
    """What pausing in ``mode`` needs of an engine facade: ``abort`` needs abort, ``wait`` nothing,
    ``keep`` the native pause (and ``recompute_on_resume`` with ``recompute``)."""
    if mode == "keep":
        return RECOMPUTE_ON_RESUME if recompute else NATIVE_PAUSE
    if mode == "abort":
        return ABORT
    if mode == "wait":
        return Requirement("pause_mode:wait", lambda caps: True, label="pause mode 'wait'")
    raise ValueError(f"{mode!r} is not a pause mode; use one of {list(PAUSE_MODE_NAMES)}")


def sleep_level(level: int) -> Requirement:
    """Sleep at ``level`` is declared."""
    return Requirement(f"sleep_level:{level}", lambda caps: level in caps.sleep_levels, SLEEP,
                       label=f"sleep level {level}")


def weight_sync(strategy: str) -> Requirement:
    """The engine receives weight updates by ``strategy`` (``"tensors"``, ``"shared_memory"``...)."""
    return Requirement(f"weight_sync:{strategy}", lambda caps: strategy in caps.weight_sync_strategies,
                       label=f"weight sync strategy {strategy!r}")


def lora_from_tensors_by(strategy: str) -> Requirement:
    """The engine loads a LoRA adapter sent as tensors by ``strategy``."""
    return Requirement(f"lora_from_tensors:{strategy}", lambda caps: strategy in caps.lora_from_tensors,
                       LORA_FROM_TENSORS, label=f"LoRA adapters from tensors by {strategy!r}")


def missing(caps: Capabilities, requirements: Iterable[Requirement]) -> list[str]:
    """The names of the requirements ``caps`` does not meet, each reported through its root when
    the root is absent too, each once."""
    names: list[str] = []
    for requirement in requirements:
        if requirement(caps):
            continue
        root = requirement.root
        reported = root.name if root is not None and not root(caps) else requirement.name
        if reported not in names:
            names.append(reported)
    return names


def require(caps: Capabilities, requirement: Requirement, backend: str, detail: str = "") -> None:
    """Raise :class:`UnsupportedCapabilityError` unless ``caps`` meets ``requirement``; a requirement
    whose root is absent too is reported as the root (no sleep, rather than no sleep level 2)."""
    if requirement(caps):
        return
    if requirement.root is not None and not requirement.root(caps):
        requirement, detail = requirement.root, ""
    raise UnsupportedCapabilityError(backend, str(requirement), detail)


# -- sampling parameters ------------------------------------------------------------------------
# What each non-default sampling parameter requires of a backend. A parameter whose requirement the
# backend does not meet is rejected by the engine facade before the backend sees it.
PARAMETER_REQUIREMENTS: dict[str, Requirement] = {
    "stop": STOP_STRINGS,
    "min_new_tokens": MIN_NEW_TOKENS,
    "seed": SEEDED_SAMPLING,
    "min_p": MIN_P,
    "repetition_penalty": REPETITION_PENALTY,
}


def check_sampling(params: SamplingParams, caps: Capabilities, backend: str) -> None:
    """Raise :class:`SamplingParamsError`, naming the parameter and the capability, for a parameter
    the backend declares it cannot honour."""
    for name in sorted(params.uses()):
        requirement = PARAMETER_REQUIREMENTS.get(name)
        if requirement is not None and not requirement(caps):
            raise SamplingParamsError(
                name, f"backend {backend!r} does not support it (capability {requirement.name!r} is "
                      f"declared absent). Remove the parameter or choose another backend.")
    if params.logprobs:
        if not caps.top_logprobs:
            raise SamplingParamsError(
                "logprobs", f"backend {backend!r} returns only the chosen token's log-probability; use logprobs=0.")
        if params.logprobs > caps.max_top_logprobs:
            raise SamplingParamsError.out_of_range(
                "logprobs", params.logprobs, f"at most {caps.max_top_logprobs} on backend {backend!r}")


# -- hooks --------------------------------------------------------------------------------------
# Engine hooks every engine implements, and those a declared capability makes mandatory.
REQUIRED_HOOKS: tuple[str, ...] = ("skyrl_backends_generate", "skyrl_backends_weight_specs",
                                   "skyrl_backends_update_named_weights", "skyrl_backends_teardown")
HOOKS_BY_REQUIREMENT: dict[Requirement, tuple[str, ...]] = {
    SLEEP: ("skyrl_backends_sleep", "skyrl_backends_wake_up"),
    LORA: ("skyrl_backends_load_lora_adapter", "skyrl_backends_unload_lora_adapter"),
    LORA_FROM_TENSORS: ("skyrl_backends_load_lora_adapter_from_tensors",),
    ABORT: ("skyrl_backends_abort",),
    Requirement("pause_modes", lambda caps: caps.native_pause or bool(caps.pause_modes)): (
        "skyrl_backends_pause_generation", "skyrl_backends_resume_generation"),
    PREFIX_CACHING: ("skyrl_backends_reset_prefix_cache",),
    STREAMING: ("skyrl_backends_generate_stream",),
}


def missing_hooks(caps: Capabilities, implemented: Iterable[str]) -> list[str]:
    """The hooks an engine with ``caps`` must implement but does not, each with why."""
    have = set(implemented)
    problems = [hook for hook in REQUIRED_HOOKS if hook not in have]
    for requirement, hooks in HOOKS_BY_REQUIREMENT.items():
        if requirement(caps):
            problems += [f"{hook} (needed by declared capability {requirement.name!r})"
                         for hook in hooks if hook not in have]
    return problems


# -- weight sync ----------------------------------------------------------------------------------
def broadcast_layouts_of(caps: Capabilities | None) -> tuple[str, ...]:
    """The broadcast layouts an engine receives (every layout when it declares nothing)."""
    return caps.broadcast_layouts if caps is not None else BROADCAST_LAYOUTS


def receives_packed_broadcast(caps: Capabilities | None) -> bool:
    """Whether skyrl's packed receiver (and so ``apply="streamed"``) serves the engine."""
    return "packed" in broadcast_layouts_of(caps)


__all__ = [
    "ABORT", "BROADCAST_LAYOUTS", "DISCARDS_WEIGHTS", "HOOKS_BY_REQUIREMENT", "LORA", "LORA_FROM_TENSORS",
    "MIN_NEW_TOKENS", "MIN_P", "NATIVE_PAUSE", "NATIVE_PAUSE_MODES", "PARAMETER_REQUIREMENTS", "PAUSE_MODE_NAMES",
    "PREFIX_CACHING", "RECOMPUTE_ON_RESUME", "REPETITION_PENALTY", "REQUIRED_HOOKS", "SEEDED_SAMPLING", "SLEEP",
    "SLEEP_TAGS", "STOP_STRINGS", "STREAMING", "TOKEN_VERSIONS", "TOP_LOGPROBS", "Capabilities", "Requirement",
    "broadcast_layouts_of", "check_sampling", "lora_from_tensors_by", "missing", "missing_hooks", "pause_mode",
    "receives_packed_broadcast", "require", "sleep_level", "weight_sync",
]
