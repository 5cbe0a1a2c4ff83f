"""Stopping a server stops everything it started, even after the server process itself was killed
(SIGKILL: a crash, or the client tests' failover scenario), which vLLM's engine core survives: what
is left of the server's process session goes. Both launchers: `skyrl-backends serve` over vLLM
(whose engine core is a process of its own) and vLLM's own server. The plain stop (SIGTERM, as the
tests, benchmarks and conformance columns stop servers) is checked whenever the module-scoped
``server`` fixture stops one (conftest.py), which spares CI two more vLLM engine starts here."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from conftest import engine_processes, start, stop_and_check


@pytest.mark.parametrize("kind", ["vllm", "vllm-serve"])
def test_a_killed_servers_engine_processes_are_stopped_too(kind, model_dir, request):
    _, process = start(kind, model_dir, Path(request.config.rootpath))
    started = engine_processes(process)
    assert started, f"the {kind} server started no engine process (the test would check nothing)"
    process.process.kill()
    process.process.wait()
    assert any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started), (
        "killing the server took its engine processes along (the test would check nothing)")
    stop_and_check(process, started, kind)
