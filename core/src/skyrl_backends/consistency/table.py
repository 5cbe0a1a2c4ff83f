"""The consistency table in ``docs/consistency.md``, generated from reports, never by hand.

The document's prose is written by hand; the table sits between two marker lines and is rewritten by
``generate``. ``check`` fails when the committed table is not exactly what the committed reports
render, or when a fresh report (from this CI run) disagrees with the committed report of its column
(the rules are in :mod:`.report`)::

    python -m skyrl_backends.consistency.table generate docs/consistency/*.json -o docs/consistency.md
    python -m skyrl_backends.consistency.table check docs/consistency.md docs/consistency/*.json \\
        --fresh .cache/consistency/*.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skyrl_backends.consistency.report import compare, incomparable, load_reports

BEGIN = "<!-- BEGIN consistency table: generated from docs/consistency/*.json by `make consistency-table` -->"
END = "<!-- END consistency table -->"
# Columns by prefix in this order (the reference first, CPU before GPU); within a prefix, the plain
# column first, then variants by name.
PREFERRED_PREFIXES = ("transformers-cpu", "vllm-cpu", "sglang-cpu", "transformers-gpu", "vllm-gpu", "sglang-gpu")
REFERENCE_TITLES = {"trainer": "Against the trainer's forward pass", "float32": "Against float32"}


def _rank(report: dict[str, Any]) -> tuple[int, int, str]:
    column = report["column"]
    for index, prefix in enumerate(PREFERRED_PREFIXES):
        if column.startswith(prefix):
            return index, 1 if report.get("label") else 0, column
    return len(PREFERRED_PREFIXES), 0, column


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3g}"


def _share(value: float | None) -> str:
    if value is None:
        return "–"
    return "0%" if value == 0 else f"{100 * value:.2g}%"


def _ratios(quantiles: dict[str, float] | None, names: Sequence[str]) -> str:
    if not quantiles:
        return "–"
    return " / ".join(_number(quantiles[n]) for n in names)


def _trainer(report: dict[str, Any]) -> str:
    trainer = report["trainer"]
    head = " + fp32 head" if trainer.get("lm_head") == "float32" else ""
    return f"{trainer['dtype']}{head} ({trainer['device']})"


def _variant(report: dict[str, Any]) -> str:
    parts = []
    init = report.get("engine_options", {}).get("engine_init_kwargs") or {}
    parts += [f"`{k}={json.dumps(v, separators=(',', ':'))}`" for k, v in sorted(init.items())]
    parts += [f"`{k}={v}`" for k, v in sorted(report.get("environment", {}).items())
              if k in _VARIANT_ENV and v.lower() not in ("", "0", "false")]
    if not report["plan"].get("seeded", True):
        parts.append("unseeded requests")
    return ", ".join(parts) or "defaults"


# Environment variables that make a variant (others the report records, such as the CPU KV-cache
# size, do not change the numbers and would only crowd the table).
_VARIANT_ENV = ("VLLM_BATCH_INVARIANT", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_ATTENTION_BACKEND",
                "SGLANG_ENABLE_DETERMINISTIC_INFERENCE")


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(reports: list[dict[str, Any]]) -> str:
    """The generated part of the document, markers included."""
    reports = sorted(reports, key=_rank)
    width = len(reports)
    lines = [BEGIN, "", "| | " + " | ".join(f"`{r['column']}`" for r in reports) + " |",
             "|---|" + "---|" * width]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(_escape(v) for v in values) + " |")

    for reference, title in REFERENCE_TITLES.items():
        lines.append(f"| **{title}** |" + " |" * width)
        metrics = [r["against"][reference] for r in reports]
        if reference == "trainer":
            row("trainer", [_trainer(r) for r in reports])
        row("mean \\|Δ\\|", [_number(m["mean_abs_delta"]) for m in metrics])
        row("max \\|Δ\\|", [_number(m["max_abs_delta"]) for m in metrics])
        row("mean Δ (engine − reference)", [_number(m["mean_delta"]) for m in metrics])
        row("k3 KL(engine ‖ reference) per token", [_number(m["k3_kl"]) for m in metrics])
        row("tokens with \\|Δ\\| > 0.1", [_share(m["frac_over_threshold"]) for m in metrics])
        row("sequence ratio p05 / p50 / p95", [_ratios(m["sequence_ratio"], ("p05", "p50", "p95")) for m in metrics])
        row("sequence ratio min / max", [_ratios(m["sequence_ratio"], ("min", "max")) for m in metrics])
        longest = [max(m["by_length"], key=int) for m in metrics]
        row("sequence ratio min / max, longest responses",
            [f"{_ratios(m['by_length'][n]['sequence_ratio'], ('min', 'max'))} ({n} tokens)"
             for m, n in zip(metrics, longest, strict=True)])
    row("*Engine*", [f"{r.get('engine') or r['backend']} {r['engine_version']}" for r in reports])
    row("*Model (weights hash)*", [f"{r.get('model', {}).get('name', '?')} ({r.get('model', {}).get('weights', '?')})"
                                   for r in reports])
    row("*Engine dtype*", [r["dtype"] for r in reports])
    row("*Variant*", [_variant(r) for r in reports])
    row("*Rollouts*", [f"{r['rollouts']['sequences']} sequences, {r['rollouts']['tokens']} tokens" for r in reports])
    row("*Trainer side*", [f"torch {r['trainer']['torch']}, transformers {r['trainer']['transformers']}"
                           for r in reports])
    row("*Hardware*", [r["hardware"] + (f", {r['cpu_isa']}" if r.get("cpu_isa") else "") for r in reports])
    row("*Date (UTC)*", [r["date"] for r in reports])
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write(document: Path, reports: list[dict[str, Any]]) -> None:
    """Replace the generated part of ``document`` (which must hold both markers)."""
    text = document.read_text()
    start, end = _region(document, text)
    document.write_text(text[:start] + render(reports) + text[end:])


def _region(document: Path, text: str) -> tuple[int, int]:
    start = text.find(BEGIN)
    end = text.find(END, start + 1 if start >= 0 else 0)
    if start < 0 or end < 0:
        raise ValueError(f"{document} has no generated table: it needs the lines\n{BEGIN}\n{END}")
    end += len(END)
    if text[end:end + 1] == "\n":
        end += 1
    return start, end


def check(document: Path, committed: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[str]:
    """Every way the committed document disagrees with the reports (empty: it agrees)."""
    problems = []
    if not document.exists():
        return [f"{document} does not exist"]
    text = document.read_text()
    try:
        start, end = _region(document, text)
    except ValueError as exc:
        return [str(exc)]
    if text[start:end] != render(committed):
        problems.append(f"the table in {document} is not what its reports generate (edited by hand, or reports "
                        "changed without regenerating it); run `make consistency-table`")
    by_column = {r["column"]: r for r in committed}
    for report in fresh:
        column = report["column"]
        if column not in by_column:
            problems.append(f"column {column!r} was measured but has no committed report: commit it under "
                            "docs/consistency/ (`make consistency`), or delete the stale fresh report")
            continue
        if incomparable(by_column[column], report) is None:  # another CPU kind: its numbers are its own
            problems += compare(by_column[column], report)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyrl_backends.consistency.table",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="rewrite the table in the document from reports")
    gen.add_argument("reports", nargs="+")
    gen.add_argument("-o", "--output", required=True, help="the document (docs/consistency.md)")
    chk = sub.add_parser("check", help="fail if the document or a fresh report disagrees with the committed reports")
    chk.add_argument("document")
    chk.add_argument("reports", nargs="+", help="the committed reports")
    chk.add_argument("--fresh", nargs="*", default=[], help="reports measured by this run")
    args = parser.parse_args(argv)
    if args.command == "generate":
        write(Path(args.output), load_reports(args.reports))
        print(f"wrote the table of {args.output} from {len(args.reports)} report(s)")
        return 0
    problems = check(Path(args.document), load_reports(args.reports), load_reports(args.fresh) if args.fresh else [])
    for problem in problems:
        print(f"consistency table: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.document} agrees with {len(args.reports)} committed and {len(args.fresh)} fresh report(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
