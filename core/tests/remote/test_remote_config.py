"""Configuration of engines served elsewhere: SkyRL's keys, checked by the config's one rule, and the
URLs a remote engine accepts."""

from __future__ import annotations

import pytest
import skyrl_backends as sb
from skyrl_backends.config import GeneratorConfig, load_config, parse_overrides
from skyrl_backends.errors import ConfigError

pytest.importorskip("httpx")
from skyrl_backends.remote import normalize_url  # noqa: E402


def test_remote_urls_are_a_list_of_strings():
    config = GeneratorConfig(run_engines_locally=False, remote_inference_engine_urls=["10.0.0.2:8001", "h:1"])
    assert config.remote_inference_engine_urls == ["10.0.0.2:8001", "h:1"]
    for bad, field in (("10.0.0.2:8001", "remote_inference_engine_urls"), ([8001], "remote_inference_engine_urls[0]"),
                       ([" "], "remote_inference_engine_urls")):
        with pytest.raises(ConfigError) as info:
            GeneratorConfig(remote_inference_engine_urls=bad)
        assert info.value.field == field


def test_remote_urls_from_the_command_line_and_yaml(tmp_path):
    values = parse_overrides(["generator.run_engines_locally=false",
                              "generator.remote_inference_engine_urls=['127.0.0.1:8001', '127.0.0.1:8002']"])
    assert load_config(values).remote_inference_engine_urls == ["127.0.0.1:8001", "127.0.0.1:8002"]
    path = tmp_path / "generator.yaml"
    path.write_text("generator:\n  run_engines_locally: false\n  remote_inference_engine_urls:\n    - 10.0.0.2:8001\n")
    assert GeneratorConfig.from_yaml(path).remote_inference_engine_urls == ["10.0.0.2:8001"]


@pytest.mark.parametrize("options, message", [
    ({"run_engines_locally": False}, "is empty"),
    ({"run_engines_locally": False, "remote_inference_engine_urls": ["a:1", "b:2"]}, "create_engines"),
    ({"remote_inference_engine_urls": ["a:1"], "model": "/m"}, "run_engines_locally is true"),
])
def test_create_engine_names_the_key_when_the_remote_config_is_incomplete(options, message):
    with pytest.raises(ConfigError) as info:
        sb.create_engine(**options)
    assert info.value.field == "remote_inference_engine_urls" and message in str(info.value)


def test_an_unreachable_server_is_an_engine_failure_naming_it():
    from skyrl_backends.remote import connect_engine

    with pytest.raises(sb.EngineDeadError, match="127.0.0.1:9"):
        connect_engine("127.0.0.1:9", wait_ready_s=0.2, retries=1)


@pytest.mark.parametrize("url, expected", [
    ("10.0.0.2:8001", "http://10.0.0.2:8001/skyrl/v1"),
    ("http://host:8000/", "http://host:8000/skyrl/v1"),
    ("https://host", "https://host/skyrl/v1"),
    ("http://host:8000/skyrl/v1/engines/1", "http://host:8000/skyrl/v1/engines/1"),
    ("[::1]:8000", "http://[::1]:8000/skyrl/v1"),
])
def test_urls_as_skyrl_writes_them(url, expected):
    assert normalize_url(url) == expected


@pytest.mark.parametrize("url", ["", "ftp://host:1", "host", "http://:80", "host:notaport"])
def test_bad_urls_name_the_key(url):
    with pytest.raises(ConfigError) as info:
        normalize_url(url)
    assert info.value.field == "remote_inference_engine_urls"


def test_a_remote_engine_offers_the_strategies_its_connection_can_carry():
    from skyrl_backends.capabilities import Capabilities
    from skyrl_backends.remote import transport_capabilities

    server = Capabilities(lora=True, weight_sync_strategies=("tensors", "shared_memory", "cuda_ipc", "broadcast"))
    here = transport_capabilities(server, same_host=True)
    assert here.weight_sync_strategies == ("tensors", "shared_memory", "cuda_ipc", "broadcast") and here.lora
    assert transport_capabilities(server, same_host=False).weight_sync_strategies == ("broadcast",)
    # In-process tensors need shared memory on the server's side: an engine without it has no "tensors" here.
    native = Capabilities(weight_sync_strategies=("tensors", "broadcast"))
    assert transport_capabilities(native, same_host=True).weight_sync_strategies == ("broadcast",)
