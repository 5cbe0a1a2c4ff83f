"""Serving policy: a reachable address needs a key (or an explicit flag), and a server answers
"loading" while its engines load instead of leaving callers hanging in the listen backlog."""

from __future__ import annotations

import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from skyrl_backends.errors import ConfigError  # noqa: E402
from skyrl_backends.http.engine_server import LoadingResponder, check_exposure  # noqa: E402
from skyrl_backends.http.server import bind_socket  # noqa: E402


def test_a_non_loopback_address_without_a_key_is_refused_and_says_why():
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "key", False)
    check_exposure("0.0.0.0", None, True)  # the explicit flag
    with pytest.raises(ConfigError) as info:
        check_exposure("0.0.0.0", None, False)
    assert info.value.field == "host"
    assert "push weights" in str(info.value) and "--allow-no-api-key" in str(info.value)


def test_serve_refuses_before_loading_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "skyrl_backends.cli", "serve", "--model", str(tmp_path),
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                            env={"SKYRL_BACKENDS_API_KEY": "", "PATH": "/usr/bin:/bin",
                                 "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode != 0 and "without an API key" in result.stderr


def test_the_port_answers_loading_until_the_app_takes_over():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loading = LoadingResponder(sock).start()
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/skyrl/v1/health", timeout=10)
        assert answer.status_code == 503 and answer.json()["status"] == "loading"
    finally:
        loading.stop()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ready"})

    import time

    import uvicorn
    from skyrl_backends.client.loop_thread import LoopThread
    from skyrl_backends.http.server import uvicorn_config

    loop = LoopThread("serving-test")
    server = uvicorn.Server(uvicorn_config(app))
    running = loop.submit(server.serve(sockets=[sock]))  # the very socket the responder answered on
    try:
        while not server.started and not running.done():
            time.sleep(0.01)
        assert httpx.get(f"http://127.0.0.1:{port}/anything", timeout=10).text == "ready"
    finally:
        server.should_exit = True
        running.result(30)
        loop.stop()
        sock.close()
