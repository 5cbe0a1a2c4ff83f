"""``--engine-option KEY=VALUE``: the one format of every command that takes engine options.

VALUE is read as JSON, and where it is not JSON, as YAML (PyYAML's safe loader): ``dtype=float32`` is
a string, ``seed=0`` an integer, ``enable_lora=true`` a boolean, ``rate=1e-3`` a float (JSON's reading;
YAML 1.1 would make it a string), ``engine_init_kwargs={"enforce_eager": true}`` and
``engine_init_kwargs={enforce_eager: true}`` the same mapping. A value that is neither is an error
naming the option; nothing is passed on as a string by accident.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from skyrl_backends.errors import ConfigError

FLAG = "--engine-option"
HELP = ("an engine option KEY=VALUE, VALUE read as JSON or else YAML (dtype=float32, seed=0, "
        "engine_init_kwargs='{enforce_eager: true}'); repeatable")


def parse_value(text: str) -> Any:
    """VALUE of ``KEY=VALUE``: JSON where it is JSON, else YAML; raises ValueError if it is neither."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not JSON and not YAML ({str(exc).splitlines()[0]})") from exc


def parse_engine_option(pair: str, flag: str = FLAG) -> tuple[str, Any]:
    """One ``KEY=VALUE`` into ``(key, value)``; a ConfigError naming the option otherwise."""
    key, sep, value = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} {pair!r}", "expected KEY=VALUE, e.g. dtype=float32.")
    try:
        return key, parse_value(value)
    except ValueError as exc:
        raise ConfigError(f"{flag} {pair!r}", f"the value is {exc}.") from exc


def parse_engine_options(pairs: Iterable[str], flag: str = FLAG) -> dict[str, Any]:
    """Every ``KEY=VALUE`` of a repeated option into a dict (a later KEY wins)."""
    return dict(parse_engine_option(pair, flag) for pair in pairs)
