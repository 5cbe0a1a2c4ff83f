"""Finding installed backends through the ``skyrl_backends`` entry-point group.

Each entry point is loaded on its own. A plugin that fails to import or fails validation is recorded
with its name, distribution and error, and every other backend still works; only selecting the
broken backend raises, with that context. A plugin whose engine is missing or outside its declared
versions, or that was written for another plugin API version, is recorded as skipped with the reason
and the command that fixes it. Engines are never imported here: discovery reads
engine versions from package metadata.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import BackendLoadError, BackendNotFoundError, EngineVersionError, PluginAPIVersionError
from skyrl_backends.hookspecs import PLUGIN_API_VERSION, PROJECT
from skyrl_backends.registration import backend_manager
from skyrl_backends.types import BackendInfo

ENTRY_POINT_GROUP = PROJECT
# A comma-separated list of backend names to ignore (like tox's and vLLM's switches), for working
# around a broken plugin without uninstalling it.
DISABLE_ENV = "SKYRL_BACKENDS_DISABLE"

Status = Literal["ok", "skipped", "error", "disabled"]

# The backends this project publishes, with the command that installs each (named when one is asked
# for but not installed; the README's install table has the CPU variants).
PUBLISHED_BACKENDS = {
    "transformers": "pip install skyrl-backend-transformers",
    "vllm": "pip install 'skyrl-backend-vllm[gpu]'",
    "sglang": "pip install 'skyrl-backend-sglang[gpu]'",
}


@dataclass
class Backend:
    """An installed backend as discovery found it."""

    name: str
    distribution: str | None = None
    distribution_version: str | None = None
    status: Status = "ok"
    reason: str | None = None
    info: BackendInfo | None = None
    engine_version: str | None = None
    plugin: Any = None
    error: BaseException | None = None
    _manager: pluggy.PluginManager | None = field(default=None, repr=False)

    @property
    def manager(self) -> pluggy.PluginManager:
        """The plugin manager holding this backend's hooks (raises if the backend is unusable)."""
        self.raise_if_unusable()
        assert self._manager is not None
        return self._manager

    def raise_if_unusable(self) -> None:
        if self.status == "error":
            raise BackendLoadError(self.name, self.distribution, self.error or self.reason or "unknown error")
        if self.status == "disabled":
            raise BackendLoadError(self.name, self.distribution, f"disabled by {DISABLE_ENV}")
        if self.status == "skipped":
            assert self.info is not None
            if not plugin_api_supported(self.info):
                raise _api_version_error(self.name, self.distribution, self.info)
            raise EngineVersionError(self.name, self.info.engine, self.engine_version,
                                     self.info.supported_versions, self.info.engine_install_command())

    def capabilities(self, config: Any = None) -> Capabilities | None:
        """Declared capabilities, or None when the backend cannot be asked."""
        if self._manager is None or self.status == "error":
            return None
        return self._manager.hook.skyrl_backends_capabilities(config=config)


# Exceptions that stop discovery instead of marking one plugin broken: the cancellation of the task
# or generator discovery runs in is not the plugin's failure. Everything else a plugin raises while
# importing (SystemExit from a sys.exit() at import, a KeyboardInterrupt raised by its code, ...)
# marks that plugin broken and leaves the others usable.
_PROPAGATE: tuple[type[BaseException], ...] = (GeneratorExit, asyncio.CancelledError)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, Exception):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} raised while loading the plugin ({exc!r}); a plugin must not exit or interrupt " \
           f"the process that imports it"
def installed_engine_version(info: BackendInfo) -> str | None:
    """The installed version of the engine distribution (or an alternative), from metadata only."""
    for dist in (info.engine, *info.engine_alternatives):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_supported(version: str, specifier: str) -> bool:
    if not specifier:
        return True
    try:
        # Local labels such as "+cpu" say how a wheel was built, not which release it is.
        release = Version(version).public
        return SpecifierSet(specifier).contains(release, prereleases=True)
    except (InvalidVersion, InvalidSpecifier):
        return False


def plugin_api_supported(info: BackendInfo) -> bool:
    return PLUGIN_API_VERSION in info.plugin_api_versions


def _api_version_error(name: str, distribution: str | None, info: BackendInfo) -> PluginAPIVersionError:
    from skyrl_backends import __version__

    return PluginAPIVersionError(name, distribution, info.plugin_api_versions, PLUGIN_API_VERSION, __version__)


