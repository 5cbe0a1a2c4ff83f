"""The core and the transformers plugin installed from their wheels (not editable) into a fresh
environment ($SKYRL_WHEEL_ENV), and the core wheel alone into another ($SKYRL_WHEEL_CORE_ENV), used
the way a user would: from an empty folder, through the installed command. `make test-wheels` builds
both environments."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

WHEEL_ENV = os.environ.get("SKYRL_WHEEL_ENV")
CORE_ENV = os.environ.get("SKYRL_WHEEL_CORE_ENV")
MODEL = os.environ.get("SKYRL_TEST_MODEL")

pytestmark = pytest.mark.skipif(not (WHEEL_ENV and CORE_ENV and MODEL),
                                reason="needs SKYRL_WHEEL_ENV, SKYRL_WHEEL_CORE_ENV and SKYRL_TEST_MODEL "
                                       "(make test-wheels)")


def run(env: str, command: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """``command[0]`` from the environment's bin/, in ``cwd``, with the source tree nowhere on the path."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra_env)
    return subprocess.run([str(Path(env) / "bin" / command[0]), *command[1:]], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=900)


def test_packages_are_installed_files_not_the_checkout(tmp_path) -> None:
    done = run(WHEEL_ENV, ["python", "-c",
                           "import json, skyrl_backends, skyrl_backend_transformers as t;"
                           "print(json.dumps([skyrl_backends.__file__, t.__file__]))"], tmp_path)
    assert done.returncode == 0, done.stderr
    site = str(Path(WHEEL_ENV).resolve())
    for path in json.loads(done.stdout):
        assert str(Path(path).resolve()).startswith(site) and "site-packages" in path, path


def test_plugins_lists_the_installed_backend(tmp_path) -> None:
    done = run(WHEEL_ENV, ["skyrl-backends", "plugins", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["transformers"]["status"] == "ok", rows
    assert rows["transformers"]["distribution"] == "skyrl-backend-transformers"
    assert any(c.startswith("sleep") for c in rows["transformers"]["capabilities"])


def test_a_conformance_group_passes_and_leaves_the_folder_as_it_was(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "cache"
    done = run(WHEEL_ENV, ["skyrl-backends", "conformance", "transformers", "--model", MODEL,
                           "-k", "lifecycle_state_machine or max_length"], work, SKYRL_BACKENDS_CACHE=str(cache))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Lifecycle state machine: pass" in done.stdout
    assert list(work.iterdir()) == []  # no .hypothesis/ where the command ran
    assert (cache / "hypothesis").is_dir()


def test_serve_without_the_http_extra_says_how_to_install_it(tmp_path) -> None:
    done = run(WHEEL_ENV, ["skyrl-backends", "serve", "--model", MODEL], tmp_path)
    assert done.returncode != 0
    assert "skyrl-backends serve: needs the http extra" in done.stderr
    assert "pip install 'skyrl-backends[http]'" in done.stderr
    assert "invalid choice" not in done.stderr


def test_core_alone_make_tiny_model_names_the_extra(tmp_path) -> None:
    done = run(CORE_ENV, ["skyrl-backends", "make-tiny-model", str(tmp_path / "model")], tmp_path)
    assert done.returncode == 2
    assert "pip install 'skyrl-backends[testing]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "model").exists()


def test_core_alone_lists_no_backend_and_names_the_reference_one(tmp_path) -> None:
    done = run(CORE_ENV, ["skyrl-backends", "plugins"], tmp_path)
    assert done.returncode == 0 and "No skyrl_backends backends are installed" in done.stdout
    done = run(CORE_ENV, ["python", "-c", "import skyrl_backends as sb; sb.create_engine('transformer', model='m')"],
               tmp_path)
    assert done.returncode != 0
    assert ("No backend named 'transformer' is installed. Did you mean 'transformers'? It is not installed either: "
            "`pip install skyrl-backend-transformers`.") in done.stderr


def test_core_alone_conformance_and_serve_say_what_to_install(tmp_path) -> None:
    done = run(CORE_ENV, ["skyrl-backends", "conformance", "transformers"], tmp_path)
    assert done.returncode == 2 and "pip install 'skyrl-backends[testing]'" in done.stderr
    done = run(CORE_ENV, ["skyrl-backends", "--help"], tmp_path)
    assert "serve" in done.stdout and "conformance" in done.stdout
    done = run(CORE_ENV, ["skyrl-backends", "serve", "--model", "m"], tmp_path)
    assert done.returncode != 0 and "pip install 'skyrl-backends[http]'" in done.stderr
