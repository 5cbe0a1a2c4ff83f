"""``skyrl-backends conformance BACKEND --model DIR [--report FILE]``: run the suite with no test code.

Registered into the core CLI through ``add_subcommand``; it runs pytest programmatically on
:mod:`skyrl_backends.conformance.standalone_suite` with the suite's plugin switched on. Arguments
given with ``--pytest-args`` go to pytest unchanged (``--pytest-args "-k logprobs -x"``). The backend
and the engine options are checked first, so a wrong name is one error, not a failing suite.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from skyrl_backends.engine_options import HELP as ENGINE_OPTION_HELP

# Hypothesis keeps its example database and caches in ./.hypothesis unless told where.
HYPOTHESIS_STORAGE_ENV = "HYPOTHESIS_STORAGE_DIRECTORY"


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "conformance", help="run the conformance suite against an installed backend",
        description="Run the shared conformance suite against BACKEND and print one verdict per feature.")
    parser.add_argument("backend", help="the backend's name (as `skyrl-backends plugins` lists it)")
    parser.add_argument("--model", default=None,
                        help="model folder (default: the suite's tiny test model, built offline on first use)")
    parser.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help=f"extra create_engine option: {ENGINE_OPTION_HELP}")
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


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the backend or the engine options, or None."""
    from skyrl_backends.discovery import get_backend
    from skyrl_backends.engine_options import parse_engine_options
    from skyrl_backends.errors import SkyRLBackendsError

    try:
        get_backend(args.backend)
        parse_engine_options(args.engine_option)
    except SkyRLBackendsError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    try:
        import pytest
    except ImportError:
        print("skyrl-backends conformance: the suite needs pytest and the testing extra: "
              "pip install 'skyrl-backends[testing]'", file=sys.stderr)
        return 2
    problem = check_arguments(args)
    if problem:
        print(f"skyrl-backends conformance: {problem}", file=sys.stderr)
        return 2
    from skyrl_backends.testing.cache import cache_dir

    os.environ.setdefault(HYPOTHESIS_STORAGE_ENV, str(cache_dir("hypothesis")))
    return int(pytest.main(pytest_arguments(args)))
