"""Both HTTP clients of remote engines (the engine API's and the engines' own servers') drop an idle
keep-alive connection before the servers close theirs: a request sent on a connection the server is
closing fails with a read error that a generation cannot safely repeat (seen as an engine reported
dead in the vllm-server conformance column)."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")

from skyrl_backends.http.settings import HTTPSettings  # noqa: E402
from skyrl_backends.remote.native.http import ServerHTTP  # noqa: E402
from skyrl_backends.remote.transport import HttpTransport  # noqa: E402

# uvicorn's timeout_keep_alive default, which vLLM's and SGLang's servers keep.
ENGINE_SERVERS_KEEP_ALIVE_S = 5.0


@pytest.mark.parametrize("client", [HttpTransport("http://127.0.0.1:1"), ServerHTTP("http://127.0.0.1:1")],
                         ids=["engine-api", "engine-server"])
def test_idle_connections_expire_before_the_servers_close_them(client):
    expiry = client._http.limits.keepalive_expiry
    assert expiry is not None and expiry < min(HTTPSettings().keep_alive_timeout_s, ENGINE_SERVERS_KEEP_ALIVE_S)
