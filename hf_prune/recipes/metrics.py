"""GLUE metrics, offline: the same keys and numbers as ``evaluate.load("glue", task)``, from scikit-learn/scipy.

``load_metric`` uses the Hub's ``evaluate`` module when it can be fetched and this offline copy otherwise (the
numbers are identical); ``glue_compute_metrics`` is a ready ``compute_metrics`` for ``transformers.Trainer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tasks import GLUE_HUB_PATH, TaskSpec, get_task

_TRUE = {"1", "ON", "YES", "TRUE"}


def _sklearn_scipy() -> tuple[Any, Any]:
    try:
        from scipy import stats
        from sklearn import metrics
    except ImportError as e:
        raise ImportError("GLUE metrics need scikit-learn and scipy: pip install scikit-learn scipy") from e
    return metrics, stats


# Each function mirrors evaluate's glue.py exactly (argument order included: pearsonr(preds, labels)).
def _accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean())


def _f1(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(_sklearn_scipy()[0].f1_score(y_true=labels, y_pred=preds))  # binary: F1 of class 1


def _mcc(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(_sklearn_scipy()[0].matthews_corrcoef(labels, preds))


def _pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(_sklearn_scipy()[1].pearsonr(preds, labels)[0])


def _spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(_sklearn_scipy()[1].spearmanr(preds, labels)[0])


METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _mcc,
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def compute_glue_metrics(task: str | TaskSpec, predictions: Sequence[Any] | np.ndarray,
                         references: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics of class ids (or scores, for regression) against the references."""
    spec = get_task(task)
    preds, labels = _as_array(spec, predictions, "predictions"), _as_array(spec, references, "references")
    if preds.shape != labels.shape or preds.ndim != 1 or len(preds) == 0:
        raise ValueError(f"task {spec.name!r}: predictions {preds.shape} and references {labels.shape} must be "
                         f"non-empty 1-d arrays of the same length (pass class ids, not logits)")
    return {name: METRIC_FUNCTIONS[name](preds, labels) for name in spec.metric_names}


def _as_array(spec: TaskSpec, values: Sequence[Any] | np.ndarray, what: str) -> np.ndarray:
    """The dtypes evaluate's glue casts to: float32 scores for regression, int64 class ids otherwise."""
    arr = np.asarray(values)
    if spec.is_regression:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"task {spec.name!r}: {what} must be class ids; got fractional values "
                         f"(use logits_to_predictions for logits or probabilities)")
    return arr.astype(np.int64)


def hub_offline() -> bool:
    """Whether the environment forbids Hub access (then evaluate.load would only fail, or wait on timeouts)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").upper() in _TRUE for n in names)


@dataclass
class GlueMetric:
    """A GLUE metric with evaluate's call style: ``metric.compute(predictions=..., references=...)``.

    Args:
        task: the task whose metrics are computed.
        module: the loaded ``evaluate`` module, or None to compute offline.
    """

    task: TaskSpec
    module: Any = None

    @property
    def source(self) -> str:
        return "evaluate" if self.module is not None else "offline"

    def compute(self, *, predictions: Sequence[Any] | np.ndarray,
                references: Sequence[Any] | np.ndarray) -> dict[str, float]:
        if self.module is None:
            return compute_glue_metrics(self.task, predictions, references)
        result = self.module.compute(predictions=predictions, references=references)
        return {k: float(v) for k, v in result.items()}

    __call__ = compute


def load_metric(task: str | TaskSpec, *, use_evaluate: bool = True) -> GlueMetric:
    """``evaluate.load("glue", task)`` when it loads, else the offline computation (same keys, same numbers).

    Offline environments (``HF_HUB_OFFLINE=1`` and friends) skip ``evaluate`` entirely; any loading error falls
    back too, so this never blocks. Custom tasks are always computed offline (``evaluate``'s glue knows GLUE only).
    """
    spec = get_task(task)
    if not use_evaluate or hub_offline() or spec.hub_path != GLUE_HUB_PATH:
        return GlueMetric(spec)
    try:
        import evaluate

        return GlueMetric(spec, evaluate.load("glue", spec.hub_config))
    except Exception:  # no network, script not cached, evaluate missing: the offline copy gives the same numbers
        return GlueMetric(spec)


def logits_to_predictions(task: str | TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax over the last axis) for classification, a flat score vector for regression."""
    logits = np.asarray(logits)
    if not get_task(task).is_regression:
        return np.argmax(logits, axis=-1)
    return np.squeeze(logits, axis=-1) if logits.ndim > 1 else logits  # (N, 1) head output -> (N,)


def glue_compute_metrics(task: str | TaskSpec, metric: GlueMetric | None = None) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for ``Trainer``: EvalPrediction -> metric dict, plus ``combined_score`` (their mean)
    when the task has several metrics, as transformers' run_glue.py reports it. Offline unless ``metric`` is given.
    """
    spec = get_task(task)
    metric = metric or GlueMetric(spec)

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits  # models may also return hidden states
        result = metric.compute(predictions=logits_to_predictions(spec, logits), references=eval_pred.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics
