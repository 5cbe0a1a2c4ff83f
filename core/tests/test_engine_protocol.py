"""Every kind of engine implements :class:`skyrl_backends.protocols.Engine` with its exact signatures,
so the client, weight sync and the HTTP server can hold any of them (and a new kind is added in one
file)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import skyrl_backends as sb
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.client import InferenceEngineClient
from skyrl_backends.engine import InferenceEngine
from skyrl_backends.protocols import ENGINE_METHODS, Engine

ray_wrapper = pytest.importorskip("skyrl_backends.ray_wrapper", reason="the Ray kinds need ray ([ray] extra)")

remote = pytest.importorskip("skyrl_backends.remote.engine", reason="the remote engine needs httpx ([remote] extra)")

IMPLEMENTATIONS = [InferenceEngine, InferenceEngineClient, ray_wrapper.RayEngineProxy,
                   ray_wrapper.RayWrappedInferenceEngine, remote.RemoteEngine]


def _parameters(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]


def _kind(function) -> str:
    if inspect.isasyncgenfunction(function):
        return "async generator"
    return "coroutine" if inspect.iscoroutinefunction(function) else "plain"


def test_the_protocol_lists_the_engine_api() -> None:
    assert {"generate", "generate_stream", "update_named_weights", "sleep", "wake_up", "weight_specs",
            "validate_weight_update", "teardown"} <= set(ENGINE_METHODS)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_signature_matches_the_protocol(implementation: type, method: str) -> None:
    expected = getattr(Engine, method)
    actual = getattr(implementation, method, None)
    assert actual is not None, f"{implementation.__name__} lacks {method}"
    assert _parameters(actual) == _parameters(expected), (
        f"{implementation.__name__}.{method}{inspect.signature(actual)} differs from "
        f"Engine.{method}{inspect.signature(expected)}")
    # Async where the protocol awaits; generate_stream may be an async generator or return one.
    if _kind(expected) == "coroutine":
        assert _kind(actual) == "coroutine", f"{implementation.__name__}.{method} must be async"
    if method == "generate_stream":
        assert _kind(actual) == "async generator"


def test_instances_are_engines(double_backend, tmp_path) -> None:
    engine = sb.create_engine("double", model=str(tmp_path))
    client = InferenceEngineClient([engine])
    proxy = ray_wrapper.RayEngineProxy(actor=None, name="ray-engine-0", backend="double",
                                       capabilities=Capabilities(), config=None)
    for instance in (engine, client, proxy):
        assert isinstance(instance, Engine), type(instance).__name__
    assert client.backend == "double" and client.capabilities == engine.capabilities
    assert asyncio.run(client.weight_specs()) == asyncio.run(engine.weight_specs())
