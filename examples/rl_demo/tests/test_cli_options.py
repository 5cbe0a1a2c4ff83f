"""The demo's --engine-option reads VALUE as every skyrl-backends command does (JSON, else YAML)."""

from __future__ import annotations

import pytest
from skyrl_rl_demo.cli import build_parser


def test_engine_options_are_json_or_yaml() -> None:
    args = build_parser().parse_args(["--model", "m", "--engine-option", "engine_init_kwargs={a: 1}",
                                      "--engine-option", "rate=1e-3", "--engine-option", "dtype=float32"])
    assert args.engine_option == [("engine_init_kwargs", {"a": 1}), ("rate", 0.001), ("dtype", "float32")]


def test_a_bad_engine_option_names_it(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--engine-option", "dtype"])
    assert "--engine-option 'dtype': expected KEY=VALUE" in capsys.readouterr().err
