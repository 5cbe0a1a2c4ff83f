"""The ``skyrl-backends`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from skyrl_backends.discovery import all_backends


def _cmd_plugins(args: argparse.Namespace) -> int:
    backends = all_backends()
    rows = []
    for name, backend in sorted(backends.items()):
        caps, status, reason = None, backend.status, backend.reason
        try:
            caps = backend.capabilities()
        except Exception as exc:  # a broken capabilities hook is reported like a load error
            status, reason = "error", f"capabilities hook failed: {exc!r}"
        rows.append({
            "name": name,
            "status": status,
            "distribution": backend.distribution,
            "version": backend.distribution_version,
            "engine": backend.info.engine if backend.info else None,
            "engine_version": backend.engine_version,
            "supported": backend.info.supported_versions if backend.info else None,
            "capabilities": caps.names() if caps else [],
            "reason": reason,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No skyrl_backends backends are installed. Try `pip install skyrl-backend-transformers`.")
        return 0
    for row in rows:
        dist = f"{row['distribution']} {row['version'] or ''}".strip()
        engine = f"{row['engine']} {row['engine_version'] or '(not installed)'}" if row["engine"] else "?"
        print(f"{row['name']}: {row['status']}")
        print(f"  distribution: {dist}")
        print(f"  engine:       {engine} (supports {row['supported'] or 'any'})")
        if row["capabilities"]:
            print(f"  capabilities: {', '.join(row['capabilities'])}")
        if row["reason"]:
            print(f"  reason:       {row['reason']}")
    return 0


# What make-tiny-model imports, all in the core's `testing` extra.
TINY_MODEL_NEEDS = ("torch", "transformers", "tokenizers", "peft", "safetensors")


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    import importlib

    from skyrl_backends.testing.tiny_model import build_tiny_model, fingerprint

    for name in TINY_MODEL_NEEDS:  # before anything is written
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            print(f"skyrl-backends make-tiny-model: needs {', '.join(TINY_MODEL_NEEDS)} ({name} is not "
                  f"installed). Install them with: pip install 'skyrl-backends[testing]'", file=sys.stderr)
            return 2
    path = build_tiny_model(args.out_dir, args.seed)
    print(f"tiny model in {path} (sha256 {fingerprint(path)[:16]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyrl-backends", description="Inference-engine backends for RL trainers.")
    parser.add_argument("--version", action="store_true", help="print versions of the core and every backend")
    sub = parser.add_subparsers(dest="command")

    plugins = sub.add_parser("plugins", help="list installed backends, their engines, capabilities and errors")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_cmd_plugins)

    tiny = sub.add_parser("make-tiny-model", help="build the tiny offline test model (needs transformers)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=1234)
    tiny.set_defaults(func=_cmd_make_tiny_model)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands whose modules live beside the CLI; each registers itself if present."""
    import importlib

    for module_name in ("skyrl_backends.conformance.cli", "skyrl_backends.http.cli"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.add_subcommand(sub)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
    except BrokenPipeError:
        # The reader stopped early (`skyrl-backends plugins --json | head`): nothing is wrong with the
        # command, and the rest of its output has nowhere to go.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from skyrl_backends import __version__

        print(f"skyrl-backends {__version__}")
        for name, backend in sorted(all_backends().items()):
            print(f"  {name}: {backend.distribution} {backend.distribution_version} [{backend.status}]")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
