"""The embeddings recipe end to end on a tiny sentence-transformers model: prune on unlabeled text, distil the
embeddings, STS and retrieval metrics, a sentence-transformers folder with its card."""

from __future__ import annotations

import json

import pytest
import yaml
from sentence_transformers import SentenceTransformer
from test_embeddings import _tiny_st

from hf_prune.recipes import ConfigError, run_recipe
from hf_prune.recipes.embeddings import main

STS = [("A man is playing a guitar.", "A man plays the guitar.", 4.8), ("A cat sleeps.", "A dog runs.", 0.4),
       ("Two kids are swimming.", "Children swim in a pool.", 3.9), ("The sun is hot.", "Stocks fell today.", 0.0),
       ("She is cooking rice.", "A woman cooks rice.", 4.6), ("A bird flies.", "A plane is landing.", 1.2)] * 3
QNLI = [("Who wrote the book?", "The book was written by Ann Lee.", "entailment"),
        ("When did the war end?", "The war ended in 1945.", "entailment"),
        ("Where is the river?", "Many fish live in lakes.", "not_entailment"),
        ("What colour is the sky?", "The sky is blue on clear days.", "entailment"),
        ("How tall is the tower?", "The tower is 300 metres tall.", "entailment")]


@pytest.fixture
def eval_dir(tmp_path):
    (tmp_path / "glue" / "stsb").mkdir(parents=True)
    (tmp_path / "glue" / "qnli").mkdir(parents=True)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "".join(f"{i}\tg\tf\ty\to\ts\ts\t{a}\t{b}\t{s}\n" for i, (a, b, s) in enumerate(STS))
    (tmp_path / "glue" / "stsb" / "dev.tsv").write_text(head + rows)
    rows = "".join(f"{i}\t{q}\t{s}\t{y}\n" for i, (q, s, y) in enumerate(QNLI))
    (tmp_path / "glue" / "qnli" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n" + rows)
    return tmp_path / "glue"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-st")
    _tiny_st(tmp_path_factory).save(str(folder))
    return folder


def _flags(model, eval_dir, out, **extra):
    flags = {"model_name_or_path": str(model), "eval_data_dir": str(eval_dir), "output_dir": str(out),
             "max_seq_length": 32, "max_train_sentences": 256, "max_calibration_samples": 64, "tuning_samples": 48,
             "selection_samples": 16, "max_steps": 4, "per_device_train_batch_size": 16, "logging_steps": 2,
             "bench_latency": "false", "use_cpu": "true", **extra}
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("recovery", ["full", "lora"])
def test_recipe_prunes_distils_evaluates_and_writes_a_sentence_transformers_folder(tiny_folder, eval_dir, tmp_path,
                                                                                   recovery):
    out = tmp_path / "out"
    results = run_recipe("recipes/embeddings/minilm.yaml", _flags(tiny_folder, eval_dir, out, obs_reselection="false",
                                                                  recovery=recovery))
    run = results["runs"][0]
    for metrics in (results["dense"]["metrics"], run["metrics_pruned"], run["metrics_recovered"]):
        assert set(metrics) == {"sts_spearman", "mrr@10", "recall@10"}
        assert -100 <= metrics["sts_spearman"] <= 100 and 0 <= metrics["recall@10"] <= 100
    assert run["layer_flops"] <= 0.5 * results["dense"]["layer_flops"]
    assert results["args"]["eval_data_dir"] == str(eval_dir)  # the recipe's own arguments are recorded
    folder = out / run["name"]
    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert type(model[0].model).__name__ == "PrunedBertModel"
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "SentenceTransformer(" in card and "trust_remote_code=True" in card
    assert json.loads((out / "results.json").read_text())["table"][0]["model"] == "dense"


def test_recipe_refuses_what_it_cannot_do_before_any_work(tiny_folder, eval_dir, tmp_path):
    with pytest.raises(ConfigError, match="export_formats"):
        main(["recipes/embeddings/minilm.yaml", *_flags(tiny_folder, eval_dir, tmp_path, export_formats="onnx")])
    with pytest.raises(ConfigError, match="distill_alpha to 1.0"):
        main(["recipes/embeddings/minilm.yaml", *_flags(tiny_folder, eval_dir, tmp_path, distill_alpha="0.5")])
    with pytest.raises(ConfigError, match="has no stsb/dev.tsv"):
        main(["recipes/embeddings/minilm.yaml", *_flags(tiny_folder, tmp_path, tmp_path)])
    assert not (tmp_path / "results.json").exists()
