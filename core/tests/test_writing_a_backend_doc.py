"""docs/writing-a-backend.md shows the example plugin's files verbatim, and the suite's verdicts it
prints are the ones the committed report of that plugin holds; so the walk-through is the code CI
runs the conformance suite against (`make test-conformance-example`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from skyrl_backends.conformance.report import summary_line

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "writing-a-backend.md"
EXAMPLE = ROOT / "examples" / "minimal_backend"
REPORT = ROOT / "docs" / "parity" / "minimal-cpu.json"
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)\n```", re.S)


def shown_files() -> dict[str, str]:
    return {m["path"]: m["body"] for m in FILE_BLOCK.finditer(DOC.read_text())}


def test_doc_shows_every_file_of_the_example() -> None:
    example_files = {str(p.relative_to(ROOT)) for p in EXAMPLE.rglob("*")
                     if p.is_file() and p.suffix in (".py", ".toml") and "egg-info" not in str(p)
                     and "__pycache__" not in str(p)}
    assert example_files, "the example plugin is missing"
    assert set(shown_files()) == example_files


@pytest.mark.parametrize("path", sorted(shown_files()))
def test_doc_block_is_the_file(path: str) -> None:
    assert shown_files()[path] + "\n" == (ROOT / path).read_text(), (
        f"docs/writing-a-backend.md shows a different {path}; update the doc (or the example) so they agree")


def test_doc_summary_matches_the_committed_report() -> None:
    text = DOC.read_text()
    after_intro = text.split("The run ends with one verdict per feature", 1)[1]
    summary = after_intro.split("```text\n", 1)[1].split("\n```", 1)[0]
    report = json.loads(REPORT.read_text())
    expected = [summary_line(row["feature"], row["status"], row["detail"]) for row in report["features"]]
    assert summary.splitlines() == expected, (
        "the verdicts shown in docs/writing-a-backend.md differ from docs/parity/minimal-cpu.json; after "
        "`make parity`, paste the minimal backend's summary into the doc")
