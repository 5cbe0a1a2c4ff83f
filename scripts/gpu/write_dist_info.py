"""Make in-repo packages discoverable on a machine where they cannot be pip-installed.

Backends are found through entry points (group ``skyrl_backends``), which Python reads from the
``*.dist-info`` folders on ``sys.path``. The GPU machine has no network and the project is put on
``PYTHONPATH`` as source folders, so nothing is installed and no entry point exists. This writes,
for each package folder given (one with a ``pyproject.toml``), the minimal metadata an installer
would have written: ``METADATA`` (name, version) and ``entry_points.txt``::

    python scripts/gpu/write_dist_info.py /tmp/skyrl_dist core plugins/vllm_backend
    export PYTHONPATH=/tmp/skyrl_dist:core/src:plugins/vllm_backend/src:$PYTHONPATH
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def entry_points_text(project: dict) -> str:
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    sections = []
    for group, entries in groups.items():
        lines = [f"[{group}]"] + [f"{name} = {target}" for name, target in entries.items()]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def project_version(package_dir: Path, pyproject: dict) -> str:
    """The static version, or the one hatch reads from ``__version__`` when it is dynamic."""
    project = pyproject["project"]
    if "version" in project:
        return project["version"]
    source = package_dir / pyproject["tool"]["hatch"]["version"]["path"]
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', source.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{source}: no __version__ = '...' line for the dynamic version")
    return match.group(1)


def write_dist_info(package_dir: Path, target: Path) -> Path:
    pyproject = tomllib.loads((package_dir / "pyproject.toml").read_text())
    project = pyproject["project"]
    name, version = project["name"], project_version(package_dir, pyproject)
    # The folder name an installer uses: the normalized name, underscores for dashes.
    folder = target / f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (folder / "entry_points.txt").write_text(entry_points_text(project))
    (folder / "INSTALLER").write_text("scripts/gpu/write_dist_info.py\n")
    return folder


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    target = Path(argv[0])
    for package_dir in argv[1:]:
        print(f"wrote {write_dist_info(Path(package_dir), target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
