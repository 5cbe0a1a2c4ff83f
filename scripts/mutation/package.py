"""Build a mutant backend: a copy of the reference backend's package under another name, with one
mutant's edits applied, made discoverable by a ``*.dist-info`` folder beside it.

Nothing is installed and the suite is not touched: the folder returned is put first on the
``PYTHONPATH`` of the process that runs the conformance suite, where entry-point discovery finds
the backend ``mutant`` like any installed plugin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mutants import Mutant

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PACKAGE = REPO / "plugins" / "transformers_backend" / "src" / "skyrl_backend_transformers"
REFERENCE_MODULE = "skyrl_backend_transformers"
REFERENCE_NAME_LINE = 'NAME = "transformers"\n'
MUTANT_MODULE = "skyrl_backend_mutant"
MUTANT_BACKEND = "mutant"
MUTANT_DISTRIBUTION = "skyrl-backend-mutant"


class MutantError(ValueError):
    """A mutant that cannot be applied to the reference backend as it is now."""


def apply_edits(mutant: Mutant, package: Path) -> None:
    """Apply every edit of ``mutant`` to the package folder ``package``, each to text that occurs
    exactly once in its file."""
    for edit in mutant.edits:
        path = package / edit.file
        text = path.read_text()
        count = text.count(edit.old)
        if count != 1:
            raise MutantError(f"mutant {mutant.name!r}: {edit.file} holds the text to replace {count} times, not "
                              f"once; update scripts/mutation/mutants.py to the backend's source:\n{edit.old}")
        path.write_text(text.replace(edit.old, edit.new))


def rename(package: Path) -> None:
    """Make the copy its own plugin: module ``skyrl_backend_mutant``, backend name ``mutant``."""
    for path in package.rglob("*.py"):
        path.write_text(path.read_text().replace(REFERENCE_MODULE, MUTANT_MODULE))
    plugin = package / "plugin.py"
    text = plugin.read_text()
    if text.count(REFERENCE_NAME_LINE) != 1:
        raise MutantError(f"{plugin} no longer declares {REFERENCE_NAME_LINE.strip()!r} once")
    plugin.write_text(text.replace(REFERENCE_NAME_LINE, f'NAME = "{MUTANT_BACKEND}"\n'))


def write_dist_info(root: Path) -> Path:
    """The metadata an installer would write, so entry-point discovery finds the backend."""
    folder = root / f"{MUTANT_MODULE}-0.0.0.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {MUTANT_DISTRIBUTION}\nVersion: 0.0.0\n")
    (folder / "entry_points.txt").write_text(f"[skyrl_backends]\n{MUTANT_BACKEND} = {MUTANT_MODULE}.plugin\n")
    return folder


def build(mutant: Mutant | None, root: Path, source: Path = REFERENCE_PACKAGE) -> Path:
    """Write the backend ``mutant`` carrying ``mutant``'s bug (None: the reference unchanged) into
    ``root``, which must not exist yet; returns ``root``, the folder to put on ``PYTHONPATH``."""
    package = root / MUTANT_MODULE
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if mutant is not None:
        apply_edits(mutant, package)
    rename(package)
    write_dist_info(root)
    return root
