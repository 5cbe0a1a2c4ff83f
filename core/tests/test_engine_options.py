"""`--engine-option KEY=VALUE`: one format (JSON, else YAML) for every command."""

from __future__ import annotations

import pytest
from skyrl_backends.engine_options import parse_engine_option, parse_engine_options
from skyrl_backends.errors import ConfigError


@pytest.mark.parametrize(("pair", "expected"), [
    ("dtype=float32", ("dtype", "float32")),
    ("seed=0", ("seed", 0)),
    ("enable_lora=true", ("enable_lora", True)),
    ("rate=1e-3", ("rate", 0.001)),                       # JSON's reading (YAML 1.1 gives a string)
    ('engine_init_kwargs={"enforce_eager": true}', ("engine_init_kwargs", {"enforce_eager": True})),
    ("engine_init_kwargs={enforce_eager: true}", ("engine_init_kwargs", {"enforce_eager": True})),
    ("stop=[a, b]", ("stop", ["a", "b"])),
    ("url=http://host:1/x=y", ("url", "http://host:1/x=y")),  # only the first '=' separates
])
def test_values_are_json_or_yaml(pair, expected) -> None:
    assert parse_engine_option(pair) == expected


@pytest.mark.parametrize(("pair", "message"), [
    ("dtype", "--engine-option 'dtype': expected KEY=VALUE"),
    ("=3", "--engine-option '=3': expected KEY=VALUE"),
    ("kw={a: [1, 2", "--engine-option 'kw={a: [1, 2': the value is not JSON and not YAML"),
])
def test_bad_options_name_the_option(pair, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        parse_engine_option(pair)


def test_the_flag_named_is_the_callers() -> None:
    with pytest.raises(ConfigError, match="--conformance-engine-option 'x'"):
        parse_engine_options(["x"], "--conformance-engine-option")


def test_later_keys_win() -> None:
    assert parse_engine_options(["seed=1", "dtype=float32", "seed=2"]) == {"seed": 2, "dtype": "float32"}
