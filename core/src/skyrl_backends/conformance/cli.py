"""``skyrl-backends conformance BACKEND --model DIR [--report FILE]``: run the suite with no test code.

Registered into the core CLI through ``add_subcommand``; it runs pytest programmatically on
:mod:`skyrl_backends.conformance.standalone_suite` with the suite's plugin switched on. Arguments
given with ``--pytest-args`` go to pytest unchanged (``--pytest-args "-k logprobs -x"``).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "conformance", help="run the conformance suite against an installed backend",
        description="Run the shared conformance suite against BACKEND and print one verdict per feature.")
    parser.add_argument("backend", help="the backend's name (as `skyrl-backends plugins` lists it)")
    parser.add_argument("--model", default=None,
                        help="model folder (default: the suite's tiny test model, built offline on first use)")
    parser.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra create_engine option (VALUE parsed as JSON when it can be), repeatable")
    parser.add_argument("-k", dest="keyword", default=None, metavar="EXPR", help="only tests matching EXPR (pytest -k)")
    parser.add_argument("--pytest-args", default="", metavar="ARGS",
                        help='more pytest arguments, as one string (e.g. "-x -v")')
    parser.set_defaults(func=run)


def pytest_arguments(args: argparse.Namespace) -> list[str]:
    # The suite module's path, without importing it (pytest must import it itself to rewrite asserts).
    suite_module = Path(__file__).with_name("standalone_suite.py")
    argv = [str(suite_module), "-p", "skyrl_backends.conformance.pytest_plugin", "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestAssertRewriteWarning", "--rootdir", os.getcwd(),
            "--conformance-backend", args.backend]
    if args.model:
        argv += ["--conformance-model", os.path.abspath(args.model)]
    if args.report:
        argv += ["--conformance-report", os.path.abspath(args.report)]
    for option in args.engine_option:
        argv += ["--conformance-engine-option", option]
    if args.keyword:
        argv += ["-k", args.keyword]
    extra = shlex.split(args.pytest_args or "")
    return argv + (extra or ["-q"])


def run(args: argparse.Namespace) -> int:
    try:
        import pytest
    except ImportError:
        print("the conformance suite needs pytest and the testing extra: pip install 'skyrl-backends[testing]'")
        return 2
    return int(pytest.main(pytest_arguments(args)))
