"""Every error the framework raises on purpose.

Each error says what was wrong *and* what to do about it, so a user who reads only the last line of
a traceback can fix the problem. All of them derive from :class:`SkyRLBackendsError`, so a trainer
can catch the framework's errors apart from an engine's own crashes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


class SkyRLBackendsError(Exception):
    """Base class of every error raised by skyrl_backends on purpose."""


def closest_match(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate that ``name`` most likely misspells, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    suggestion = closest_match(name, candidates)
    return f" Did you mean {suggestion!r}?" if suggestion else ""


class ConfigError(SkyRLBackendsError, ValueError):
    """A configuration value (generator config or sampling parameter) is unknown or out of range."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")

    @classmethod
    def unknown_key(cls, key: str, valid: Iterable[str], where: str) -> ConfigError:
        valid = sorted(valid)
        return cls(
            key,
            f"unknown key in {where}.{_did_you_mean(key, valid)} Valid keys: {', '.join(valid)}.",
        )

    @classmethod
    def out_of_range(cls, field: str, value: object, accepted: str) -> ConfigError:
        return cls(field, f"got {value!r}; accepted: {accepted}.")


class SamplingParamsError(ConfigError):
    """A sampling parameter is unknown, out of range, or not honoured by the selected backend."""


class BackendNotFoundError(ConfigError, LookupError):
    """No installed backend has the requested name (a configuration error of the key ``backend``)."""

    def __init__(self, name: str, installed: Iterable[str], published: Mapping[str, str] | None = None) -> None:
        """``published`` maps the backends this project publishes to the command that installs each."""
        installed = sorted(installed)
        published = dict(published or {})
        self.name = name
        self.field = "backend"
        listing = ", ".join(installed) if installed else "none"
        near_installed = closest_match(name, installed)
        near_published = closest_match(name, published)
        if near_installed:
            # A typo of an installed backend: suggest it, and no package named after the typo.
            advice = f"Did you mean {near_installed!r}?"
        elif name in published:
            advice = (f"Install it with `{published[name]}` (in its own environment if its engine conflicts "
                      f"with others).")
        elif near_published:
            advice = (f"Did you mean {near_published!r}? It is not installed either: "
                      f"`{published[near_published]}`.")
        else:
            known = ", ".join(sorted(published)) or "none"
            advice = (f"No published backend has that name (published: {known}); a third-party backend is a "
                      f"distribution with an entry point in the `skyrl_backends` group.")
        SkyRLBackendsError.__init__(
            self, f"No backend named {name!r} is installed. {advice} Installed backends: {listing}.")


class PluginAPIVersionError(SkyRLBackendsError, ImportError):
    """A backend plugin was written for a plugin API version this core does not provide."""

    def __init__(self, backend: str, distribution: str | None, declared: Iterable[int], provided: int,
                 core_version: str) -> None:
        self.backend = backend
        self.declared = tuple(declared)
        self.provided = provided
        dist = distribution or f"the {backend!r} plugin"
        versions = ", ".join(str(v) for v in self.declared) or "none"
        newer = any(v > provided for v in self.declared)
        fix = (f"upgrade skyrl-backends (`pip install -U skyrl-backends`) or install a release of {dist} for "
               f"plugin API {provided}" if newer else
               f"upgrade {dist} to a release for plugin API {provided}, or install a skyrl-backends release "
               f"that provides API {versions}")
        super().__init__(
            f"Backend {backend!r} ({dist}) was written for plugin API version {versions}, but skyrl-backends "
            f"{core_version} provides version {provided}: {fix}."
        )


class BackendLoadError(SkyRLBackendsError, ImportError):
    """A backend plugin failed to import or failed validation."""

    def __init__(self, name: str, distribution: str | None, cause: BaseException | str) -> None:
        self.name = name
        self.distribution = distribution
        self.cause = cause
        dist = f" (distribution {distribution})" if distribution else ""
        super().__init__(f"Backend {name!r}{dist} failed to load: {cause}")