def load_backend(name: str, plugin: object, distribution: str | None = None,
                 distribution_version: str | None = None) -> Backend:
    """Validate ``plugin`` and check its engine version; never raises, records problems instead."""
    backend = Backend(name=name, distribution=distribution, distribution_version=distribution_version,
                      plugin=plugin)
    try:
        manager = backend_manager(plugin, name, distribution)
        info = manager.hook.skyrl_backends_backend_info()
        if not isinstance(info, BackendInfo):
            raise TypeError(f"skyrl_backends_backend_info returned {type(info).__name__}, not BackendInfo")
        if info.name != name:
            raise ValueError(f"entry point is named {name!r} but the plugin calls itself {info.name!r}")
    except _PROPAGATE:
        raise
    except BaseException as exc:  # a broken plugin must not take the host down, SystemExit included
        backend.status, backend.error, backend.reason = "error", exc, _describe_failure(exc)
        return backend
    backend.info, backend._manager = info, manager
    backend.engine_version = installed_engine_version(info)
    if not plugin_api_supported(info):
        backend.status = "skipped"
        backend.reason = str(_api_version_error(name, distribution, info))
    elif backend.engine_version is None or not version_supported(backend.engine_version, info.supported_versions):
        backend.status = "skipped"
        backend.reason = str(EngineVersionError(name, info.engine, backend.engine_version, info.supported_versions,
                                                info.engine_install_command()))
    return backend


def discover_backends() -> dict[str, Backend]:
    """Every backend registered in the ``skyrl_backends`` entry-point group, by name."""
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    backends: dict[str, Backend] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        dist_version = dist.version if dist is not None else None
        if entry_point.name in disabled:
            backends[entry_point.name] = Backend(entry_point.name, dist_name, dist_version, status="disabled",
                                                 reason=f"disabled by {DISABLE_ENV}")
            continue
        if entry_point.name in backends:
            other = backends[entry_point.name]
            other.status, other.reason = "error", (
                f"two distributions register a backend named {entry_point.name!r}: "
                f"{other.distribution} and {dist_name}; uninstall one")
            other.error = RuntimeError(other.reason)
            continue
        try:
            plugin = entry_point.load()
        except _PROPAGATE:
            raise
        except BaseException as exc:  # report, keep going: one bad plugin must not hide the others
            backends[entry_point.name] = Backend(entry_point.name, dist_name, dist_version, status="error",
                                                 reason=_describe_failure(exc), error=exc)
            continue
        backends[entry_point.name] = load_backend(entry_point.name, plugin, dist_name, dist_version)
    return backends


# Plugins registered in-process (tests, notebooks, a trainer shipping its own backend); they take
# precedence over installed ones of the same name.
_registered: dict[str, Backend] = {}


def register_backend(plugin: object, name: str | None = None) -> Backend:
    """Register a backend plugin object without installing a distribution."""
    if name is None:
        manager = backend_manager(plugin, "unnamed")
        name = manager.hook.skyrl_backends_backend_info().name
    backend = load_backend(name, plugin, distribution="(registered in-process)")
    if backend.status == "error":
        backend.raise_if_unusable()
    _registered[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


# What discover_backends found, kept for the life of the process: entry points do not change while a
# trainer runs, and reading them costs tens of milliseconds per engine created.
_discovered: dict[str, Backend] | None = None


def refresh_backends() -> None:
    """Forget what discovery found, so the next lookup reads the entry points again (after installing
    a plugin into a running process, or in tests)."""
    global _discovered
    _discovered = None


def all_backends(refresh: bool = False) -> dict[str, Backend]:
    """Every backend, installed (discovered once per process) and registered in-process."""
    global _discovered
    if refresh or _discovered is None:
        _discovered = discover_backends()
    backends = dict(_discovered)
    backends.update(_registered)
    return backends


def get_backend(name: str) -> Backend:
    """The usable backend called ``name``; raises a helpful error if it is absent or broken."""
    backends = all_backends()
    if name not in backends:
        raise BackendNotFoundError(name, [n for n, b in backends.items()], PUBLISHED_BACKENDS)
    backend = backends[name]
    backend.raise_if_unusable()
    return backend
