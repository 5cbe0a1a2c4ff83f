"""The `skyrl-backends` command line: one clear error per mistake, and no traceback for a closed pipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from skyrl_backends import cli
from skyrl_backends.conformance import cli as conformance_cli
from skyrl_backends.http import cli as http_cli


def test_closed_pipe_ends_quietly() -> None:
    # `skyrl-backends plugins --json | head`: the reader is gone before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "skyrl_backends.cli", "plugins", "--json"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1


def test_make_tiny_model_without_the_testing_extra_names_it(monkeypatch, tmp_path, capsys) -> None:
    for name in cli.TINY_MODEL_NEEDS:  # as in an environment with the core alone
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["make-tiny-model", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'skyrl-backends[testing]'" in err
    assert "is not installed" in err
    assert not (tmp_path / "model").exists()


def test_conformance_of_an_unknown_backend_is_one_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["conformance", "nosuch"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "No backend named 'nosuch' is installed" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_conformance_rejects_a_bad_engine_option_before_running(double_backend, capsys) -> None:
    assert cli.main(["conformance", "double", "--engine-option", "dtype"]) == 2
    assert "--engine-option 'dtype': expected KEY=VALUE" in capsys.readouterr().err


def test_conformance_keeps_hypothesis_files_out_of_the_working_directory(monkeypatch, tmp_path) -> None:
    # The command hands pytest a storage folder under the cache root; the suite's run itself is
    # checked in a clean folder by tests/packaging (installed wheels, a real engine).
    monkeypatch.setenv("SKYRL_BACKENDS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(conformance_cli.HYPOTHESIS_STORAGE_ENV, "")  # so that the value run() sets is undone
    monkeypatch.delenv(conformance_cli.HYPOTHESIS_STORAGE_ENV)
    seen = {}

    def pytest_main(argv):
        seen["storage"] = os.environ.get(conformance_cli.HYPOTHESIS_STORAGE_ENV)
        return 0

    monkeypatch.setattr(pytest, "main", pytest_main)
    monkeypatch.setattr(conformance_cli, "check_arguments", lambda args: None)
    assert cli.main(["conformance", "anything"]) == 0
    assert seen["storage"] == str(tmp_path / "cache" / "hypothesis")


def test_serve_is_listed_and_parses_without_starting() -> None:
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--engine-option", "seed=3"])
    assert args.func is http_cli._cmd_serve
    assert http_cli._engine_options(args.engine_option) == {"seed": 3}


@pytest.mark.parametrize(("installed", "expected"), [
    ({"fastapi": "0.115.0", "uvicorn": "0.30.0", "pydantic": "2.9.2"}, None),
    ({"fastapi": None, "uvicorn": None, "pydantic": "2.9.2"},
     "needs the http extra (fastapi, uvicorn not installed): pip install 'skyrl-backends[http]'"),
    ({"fastapi": "0.99.0", "uvicorn": "0.30.0", "pydantic": "1.10.13"},
     "needs pydantic>=2 (pydantic 1.10.13 is installed): pip install 'skyrl-backends[http]'"),
])
def test_serve_says_what_to_install(installed, expected) -> None:
    assert http_cli.http_extra_problem(installed) == expected


def test_serve_without_the_http_extra_exits_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(http_cli, "installed_versions", lambda names: dict.fromkeys(names))
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", "m"])
    assert str(info.value) == ("skyrl-backends serve: needs the http extra (fastapi, uvicorn, pydantic not "
                               "installed): pip install 'skyrl-backends[http]'")
