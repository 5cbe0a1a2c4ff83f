"""Engines on other processes and machines, behind the same engine protocol (``pip install
'skyrl-backends[http]'``).

    from skyrl_backends.remote import connect_engine
    engine = connect_engine("10.0.0.2:8000", api_key=key)     # a server started with `skyrl-backends serve`
    out = await engine.generate([[1, 2, 3]], {"max_generate_length": 64})

or from configuration, as SkyRL spells it: ``run_engines_locally: false`` with
``remote_inference_engine_urls: [...]`` (``skyrl_backends.create_engines``). :mod:`.wire` is the JSON
format both sides share, :mod:`.dialect` how calls are spoken to a kind of server, :mod:`.transport`
retries and timeouts, :mod:`.launch` a server in a child process.
"""

from skyrl_backends.remote.connect import connect_engine, normalize_url
from skyrl_backends.remote.dialect import ServerDescription, SkyRLDialect, WireDialect
from skyrl_backends.remote.engine import RemoteEngine, transport_capabilities
from skyrl_backends.remote.launch import ServerProcess, launch_engine

__all__ = ["RemoteEngine", "ServerDescription", "ServerProcess", "SkyRLDialect", "WireDialect", "connect_engine",
           "launch_engine", "normalize_url", "transport_capabilities"]
