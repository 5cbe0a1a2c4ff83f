"""Putting plugin objects into pluggy managers, validated against the hook specs.

Every check of a plugin's hooks lives here, and every failure is a
:class:`~skyrl_backends.errors.BackendLoadError` naming the plugin and the hook (pluggy's own error
type never reaches a caller):

* an implementation with an argument its spec lacks (pluggy's rule);
* a ``skyrl_backends_``-prefixed name no spec defines: a misspelled hook, or a method that forgot
  its ``@hookimpl`` marker, which is the same bug;
* an engine without a hook every engine needs, or one its declared capabilities need
  (:func:`skyrl_backends.capabilities.missing_hooks`).

Engine hooks are checked twice when the plugin names its engine class (``BackendInfo.engine_class``):
on the class before the engine starts (a misspelled hook costs no engine start), and on the object
it returns.
"""

from __future__ import annotations

import importlib
import logging
import os
import types

import pluggy

from skyrl_backends import capabilities as caps_module
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import BackendLoadError
from skyrl_backends.hookspecs import BACKEND_HOOKS, ENGINE_HOOKS, PROJECT, BackendHookSpecs, EngineHookSpecs

logger = logging.getLogger(__name__)
TRACE_ENV = "SKYRL_BACKENDS_TRACE"


def backend_manager(plugin: object, name: str, distribution: str | None = None) -> pluggy.PluginManager:
    """A plugin manager holding one backend plugin (the entry point's target), validated."""
    return _validated_manager(BackendHookSpecs, plugin, name, distribution)


def engine_manager(engine: object, name: str, capabilities: Capabilities,
                   distribution: str | None = None) -> pluggy.PluginManager:
    """A plugin manager holding one engine object, validated against the engine hooks and the hooks
    its declared ``capabilities`` need. Hook calls are traced when ``SKYRL_BACKENDS_TRACE`` is set."""
    manager = _validated_manager(EngineHookSpecs, engine, name, distribution)
    _check_required_hooks(manager, engine, name, capabilities, distribution)
    if os.environ.get(TRACE_ENV):
        manager.trace.root.setwriter(lambda message: logger.warning("trace: %s", message.rstrip()))
        manager.enable_tracing()
    return manager


def check_engine_class(engine_class: type, name: str, capabilities: Capabilities,
                       distribution: str | None = None) -> None:
    """Validate an engine class's hooks before any engine of it starts (methods take ``self``)."""
    manager = _validated_manager(EngineHookSpecs, engine_class, name, distribution)
    _check_required_hooks(manager, engine_class, name, capabilities, distribution)


def load_engine_class(path: str, name: str, distribution: str | None = None) -> type:
    """The class a ``"module:Class"`` path names (``BackendInfo.engine_class``)."""
    module_name, _, attribute = path.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:
        raise BackendLoadError(name, distribution, f"engine_class {path!r} could not be imported: {exc!r}") from exc
    if not isinstance(value, type):
        raise BackendLoadError(name, distribution, f"engine_class {path!r} is not a class")
    return value


def _validated_manager(specs: type, plugin: object, name: str, distribution: str | None) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(specs)
    unknown = unknown_hooks(plugin)
    if unknown:
        known = BACKEND_HOOKS + ENGINE_HOOKS
        raise BackendLoadError(name, distribution, f"{_describe(plugin)} defines {', '.join(map(repr, unknown))}, "
                                                   f"which is no skyrl_backends hook (misspelled? known hooks: "
                                                   f"{', '.join(sorted(known))})")
    try:
        manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise BackendLoadError(name, distribution, f"{_describe(plugin)}: {exc}") from exc
    return manager


def unknown_hooks(plugin: object) -> list[str]:
    """Attributes with the hook prefix that no spec defines."""
    known = set(BACKEND_HOOKS) | set(ENGINE_HOOKS)
    return [attr for attr in dir(plugin) if attr.startswith(PROJECT + "_") and attr not in known]


def _check_required_hooks(manager: pluggy.PluginManager, plugin: object, name: str, capabilities: Capabilities,
                          distribution: str | None) -> None:
    implemented = [hook for hook in ENGINE_HOOKS if getattr(manager.hook, hook).get_hookimpls()]
    missing = caps_module.missing_hooks(capabilities, implemented)
    if missing:
        raise BackendLoadError(name, distribution, f"{_describe(plugin)} lacks hooks: {', '.join(missing)}")


def _describe(plugin: object) -> str:
    if isinstance(plugin, type):
        return f"engine class {plugin.__module__}.{plugin.__qualname__}"
    if isinstance(plugin, types.ModuleType):
        return f"module {plugin.__name__}"
    return f"{type(plugin).__qualname__} object"
