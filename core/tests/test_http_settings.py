"""`skyrl-backends serve`'s limit flags and how they reach uvicorn and the app (no engine needed)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from skyrl_backends.cli import build_parser  # noqa: E402
from skyrl_backends.http.cli import http_settings  # noqa: E402
from skyrl_backends.http.guards import host_name  # noqa: E402
from skyrl_backends.http.server import uvicorn_config  # noqa: E402
from skyrl_backends.http.settings import HTTPSettings  # noqa: E402


def parse(*flags):
    return build_parser().parse_args(["serve", "--model", "m", *flags])


def test_defaults_are_the_settings_defaults():
    assert http_settings(parse()) == HTTPSettings()


def test_flags_set_the_settings_and_uvicorn():
    args = parse("--uvicorn-log-level", "debug", "--max-n", "8", "--header-timeout-s", "2.5",
                 "--keep-alive-timeout-s", "7", "--max-connections", "99", "--allowed-hosts", "a.example, b.example",
                 "--max-model-len", "512")
    settings = http_settings(args)
    assert settings.max_n == 8 and settings.max_model_len == 512
    assert settings.allowed_hosts == ("a.example", "b.example")
    config = uvicorn_config(object(), settings)
    assert config.log_level == "debug" and config.timeout_keep_alive == 7 and config.limit_concurrency == 99
    assert config.http.header_timeout_s == 2.5  # the protocol with the header deadline


def test_a_bad_limit_is_refused_naming_the_flag():
    with pytest.raises(SystemExit, match="--max-n"):
        http_settings(parse("--max-n", "0"))
    with pytest.raises(SystemExit):
        parse("--uvicorn-log-level", "loud")


@pytest.mark.parametrize("header, name", [(b"localhost:8000", "localhost"), (b"[::1]:80", "[::1]"),
                                          (b"Example.COM", "example.com"), (b"127.0.0.1", "127.0.0.1")])
def test_host_names_lose_their_port(header, name):
    assert host_name(header) == name
