"""GLUE metrics against numbers worked out by hand from the definitions."""

import math
import sys
import types

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_prune.recipes.metrics import (
    GlueMetric,
    compute_glue_metrics,
    glue_compute_metrics,
    load_metric,
    logits_to_predictions,
)
from hf_prune.recipes.tasks import GLUE_TASKS, TaskSpec

# Confusion matrix by hand: TP=4 (label 1, pred 1), FN=1, TN=3, FP=2.
LABELS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
ACC = 7 / 10
F1 = 2 * 4 / (2 * 4 + 2 + 1)  # 2TP / (2TP + FP + FN) = 8/11
MCC = (4 * 3 - 2 * 1) / math.sqrt((4 + 2) * (4 + 1) * (3 + 2) * (3 + 1))  # 10 / sqrt(600)

# x = 1..4, y = [2, 9, 5, 4]: centred x = [-1.5, -.5, .5, 1.5], centred y = [-3, 4, 0, -1];
# sum(dx*dy) = 1, sum(dx^2) = 5, sum(dy^2) = 26 -> r = 1/sqrt(130).
# ranks(y) = [1, 4, 3, 2], d = [0, -2, 0, 2], sum(d^2) = 8 -> rho = 1 - 6*8 / (4*(16-1)) = 0.2.
X, Y = [1.0, 2.0, 3.0, 4.0], [2.0, 9.0, 5.0, 4.0]


def test_accuracy_and_binary_f1_mrpc_qqp():
    for task in ("mrpc", "qqp"):
        out = compute_glue_metrics(task, PREDS, LABELS)
        assert list(out) == ["accuracy", "f1"]
        assert out["accuracy"] == pytest.approx(ACC) and out["f1"] == pytest.approx(F1)


def test_f1_is_for_class_one_only():
    # swapping the classes changes F1 (class 1 is now the old class 0: TP=3, FP=1, FN=2 -> 6/9)
    flipped = compute_glue_metrics("mrpc", [1 - p for p in PREDS], [1 - y for y in LABELS])
    assert flipped["f1"] == pytest.approx(6 / 9)


def test_matthews_correlation_cola():
    out = compute_glue_metrics("cola", PREDS, LABELS)
    assert out == {"matthews_correlation": pytest.approx(MCC)}
    assert isinstance(out["matthews_correlation"], float)
    # a constant predictor has MCC 0 (sklearn's convention, as evaluate reports it)
    assert compute_glue_metrics("cola", [1] * 10, LABELS)["matthews_correlation"] == 0.0


def test_pearson_spearman_stsb():
    out = compute_glue_metrics("stsb", X, Y)
    assert list(out) == ["pearson", "spearmanr"]
    assert out["pearson"] == pytest.approx(1 / math.sqrt(130), rel=1e-6)
    assert out["spearmanr"] == pytest.approx(0.2, rel=1e-6)
    assert all(type(v) is float for v in out.values())


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli", "mnli"])
def test_accuracy_tasks(task):
    assert compute_glue_metrics(task, PREDS, LABELS) == {"accuracy": pytest.approx(ACC)}


def test_multiclass_accuracy_mnli():
    assert compute_glue_metrics("mnli", np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))["accuracy"] == 0.75


def test_every_registered_task_has_metrics():
    for name, spec in GLUE_TASKS.items():
        preds, refs = (X, Y) if spec.is_regression else (PREDS, LABELS)
        assert list(compute_glue_metrics(name, preds, refs)) == list(spec.metric_names)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        compute_glue_metrics("sst2", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="not logits"):
        compute_glue_metrics("sst2", np.zeros((3, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match="class ids"):
        compute_glue_metrics("sst2", [0.3, 0.9], [0, 1])
    with pytest.raises(ValueError, match="unknown task"):
        compute_glue_metrics("squad", [0], [0])


def test_custom_task_metrics():
    spec = TaskSpec.custom("toxic", "text", num_labels=2, metric_names=("f1", "matthews_correlation"))
    out = compute_glue_metrics(spec, PREDS, LABELS)
    assert out == {"f1": pytest.approx(F1), "matthews_correlation": pytest.approx(MCC)}


def test_trainer_compute_metrics_classification():
    # rows argmax to PREDS; a tuple (logits, hidden states) as some models return it
    logits = np.array([[0.1, 0.9] if p else [2.0, -1.0] for p in PREDS], dtype=np.float32)
    fn = glue_compute_metrics("mrpc")
    out = fn(EvalPrediction(predictions=(logits, np.zeros((10, 4))), label_ids=np.array(LABELS)))
    assert out["accuracy"] == pytest.approx(ACC) and out["f1"] == pytest.approx(F1)
    assert out["combined_score"] == pytest.approx((ACC + F1) / 2)
    single = glue_compute_metrics("sst2")(EvalPrediction(predictions=logits, label_ids=np.array(LABELS)))
    assert single == {"accuracy": pytest.approx(ACC)}  # one metric: no combined_score


def test_trainer_compute_metrics_regression():
    logits = np.array(X, dtype=np.float32)[:, None]  # a regression head outputs (N, 1)
    out = glue_compute_metrics("stsb")(EvalPrediction(predictions=logits, label_ids=np.array(Y)))
    assert out["pearson"] == pytest.approx(1 / math.sqrt(130), rel=1e-6)
    assert out["combined_score"] == pytest.approx((1 / math.sqrt(130) + 0.2) / 2, rel=1e-6)
    assert logits_to_predictions("stsb", logits).shape == (4,)


def test_load_metric_offline_env_skips_evaluate(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "evaluate", None)  # importing it would fail: it must not be touched
    metric = load_metric("cola")
    assert metric.source == "offline"
    assert metric.compute(predictions=PREDS, references=LABELS) == {"matthews_correlation": pytest.approx(MCC)}


def test_load_metric_falls_back_when_evaluate_fails(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=unreachable))
    assert load_metric("rte").source == "offline"


def test_load_metric_uses_evaluate_when_it_loads(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    class FakeModule:
        def compute(self, predictions, references):
            return {"accuracy": np.float64(0.5)}

    def load(path, config):
        calls.append((path, config))
        return FakeModule()

    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=load))
    metric = load_metric("rte")
    assert calls == [("glue", "rte")] and metric.source == "evaluate"
    assert metric(predictions=[0], references=[1]) == {"accuracy": 0.5}
    # custom tasks are not evaluate glue configs: always offline
    assert load_metric(TaskSpec.custom("x", "text", num_labels=2)).source == "offline"
    assert isinstance(metric, GlueMetric)
