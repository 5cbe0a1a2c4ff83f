"""Stopping a server stops everything it started: `skyrl-backends serve` over vLLM (whose engine core
is a process of its own) and vLLM's own server, as the tests, benchmarks and conformance columns stop
them (SIGTERM), and also after the server process itself was killed (SIGKILL), which vLLM's engine
core survives: what is left of the server's process session goes."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from conftest import start


@pytest.mark.parametrize("killed", [False, True], ids=["stopped", "killed-first"])
@pytest.mark.parametrize("kind", ["vllm", "vllm-serve"])
def test_stopping_a_server_stops_the_engines_processes(kind, killed, model_dir, request):
    """``killed-first``: the server process dies first (SIGKILL: a crash, or the client tests'
    failover scenario), which its engine processes survive; ``stop()`` must still end them."""
    _, process = start(kind, model_dir, Path(request.config.rootpath))
    started = psutil.Process(process.process.pid).children(recursive=True)
    assert started, f"the {kind} server started no engine process (the test would check nothing)"
    if killed:
        process.process.kill()
        process.process.wait()
        assert any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started), (
            "killing the server took its engine processes along (the test would check nothing)")
    process.stop()
    _, alive = psutil.wait_procs(started, timeout=60)
    for leftover in alive:  # not left behind for the next test
        leftover.kill()
    assert not alive, f"still running after the {kind} server stopped: {[p.pid for p in alive]}"
