"""Trainer/engine log-probability consistency.

:mod:`.metrics` is the per-batch helper trainers call (pure Python, no torch); the measurement that
fills ``docs/consistency.md`` (``skyrl-backends consistency BACKEND``) lives in :mod:`.runner` and
its table in :mod:`.table`, both imported only when used, since they need torch and transformers.
"""

from skyrl_backends.consistency.metrics import (
    DEFAULT_CAP,
    DEFAULT_THRESHOLD,
    BatchConsistency,
    ImportanceWeights,
    MismatchMetrics,
    measure_batch,
    mismatch_metrics,
    truncated_importance_weights,
)

__all__ = ["DEFAULT_CAP", "DEFAULT_THRESHOLD", "BatchConsistency", "ImportanceWeights", "MismatchMetrics",
           "measure_batch", "mismatch_metrics", "truncated_importance_weights"]