class EngineVersionError(SkyRLBackendsError):
    """The installed engine is missing or outside the versions a backend supports."""

    def __init__(self, backend: str, engine: str, installed: str | None, supported: str,
                 install: str | None = None) -> None:
        self.backend = backend
        self.engine = engine
        self.installed = installed
        self.supported = supported
        have = f"version {installed} is installed" if installed else "it is not installed"
        install = install or f"pip install '{engine}{supported}'"
        super().__init__(
            f"Backend {backend!r} supports {engine} {supported or '(any version)'}, but {have}. "
            f"Install a supported version: `{install}`."
        )


class UnsupportedCapabilityError(SkyRLBackendsError, NotImplementedError):
    """The selected backend declares that it does not support what was asked."""

    def __init__(self, backend: str, capability: str, detail: str = "") -> None:
        self.backend = backend
        self.capability = capability
        extra = f" {detail}" if detail else ""
        super().__init__(
            f"Backend {backend!r} does not support {capability!r}.{extra} "
            f"Run `skyrl-backends plugins` to see which backends declare it."
        )


class EngineStateError(SkyRLBackendsError, RuntimeError):
    """The engine is in a state where the call is not allowed (asleep, torn down, weights missing)."""


class EngineAsleepError(EngineStateError):
    """Generation was requested while part of the engine's memory is released."""

    def __init__(self, asleep_tags: Iterable[str]) -> None:
        self.asleep_tags = sorted(asleep_tags)
        super().__init__(
            f"The engine is asleep (released: {', '.join(self.asleep_tags)}). "
            f"Call `await engine.wake_up()` before generating."
        )


class WeightsNotLoadedError(EngineStateError):
    """The engine does not hold a complete set of weights: it discarded them while asleep, or a
    streamed weight update failed partway. Generation is refused until every parameter has been
    pushed again."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason or ("The engine discarded its weights when it went to sleep and has not "
                                 "been given new ones.")
        super().__init__(
            f"{self.reason} Push weights with `await engine.update_named_weights(...)` (or a "
            f"weight-sync strategy) before generating."
        )


class EngineClosedError(EngineStateError):
    """The engine has been torn down."""

    def __init__(self) -> None:
        super().__init__("The engine has been torn down; create a new one with create_engine().")


class WeightUpdateError(SkyRLBackendsError, ValueError):
    """A weight update was rejected; the engine keeps serving its previous weights.

    The one exception is a streamed broadcast (``apply="streamed"``) refused partway
    (``partly_applied``): the buckets before the offending one were applied, and the engine refuses
    to generate until every weight has been pushed again."""

    def __init__(self, problems: dict[str, str], *, partly_applied: bool = False) -> None:
        self.problems = dict(problems)
        self.partly_applied = partly_applied
        lines = [f"  {name}: {why}" for name, why in sorted(self.problems.items())]
        outcome = ("buckets of this streamed update before the offending ones were applied, so the engine "
                   "generates nothing until every weight has been pushed again" if partly_applied
                   else "nothing was applied and the engine keeps its previous weights")
        super().__init__(
            f"Weight update rejected ({len(self.problems)} offending tensor(s)); {outcome}:\n" + "\n".join(lines)
        )


class LoraAdapterError(SkyRLBackendsError, LookupError):
    """An unknown LoRA adapter was named, or an adapter could not be loaded."""


class EngineDeadError(SkyRLBackendsError, RuntimeError):
    """An engine stopped responding or crashed; its requests could not be completed."""


class RemoteEngineError(SkyRLBackendsError, RuntimeError):
    """An engine server reported an error of a type this side does not rebuild (an engine's own
    exception), or answered with something that is not the engine protocol's error body.
    ``remote_type`` names what the server raised, ``status`` is the HTTP status."""

    def __init__(self, remote_type: str, message: str, status: int | None = None) -> None:
        self.remote_type = remote_type
        self.status = status
        super().__init__(f"the engine server raised {remote_type}: {message}")
