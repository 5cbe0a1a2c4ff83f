"""Fixtures for the client tests on real engines.

The backend comes from ``--client-backend`` or ``SKYRL_CLIENT_BACKEND`` (default ``transformers``);
the model from ``SKYRL_TEST_MODEL``. Engines are expensive to start, so each pool is built once
per session: ``local`` (several engines in this process), ``ray`` (engine actors on a local Ray
started here, ``ray.init(num_cpus=2)``; skipped where ray is not installed) and ``remote`` (engines
behind ``skyrl-backends serve`` processes, driven over HTTP by ``RemoteEngine``).

Every engine is created and driven on one event loop (``aio``, a loop thread): some engines bind
background tasks to their first loop (vLLM), and the HTTP tests serve from the same loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer

# Engine options per backend for the tiny CPU model (a backend not listed gets none).
BACKEND_OPTIONS: dict[str, dict] = {
    "transformers": {"dtype": "float32"},
    "vllm": {"dtype": "float32", "max_model_len": 1024, "seed": 0,
             "engine_init_kwargs": {"distributed_executor_backend": "uni"}},
}
NUM_LOCAL_ENGINES = {"vllm": 2}  # each vLLM engine is a process with its own KV cache
DEFAULT_LOCAL_ENGINES = 3
NUM_RAY_ENGINES = 2
NUM_REMOTE_ENGINES = 2
# Where the engines run: in this process, as Ray actors, behind `skyrl-backends serve` processes.
PLACEMENTS = ("local", "ray", "remote")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "own_engines: the test starts and tears down engines of its own beside the session's "
                   "shared ones (a vLLM-CPU engine takes about a minute to start); `make test-client-vllm` leaves "
                   "these to `make test-client-vllm-full`, `make test-client` runs every one on transformers")


def pytest_addoption(parser):
    parser.addoption("--client-backend", default=None,
                     help="backend the client tests run on (default: $SKYRL_CLIENT_BACKEND or transformers)")
    parser.addoption("--client-placements", default=",".join(PLACEMENTS),
                     help="comma-separated placements to run the engine tests on (default: all of "
                          f"{', '.join(PLACEMENTS)}); the others are skipped")


@pytest.fixture(scope="session")
def backend(request) -> str:
    return request.config.getoption("--client-backend") or os.environ.get("SKYRL_CLIENT_BACKEND", "transformers")


@pytest.fixture(scope="session")
def engine_options(backend) -> dict:
    return dict(BACKEND_OPTIONS.get(backend, {}))


@pytest.fixture(scope="session")
def aio():
    from skyrl_backends.client.loop_thread import LoopThread

    loop = LoopThread("client-tests")
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def make_local_engine(aio, backend, model_dir, engine_options):
    import skyrl_backends as sb

    started = []

    def make():
        engine = aio.call(sb.create_engine, backend, model=model_dir, **engine_options)
        started.append(engine)
        return engine

    yield make
    for engine in started:
        aio.run(engine.teardown(), 120)


@pytest.fixture(scope="session")
def local_engines(make_local_engine, backend):
    return [make_local_engine() for _ in range(NUM_LOCAL_ENGINES.get(backend, DEFAULT_LOCAL_ENGINES))]


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        start_local_ray(ray)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def make_ray_engines(aio, ray_session, backend, model_dir, engine_options):
    from skyrl_backends.ray_wrapper import create_ray_engines

    started = []

    def make(count):
        # Half a CPU each: two shared engines and one to kill fit the two CPUs of the local Ray.
        engines = create_ray_engines(count, backend, model_dir, num_cpus_per_engine=0.5, **engine_options)
        started.extend(engines)
        return engines

    yield make
    for engine in started:
        try:
            aio.run(engine.teardown(), 30)
        except Exception:
            pass  # killed by a test


@pytest.fixture(scope="session")
def ray_engines(make_ray_engines):
    return make_ray_engines(NUM_RAY_ENGINES)


@pytest.fixture(scope="session")
def make_remote_engines(aio, backend, model_dir, engine_options):
    """Engines behind `skyrl-backends serve`, one child process each on loopback, driven over HTTP
    (``RemoteEngine``); started together. ``kill(engine)`` ends a server's process abruptly."""
    from skyrl_backends.remote import ServerProcess, connect_engine

    started = []

    def make(count):
        servers = [ServerProcess(backend, model_dir, options=engine_options) for _ in range(count)]
        try:
            urls = [server.wait_ready() for server in servers]
        except BaseException:
            for server in servers:
                server.stop()
            raise
        # Few retries: a killed server is reported (and failed over) within a second or two.
        engines = [aio.call(connect_engine, url, retries=1, _owned_server=server) for url, server in zip(urls, servers)]
        started.extend(engines)
        return engines

    yield make
    for engine in started:
        try:
            aio.run(engine.teardown(), 60)
        except Exception:
            pass  # killed by a test


@pytest.fixture(scope="session")
def remote_engines(make_remote_engines):
    return make_remote_engines(NUM_REMOTE_ENGINES)


@pytest.fixture(params=PLACEMENTS)
def placement(request):
    chosen = request.config.getoption("--client-placements").split(",")
    if request.param not in chosen:
        pytest.skip(f"{request.param} engines not chosen (--client-placements {','.join(chosen)})")
    return request.param


@pytest.fixture
def engines(placement, request):
    return request.getfixturevalue(f"{placement}_engines")


@pytest.fixture(scope="session")
def model_weights(model_dir):
    """The model's own weights, as (name, tensor) pairs: an update that must change nothing."""
    from safetensors.torch import load_file

    return sorted(load_file(os.path.join(model_dir, "model.safetensors")).items())


def start_local_ray(ray, attempts: int = 3) -> None:
    """ray.init on this machine. Ray gives its raylet a fixed 30 s to register and raises otherwise;
    on a loaded 2-core CI machine that can happen, so a timed-out start is tried again."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
            ray.shutdown()
