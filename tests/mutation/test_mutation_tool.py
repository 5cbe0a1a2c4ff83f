"""The mutation tool (scripts/mutation) checked without running the suite: every mutant still applies
to the reference backend's source and builds a plugin that discovery finds, and the verdict of a
run is read from its conformance report (``make mutation`` runs the suite itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "mutation"))

import mutants  # noqa: E402
import package  # noqa: E402
import run  # noqa: E402


def _sources(root: Path) -> dict[str, str]:
    folder = root / package.MUTANT_MODULE
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.py"))}


def test_names_are_unique_and_every_mutant_says_what_it_breaks() -> None:
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    assert all(m.bug and m.edits for m in mutants.MUTANTS)


def test_the_unchanged_copy_is_the_reference_backend_renamed(tmp_path: Path) -> None:
    sources = _sources(package.build(None, tmp_path / "baseline"))
    reference = {str(p.relative_to(package.REFERENCE_PACKAGE)): p.read_text()
                 for p in sorted(package.REFERENCE_PACKAGE.rglob("*.py"))}
    assert set(sources) == set(reference)
    for name, text in reference.items():
        expected = text.replace(package.REFERENCE_MODULE, package.MUTANT_MODULE)
        if name == "plugin.py":
            expected = expected.replace('NAME = "transformers"', 'NAME = "mutant"')
        assert sources[name] == expected
    assert package.REFERENCE_MODULE not in "".join(sources.values())


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_to_the_current_backend_and_compiles(tmp_path: Path, mutant: mutants.Mutant) -> None:
    baseline = _sources(package.build(None, tmp_path / "baseline"))
    mutated = _sources(package.build(mutant, tmp_path / mutant.name))
    changed = {name for name in baseline if mutated[name] != baseline[name]}
    assert changed == {edit.file for edit in mutant.edits}
    for name, text in mutated.items():
        compile(text, name, "exec")


def test_an_edit_that_no_longer_matches_is_an_error(tmp_path: Path) -> None:
    stale = mutants.Mutant("stale", "edits text the backend no longer has",
                           (mutants.Edit("engine.py", "text that is not in the engine\n", "x\n"),))
    with pytest.raises(package.MutantError, match="'stale': engine.py holds the text to replace 0 times"):
        package.build(stale, tmp_path / "stale")


def test_the_mutant_is_found_by_entry_point_discovery(tmp_path: Path) -> None:
    root = package.build(mutants.MUTANTS[0], tmp_path / "mutant")
    probe = ("import json; from skyrl_backends.discovery import discover_backends; b = discover_backends()['mutant']; "
             "print(json.dumps([b.distribution, type(b.plugin).__name__, b.plugin.__name__, b.info.name]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "skyrl-backend-mutant", "module", "skyrl_backend_mutant.plugin", "mutant"]


def _report(**statuses: str) -> dict:
    return {"tests": [{"test": name, "status": status} for name, status in statuses.items()]}


def test_a_mutant_is_caught_only_by_a_failing_test() -> None:
    assert run.classify(_report(test_a="pass", test_b="fail", test_c="unsupported"), 1, False) == (
        "caught", ["test_b"], "")
    assert run.classify(_report(test_a="pass", test_c="unsupported"), 0, False) == ("survived", [], "")
    # A run that never reached its tests, or left no report, proves nothing either way.
    assert run.classify(_report(test_a="pass", test_b="not run"), -9, True)[0] == "error"
    assert run.classify(None, 4, False)[0] == "error"
    assert run.classify(_report(test_a="fail", test_b="not run"), -9, True) == (
        "caught", ["test_a"], "timed out; 1 test(s) not reached")


def test_the_table_counts_caught_mutants_and_names_the_tests() -> None:
    outcomes = [run.Outcome("top_p_ignored", "top_p ignored", "caught", ["test_top_p"], 40.0),
                run.Outcome("pause_ignored", "pause ignored", "survived", [], 50.0)]
    table = run.render_table(outcomes, {"date": "2026-12-03", "hardware": "CPU: X (2 cores)", "commit": "abc",
                                        "baseline_s": "38"})
    assert "**1 of 2 mutants caught**" in table
    assert "| 1 | `top_p_ignored` | top_p ignored | caught | `test_top_p` |" in table
    assert "| 2 | `pause_ignored` | pause ignored | survived |  |" in table
    assert run.progress_line(2, 12, outcomes[1]) == "[ 2/12] pause_ignored: SURVIVED (50 s)"
