"""``make mutation``: does the conformance suite catch the bugs a backend author could write?

Each mutant of :mod:`mutants` is injected, one at a time, into a copy of the reference backend
registered as the backend ``mutant`` (:mod:`package`), and the whole conformance suite runs against
it with no test code, as an outside author would run it (``skyrl-backends conformance mutant``). A
mutant is *caught* when at least one test fails. The unchanged copy runs first and must pass, or
every mutant would look caught. Prints a progress line per mutant and, at the end, the table of
caught / total with the tests that caught each mutant::

    python scripts/mutation/run.py --model .cache/tiny-model [--only NAME ...] [--out DIR]

Writes ``table.md`` and ``results.json`` into ``--out`` (default ``.cache/mutation``), with each
run's report and log in a folder of its own. Exits 1 when a mutant survived or the baseline failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mutants import MUTANTS, Mutant
from package import MUTANT_BACKEND, REPO, build

# The reference backend's suite runs with these options in CI (tests/conformance/test_transformers.py).
ENGINE_OPTIONS = ("dtype=float32", "device=cpu")
DEFAULT_TIMEOUT_S = 900
SHOWN_TESTS = 4


@dataclass
class Outcome:
    """What one run of the suite said about one mutant (or about the unchanged baseline)."""

    name: str
    bug: str
    status: str  # caught | survived | error
    caught_by: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""


def classify(report: dict[str, Any] | None, returncode: int, timed_out: bool) -> tuple[str, list[str], str]:
    """(status, failing tests, detail) from a run's conformance report. Caught means a test failed;
    a run that left no report (the suite never started) is an error, never a catch."""
    if report is None:
        return "error", [], f"no conformance report (exit status {returncode}); see the log"
    failed = [t["test"] for t in report.get("tests", []) if t.get("status") == "fail"]
    not_run = [t["test"] for t in report.get("tests", []) if t.get("status") == "not run"]
    notes = []
    if timed_out:
        notes.append("timed out")
    if not_run:
        notes.append(f"{len(not_run)} test(s) not reached")
    if failed:
        return "caught", failed, "; ".join(notes)
    if timed_out or not_run:
        return "error", [], "; ".join(notes) or f"exit status {returncode}"
    return "survived", [], ""


def run_suite(root: Path, model: str, out: Path, timeout_s: float) -> tuple[dict[str, Any] | None, int, bool]:
    """Run the whole conformance suite against the backend built in ``root``: (report, exit status,
    timed out). The run's report and log land in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "skyrl_backends.cli", "conformance", MUTANT_BACKEND, "--model", model,
               "--report", str(report_path), "--pytest-args", "-q -p no:cacheprovider"]
    for option in ENGINE_OPTIONS:
        command += ["--engine-option", option]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    timed_out = False
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, 9)  # the suite and any engine process it started
            returncode = process.wait()
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return report, returncode, timed_out


def run_one(mutant: Mutant | None, model: str, out: Path, workdir: Path, timeout_s: float) -> Outcome:
    name = mutant.name if mutant else "baseline"
    started = time.perf_counter()
    root = build(mutant, workdir / name)
    report, returncode, timed_out = run_suite(root, model, out / name, timeout_s)
    status, failed, detail = classify(report, returncode, timed_out)
    return Outcome(name, mutant.bug if mutant else "none (the reference backend unchanged)", status, failed,
                   time.perf_counter() - started, detail)


def _tests_text(tests: list[str]) -> str:
    shown = ", ".join(f"`{t}`" for t in tests[:SHOWN_TESTS])
    return shown + (f" and {len(tests) - SHOWN_TESTS} more" if len(tests) > SHOWN_TESTS else "")


def progress_line(number: int, total: int, outcome: Outcome) -> str:
    width = len(str(total))
    if outcome.status == "caught":
        what = f"caught by {len(outcome.caught_by)} test(s): {', '.join(outcome.caught_by[:SHOWN_TESTS])}"
        what += f" (+{len(outcome.caught_by) - SHOWN_TESTS})" if len(outcome.caught_by) > SHOWN_TESTS else ""
    else:
        what = outcome.status.upper()
    extra = f" [{outcome.detail}]" if outcome.detail else ""
    return f"[{number:>{width}}/{total}] {outcome.name}: {what}{extra} ({outcome.seconds:.0f} s)"


def render_table(outcomes: list[Outcome], context: dict[str, str]) -> str:
    caught = sum(o.status == "caught" for o in outcomes)
    minutes = sum(o.seconds for o in outcomes) / 60
    lines = [f"Mutation run: **{caught} of {len(outcomes)} mutants caught** by the conformance suite "
             f"({context['date']}, {context['hardware']}, commit {context['commit']}, {minutes:.0f} min "
             f"including the baseline run of {context['baseline_s']} s).", "",
             "| # | Mutant | Bug injected into the reference backend | Result | Caught by |",
             "|---|---|---|---|---|"]
    for number, o in enumerate(outcomes, 1):
        result = o.status if not o.detail else f"{o.status} ({o.detail})"
        lines.append(f"| {number} | `{o.name}` | {o.bug} | {result} | {_tests_text(o.caught_by)} |")
    return "\n".join(lines) + "\n"


def run_context() -> dict[str, str]:
    from skyrl_backends.testing.hardware import cpu_model

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with local changes"
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            "hardware": f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} cores)", "commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("SKYRL_TEST_MODEL") or str(REPO / ".cache" / "tiny-model"),
                        help="model folder (default: $SKYRL_TEST_MODEL, else .cache/tiny-model)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--out", default=str(REPO / ".cache" / "mutation"), help="where reports, logs and the table go")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per suite run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name}: {mutant.bug}")
        return 0
    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s) {unknown}; `--list` shows them")
        mutants = [m for m in MUTANTS if m.name in args.only]
    model, out = os.path.abspath(args.model), Path(args.out).resolve()
    context = run_context()
    print(f"mutation run: {len(mutants)} mutant(s), the whole conformance suite against each; "
          f"{context['hardware']}, commit {context['commit']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="skyrl-mutation-") as scratch:
        workdir = Path(scratch)
        print("[baseline] the reference backend unchanged, registered as 'mutant': running", flush=True)
        baseline = run_one(None, model, out, workdir, args.timeout)
        if baseline.status != "survived":
            failed = ", ".join(baseline.caught_by) or baseline.detail
            print(f"[baseline] FAILED ({failed}); see {out / 'baseline' / 'log.txt'}. Fix the suite or the backend "
                  f"first: every mutant would look caught.", flush=True)
            return 1
        print(f"[baseline] passes ({baseline.seconds:.0f} s)", flush=True)
        context["baseline_s"] = f"{baseline.seconds:.0f}"
        outcomes = []
        for number, mutant in enumerate(mutants, 1):
            print(f"[{number:>{len(str(len(mutants)))}}/{len(mutants)}] {mutant.name}: running ({mutant.bug})",
                  flush=True)
            outcome = run_one(mutant, model, out, workdir, args.timeout)
            outcomes.append(outcome)
            print(progress_line(number, len(mutants), outcome), flush=True)
    table = render_table(outcomes, context)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"context": context, "baseline": asdict(baseline),
                                                  "mutants": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    print("\n" + table)
    print(f"table: {out / 'table.md'}; reports and logs: {out}/<mutant>/")
    return 0 if all(o.status == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
