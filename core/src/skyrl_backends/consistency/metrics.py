"""How far an engine's log-probabilities are from the trainer's, per batch, in pure Python.

An RL trainer samples with an inference engine (the behaviour policy, mu) and computes its loss with
its own forward pass (the policy being trained, pi). Both should give every sampled token the same
log-probability; in practice kernels, precision (bfloat16 logits, an LM head in half precision) and
batching make them differ, which biases the policy gradient unless it is corrected. This module is
the one definition of that difference that the consistency table (``docs/consistency.md``) and every
trainer share; it needs neither torch nor numpy (tensors and arrays are read element by element).

Per token ``t`` of a sequence, with ``e_t`` the engine's and ``p_t`` the trainer's log-probability of
the sampled token:

* ``delta_t = e_t - p_t`` (positive: the engine is more confident than the trainer);
* the importance ratio ``r_t = exp(p_t - e_t) = pi / mu``, and per sequence ``R = exp(sum_t (p_t - e_t))``;
* ``k3_t = r_t - 1 - log r_t``, whose mean over tokens sampled from the engine estimates
  KL(engine || trainer) without bias (Schulman's k3: never negative, zero only where the two agree).
  Tokens sampled with a temperature other than 1 or with truncation (top-p, top-k) do not come from
  the raw distribution the log-probabilities describe, so there it is the k3 mismatch averaged over
  the sampled tokens rather than an estimate of the KL itself; it still reads the same way.

Truncated importance sampling (TIS) weights cap those ratios: ``min(r_t, cap)`` per token and
``min(R, cap)`` per sequence. Masked-out tokens (prompt or tool output inside a response, padding)
count in nothing and get weight 0, so a trainer can multiply its per-token loss by the weights as
they are.

    from skyrl_backends.consistency import measure_batch

    batch = measure_batch(engine_logprobs, trainer_logprobs, masks=loss_masks, cap=2.0)
    log(batch.metrics.to_dict())              # mean/max |delta|, k3, fraction over 0.1, ratio quantiles
    loss = sum(w * l for w, l in zip(batch.weights.token[i], per_token_loss[i]))   # per sequence i
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from skyrl_backends.errors import ConfigError

DEFAULT_THRESHOLD = 0.1
DEFAULT_CAP = 2.0
# The quantiles of the per-sequence importance ratio that are reported, by name.
RATIO_QUANTILES: tuple[tuple[str, float], ...] = (
    ("min", 0.0), ("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95), ("max", 1.0))
_MAX_EXP = 709.0  # math.exp overflows above about 709.78

Ragged = Sequence[Sequence[float]] | Iterable[Iterable[float]]


@dataclass(frozen=True)
class MismatchMetrics:
    """The mismatch of one batch (or of the tokens of one weight version in it).

    Statistics over no tokens are None. ``sequence_ratio`` holds quantiles of the per-sequence
    importance ratio ``R`` (over sequences with at least one counted token), interpolated linearly in
    ``log R`` (so the median of two sequences is the geometric mean of their ratios).
    """

    sequences: int
    tokens: int
    mean_abs_delta: float | None
    max_abs_delta: float | None
    mean_delta: float | None
    k3_kl: float | None
    frac_over_threshold: float | None
    threshold: float
    sequence_ratio: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "tokens": self.tokens, "mean_abs_delta": self.mean_abs_delta,
                "max_abs_delta": self.max_abs_delta, "mean_delta": self.mean_delta, "k3_kl": self.k3_kl,
                "frac_over_threshold": self.frac_over_threshold, "threshold": self.threshold,
                "sequence_ratio": dict(self.sequence_ratio) if self.sequence_ratio is not None else None}


@dataclass(frozen=True)
class ImportanceWeights:
    """Truncated importance weights: ``token[i][t] = min(r_t, cap)`` and ``sequence[i] = min(R_i, cap)``,
    0 where nothing is counted. The clip fractions are the shares of counted tokens (sequences) whose
    ratio exceeded the cap (None when there are none)."""

    cap: float
    token: list[list[float]]
    sequence: list[float]
    token_clip_fraction: float | None
    sequence_clip_fraction: float | None


@dataclass(frozen=True)
class BatchConsistency:
    """What :func:`measure_batch` returns: the batch's metrics, its weights, and the metrics of each
    weight version's tokens when versions were given (empty otherwise)."""

    metrics: MismatchMetrics
    weights: ImportanceWeights
    by_version: dict[int, MismatchMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The metrics as a flat-ish dict for a trainer's logger (weights left out)."""
        out = self.metrics.to_dict()
        out["cap"] = self.weights.cap
        out["token_clip_fraction"] = self.weights.token_clip_fraction
        out["sequence_clip_fraction"] = self.weights.sequence_clip_fraction
        if self.by_version:
            out["by_version"] = {version: m.to_dict() for version, m in sorted(self.by_version.items())}
        return out


@dataclass(frozen=True)
class _Batch:
    """Validated input: per sequence, the log ratios ``p_t - e_t`` of its counted tokens, with the
    position of each in the sequence."""

    lengths: list[int]
    log_ratios: list[list[float]]
    positions: list[list[int]]


def measure_batch(engine_logprobs: Ragged, trainer_logprobs: Ragged, *,
                  masks: Ragged | None = None, versions: Sequence[int | Sequence[int]] | None = None,
                  cap: float = DEFAULT_CAP, threshold: float = DEFAULT_THRESHOLD) -> BatchConsistency:
    """Mismatch metrics and truncated importance weights of one batch.

    ``engine_logprobs[i][t]`` and ``trainer_logprobs[i][t]`` are the log-probabilities of token ``t``
    of response ``i``; ``masks[i][t]`` (truthy: counted) selects the tokens that count. ``versions``
    gives the weight version that sampled each token (one int per sequence, or one per token, as
    :attr:`Completion.weight_version` stamps them): the result then also holds the metrics of each
    version's tokens alone, so a trainer sees whether stale tokens drift further.
    """
    threshold = _check_threshold(threshold)
    batch = _validate(engine_logprobs, trainer_logprobs, masks)
    by_version: dict[int, MismatchMetrics] = {}
    if versions is not None:
        per_token = _token_versions(versions, batch.lengths)
        for version in sorted({per_token[i][t] for i, pos in enumerate(batch.positions) for t in pos}):
            selected = _Batch(batch.lengths,
                              [[r for r, t in zip(ratios, pos, strict=True) if per_token[i][t] == version]
                               for i, (ratios, pos) in enumerate(zip(batch.log_ratios, batch.positions, strict=True))],
                              [[t for t in pos if per_token[i][t] == version] for i, pos in enumerate(batch.positions)])
            by_version[version] = _metrics(selected, threshold)
    return BatchConsistency(_metrics(batch, threshold), _weights(batch, cap), by_version)


def mismatch_metrics(engine_logprobs: Ragged, trainer_logprobs: Ragged, *, masks: Ragged | None = None,
                     threshold: float = DEFAULT_THRESHOLD) -> MismatchMetrics:
    """The metrics of :func:`measure_batch` alone."""
    return _metrics(_validate(engine_logprobs, trainer_logprobs, masks), _check_threshold(threshold))


def truncated_importance_weights(engine_logprobs: Ragged, trainer_logprobs: Ragged, *, masks: Ragged | None = None,
                                 cap: float = DEFAULT_CAP) -> ImportanceWeights:
    """The weights of :func:`measure_batch` alone."""
    return _weights(_validate(engine_logprobs, trainer_logprobs, masks), cap)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted values, interpolating linearly between the two nearest
    ranks (numpy's default, ``method="linear"``)."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def safe_exp(x: float) -> float:
    """``exp(x)``, infinite instead of an OverflowError for very large ``x``."""
    return math.inf if x > _MAX_EXP else math.exp(x)


# -- the definitions -----------------------------------------------------------------------------------

def _metrics(batch: _Batch, threshold: float) -> MismatchMetrics:
    ratios = [r for seq in batch.log_ratios for r in seq]
    counted = [seq for seq in batch.log_ratios if seq]
    if not ratios:
        return MismatchMetrics(0, 0, None, None, None, None, None, threshold, None)
    n = len(ratios)
    abs_deltas = [abs(r) for r in ratios]
    sequence_logs = sorted(math.fsum(seq) for seq in counted)
    return MismatchMetrics(
        sequences=len(counted),
        tokens=n,
        mean_abs_delta=math.fsum(abs_deltas) / n,
        max_abs_delta=max(abs_deltas),
        mean_delta=-math.fsum(ratios) / n,  # delta = e - p = -(p - e)
        k3_kl=math.fsum(_k3(r) for r in ratios) / n,
        frac_over_threshold=sum(1 for d in abs_deltas if d > threshold) / n,
        threshold=threshold,
        sequence_ratio={name: safe_exp(quantile(sequence_logs, q)) for name, q in RATIO_QUANTILES},
    )


def _k3(log_ratio: float) -> float:
    """``r - 1 - log r`` for ``r = exp(log_ratio)``; ``expm1`` keeps it exact near zero, where
    ``exp(x) - 1 - x`` would lose every digit to cancellation."""
    if log_ratio > _MAX_EXP:
        return math.inf
    return math.expm1(log_ratio) - log_ratio


def _weights(batch: _Batch, cap: float) -> ImportanceWeights:
    if not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap) and cap > 0):
        raise ConfigError.out_of_range("cap", cap, "a finite number > 0 (TIS commonly uses 2 to 10)")
    log_cap = math.log(cap)
    token: list[list[float]] = []
    sequence: list[float] = []
    clipped_tokens = clipped_sequences = counted_tokens = counted_sequences = 0
    for length, ratios, positions in zip(batch.lengths, batch.log_ratios, batch.positions, strict=True):
        row = [0.0] * length
        for r, t in zip(ratios, positions, strict=True):
            row[t] = min(safe_exp(r), float(cap))
            clipped_tokens += r > log_cap
        token.append(row)
        counted_tokens += len(ratios)
        if ratios:
            total = math.fsum(ratios)
            sequence.append(min(safe_exp(total), float(cap)))
            clipped_sequences += total > log_cap
            counted_sequences += 1
        else:
            sequence.append(0.0)
    return ImportanceWeights(
        cap=float(cap), token=token, sequence=sequence,
        token_clip_fraction=clipped_tokens / counted_tokens if counted_tokens else None,
        sequence_clip_fraction=clipped_sequences / counted_sequences if counted_sequences else None)


