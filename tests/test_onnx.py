"""ONNX export checked in onnxruntime: every encoder and vision family of the tiny table, dense, uniform and uneven
cuts (a layer left without heads included), gives PyTorch's outputs within 1e-4 at other batch and sequence sizes
than it was traced with; int8 quantization writes a second graph that runs; bad input writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_plan
from serving import require
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.formats import save_onnx
from hf_prune.formats.onnx import example_inputs
from hf_prune.formats.runtimes import ort_run, ort_session

ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert", "vit", "deit"]


def _cut(model, how: str):
    if how == "uniform":
        hp.prune(model, None, hp.PruningConfig(importance="magnitude", allocation="uniform", neurons_keep=0.5))
    elif how == "uneven":
        hp.apply_plan_(model, random_plan(model, seed=2, empty_layer=1))
    elif how == "hidden":  # uneven heads and neurons and a narrower residual stream
        hp.apply_plan_(model, random_plan(model, seed=2, hidden=20))
    return model


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("cut", ["dense", "uniform", "uneven", "hidden"])
def test_onnxruntime_gives_pytorch_outputs_at_any_batch_and_length(name, cut, tmp_path):
    require("onnxruntime")
    model = _cut(BY_NAME[name].model(), cut)
    folder = save_onnx(model, None, tmp_path / "onnx")
    assert {"model.onnx", "config.json"} <= {p.name for p in folder.iterdir()}
    session = ort_session(folder / "model.onnx")
    for batch, seq in ((1, 5), (4, 31)):
        x = example_inputs(model, batch_size=batch, seq_len=seq)
        with torch.no_grad():
            want = output_tensor(model(**x)).numpy()
        np.testing.assert_allclose(ort_run(session, x)[0], want, atol=1e-4)


def test_the_tiny_table_batch_runs_too_and_optimized_and_int8_are_more_graphs(tmp_path):
    require("onnxruntime")
    tiny = BY_NAME["bert"]
    model = _cut(tiny.model(), "uneven")
    folder = save_onnx(model, None, tmp_path / "onnx", quantize="int8", optimize=True)
    x = inputs_only(tiny.batch())
    with torch.no_grad():
        want = output_tensor(model(**x)).numpy()
    np.testing.assert_allclose(ort_run(ort_session(folder / "model.onnx"), x)[0], want, atol=1e-4)
    np.testing.assert_allclose(ort_run(ort_session(folder / "model_optimized.onnx", optimize=False), x)[0], want,
                               atol=1e-4)
    int8 = ort_run(ort_session(folder / "model_int8.onnx"), x)[0]
    assert int8.shape == want.shape and np.isfinite(int8).all()
    assert (folder / "model_int8.onnx").stat().st_size < (folder / "model.onnx").stat().st_size


def test_bad_input_writes_nothing(tmp_path):
    from serving import tiny_lm, tiny_tokenizer

    with pytest.raises(ValueError, match="encoders and vision models.*format='gguf'"):
        save_onnx(tiny_lm("llama", len(tiny_tokenizer())), None, tmp_path / "a")
    with pytest.raises(ValueError, match="quantize must be 'int8'"):
        save_onnx(BY_NAME["bert"].model(), None, tmp_path / "b", quantize="int4")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_onnx(BY_NAME["bert"].model(), None, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"] and [p.name for p in (tmp_path / "c").iterdir()] == [
        "keep.txt"]


def test_a_forward_torch_cannot_trace_is_refused_with_the_reason(tmp_path):
    require("onnxruntime")
    model = BY_NAME["bert"].model()
    layer = model.bert.encoder.layer[0].intermediate
    forward = layer.forward

    def untraceable(hidden_states):  # data-dependent Python control flow: torch.export cannot follow it
        if hidden_states.sum().item() > 0:
            return forward(hidden_states)
        return forward(-hidden_states)

    layer.forward = untraceable
    with pytest.raises(ValueError, match="torch could not export BertForSequenceClassification to ONNX"):
        save_onnx(model, None, tmp_path / "onnx")
    assert not list(tmp_path.iterdir())


def test_exports_beside_a_checkpoint_are_timed_against_the_dense_models_export(tmp_path):
    """A recipe's ``export_formats`` with the dense model: the dense model is exported the same way and both are
    timed in onnxruntime; the card shows those rows."""
    require("onnxruntime")
    from hf_prune.formats.cards import serving_section
    from hf_prune.formats.settings import ServeArguments, export_beside

    dense = BY_NAME["bert"].model().eval()
    model = _cut(BY_NAME["bert"].model().eval(), "uneven")
    written, speed = export_beside(model, None, tmp_path, ServeArguments(export_formats=["onnx"]), dense=dense)
    assert written == [tmp_path / "onnx"] and (tmp_path / "onnx" / "model.onnx").is_file()
    assert [r["metric"] for r in speed] == ["latency ms (1x64 inputs)"]  # the tiny BERT's 64 positions
    assert speed[0]["dense"] > 0 and speed[0]["pruned"] > 0
    assert speed[0]["speedup"] == pytest.approx(speed[0]["dense"] / speed[0]["pruned"])
    text = "\n".join(serving_section(tmp_path, "me/x", speed))
    assert f"| onnx | onnxruntime | latency ms (1x64 inputs) | {speed[0]['dense']:.1f} |" in text
    assert export_beside(model, None, tmp_path, ServeArguments(export_formats=["onnx"]))[1] == []  # no dense: no rows