# -- input -------------------------------------------------------------------------------------------------

def _check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold >= 0):
        raise ConfigError.out_of_range("threshold", threshold, "a number >= 0 (|delta| above it is counted)")
    return float(threshold)


def _rows(name: str, values: Any) -> list[Any]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ConfigError(name, "expected one sequence of values per response (a list of lists).")
    return list(values)


def _floats(name: str, row: Any) -> list[float]:
    if isinstance(row, (str, bytes, Mapping)) or not isinstance(row, Iterable):
        raise ConfigError(name, "expected a sequence of log-probabilities, one per response token.")
    out = []
    for t, value in enumerate(row):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}[{t}]", f"got {value!r}; expected a number (a log-probability).") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}[{t}]", f"is {number}; log-probabilities of sampled tokens must be finite "
                                              "(a NaN or infinity means the forward pass itself went wrong).")
        out.append(number)
    return out


def _validate(engine_logprobs: Any, trainer_logprobs: Any, masks: Any) -> _Batch:
    engine = _rows("engine_logprobs", engine_logprobs)
    trainer = _rows("trainer_logprobs", trainer_logprobs)
    if len(engine) != len(trainer):
        raise ConfigError("trainer_logprobs", f"has {len(trainer)} sequences, engine_logprobs has {len(engine)}; "
                                              "give both for the same responses, in the same order.")
    mask_rows = _rows("masks", masks) if masks is not None else None
    if mask_rows is not None and len(mask_rows) != len(engine):
        raise ConfigError("masks", f"has {len(mask_rows)} sequences for {len(engine)} responses; give one mask "
                                   "per response.")
    lengths, log_ratios, positions = [], [], []
    for i, (e_row, p_row) in enumerate(zip(engine, trainer, strict=True)):
        e = _floats(f"engine_logprobs[{i}]", e_row)
        p = _floats(f"trainer_logprobs[{i}]", p_row)
        if len(e) != len(p):
            raise ConfigError(f"trainer_logprobs[{i}]", f"has {len(p)} values, engine_logprobs[{i}] has {len(e)}; "
                                                        "give one log-probability per response token to both.")
        keep = [True] * len(e)
        if mask_rows is not None:
            keep = [bool(m) for m in _rows(f"masks[{i}]", mask_rows[i])]
            if len(keep) != len(e):
                raise ConfigError(f"masks[{i}]", f"has {len(keep)} values for {len(e)} tokens; give one per token.")
        lengths.append(len(e))
        log_ratios.append([p[t] - e[t] for t in range(len(e)) if keep[t]])
        positions.append([t for t in range(len(e)) if keep[t]])
    return _Batch(lengths, log_ratios, positions)


def _token_versions(versions: Any, lengths: list[int]) -> list[list[int]]:
    rows = _rows("versions", versions)
    if len(rows) != len(lengths):
        raise ConfigError("versions", f"has {len(rows)} entries for {len(lengths)} responses; give one per response "
                                      "(an int, or a list with one version per token).")
    out = []
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        if _is_int(row):
            out.append([int(row)] * length)
            continue
        values = _rows(f"versions[{i}]", row)
        if len(values) != length or not all(_is_int(v) for v in values):
            raise ConfigError(f"versions[{i}]", f"expected an int or {length} ints (one per token); got {row!r}.")
        out.append([int(v) for v in values])
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
