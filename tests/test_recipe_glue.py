"""The GLUE recipe: configs parse, bad input fails early with a clear error, and the whole recipe runs end to end
on a tiny BERT and tiny real SST-2 / STS-B samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

import hf_prune as hp
from hf_prune.recipes import ConfigError, run_recipe
from hf_prune.recipes.common import evaluate
from hf_prune.recipes.glue import main, parse_args
from hf_prune.resources import embedded_model_path, read_tsv, sst2_sample

ROOT = Path(__file__).resolve().parents[1]
GLUE_CONFIGS = sorted((ROOT / "recipes" / "glue").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT with MiniLM's tokenizer (so real text tokenizes), saved like a Hub model."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).bert.save_pretrained(path)  # no task head, like a pretrained encoder
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """Tiny SST-2 (from hf_prune's embedded real dev sample) and STS-B (real rows when ../shared is present)."""
    root = tmp_path_factory.mktemp("glue")
    texts, labels = sst2_sample()
    (root / "sst2").mkdir()
    rows = [f"{t}\t{y}" for t, y in zip(texts, labels)]
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:160]) + "\n")
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[160:224]) + "\n")
    (root / "stsb").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    shared = ROOT.parent / "shared" / "data" / "glue" / "stsb"
    for split, n in (("train", 96), ("dev", 48)):
        if (shared / f"{split}.tsv").is_file():
            body = ["\t".join(r) for r in read_tsv(shared / f"{split}.tsv")[:n]]
        else:  # synthetic pairs: score = 5 when the sentences match
            body = [f"{i}\tg\tf\t2020\t{i}\ts\ts\t{texts[i]}\t{texts[i if i % 2 else i + 1]}\t{5.0 if i % 2 else 1.0}"
                    for i in range(n)]
        (root / "stsb" / f"{split}.tsv").write_text(header + "\n" + "\n".join(body) + "\n")
    return root


def _flags(model: Path, data: Path, out: Path, **extra) -> list[str]:
    args = {
        "model_name_or_path": model, "data_dir": data, "output_dir": out, "max_seq_length": 32,
        "dense_max_steps": 6, "dense_learning_rate": 1e-3, "max_steps": 4, "learning_rate": 5e-4,
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "calibration_samples": 64,
        "bench_batch_sizes": [2], "bench_repeats": 1, "report_to": "none", "save_strategy": "no",
        "logging_steps": 50, "seed": 0,
    } | extra
    flags = []
    for k, v in args.items():
        flags += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    return flags


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("config", GLUE_CONFIGS, ids=lambda p: p.stem)
def test_every_glue_config_parses(config):
    model, data, prune, rec, dense, bench, serve, train = parse_args([str(config)])
    task = data.task()
    assert task.name == config.stem
    for budget in prune.budgets():
        cfg = prune.pruning_config(budget, seed=train.seed)
        assert 0 < cfg.flops_keep <= 1
    assert train.learning_rate < dense.dense_learning_rate or dense.dense_train == "no" or task.name == "wnli"
    assert len(GLUE_CONFIGS) == 9


def test_flags_override_config():
    *_, prune, rec, _, _, _, train = parse_args([str(ROOT / "recipes/glue/sst2.yaml"), "--flops_keep", "0.6", "0.4",
                                              "--recovery", "lora", "--learning_rate", "1e-4"])
    assert prune.budgets() == [{"flops_keep": 0.6}, {"flops_keep": 0.4}]
    assert rec.recovery == "lora" and train.learning_rate == 1e-4
    *_, prune, _, _, _, _, train = parse_args([str(ROOT / "recipes/glue/sst2.yaml"), "--prune_method", "retraining_free",
                                            "--tuning_fit", "scales"])
    cfg = prune.pruning_config(prune.budgets()[0], seed=train.seed)
    assert cfg.method == "retraining_free" and cfg.tuning_fit == "scales"


def test_a_depth_budget_goes_with_every_flops_budget_of_a_recipe():
    from hf_prune.recipes.common import run_name

    *_, prune, _, _, _, _, train = parse_args([str(ROOT / "recipes/glue/sst2.yaml"), "--flops_keep", "0.5", "0.3",
                                            "--layers_keep", "4"])
    budgets = prune.budgets()
    assert budgets == [{"flops_keep": 0.5, "layers_keep": 4}, {"flops_keep": 0.3, "layers_keep": 4}]
    assert [run_name(b) for b in budgets] == ["flops50_layers4", "flops30_layers4"]
    cfg = prune.pruning_config(budgets[1], seed=train.seed)
    assert cfg.layers_keep == 4 and cfg.flops_keep == 0.3
    *_, prune, _, _, _, _, _ = parse_args([str(ROOT / "recipes/glue/sst2.yaml"), "--flops_keep", "0.5",
                                        "--depth_search", "true"])
    assert prune.pruning_config(prune.budgets()[0], seed=0).depth_search
    assert run_name({"layers_keep": 0.5}) == "layers50pct"


def test_unknown_config_key_lists_valid_keys(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("recipe: glue\ntask_name: sst2\nflops_kep: 0.5\n")
    with pytest.raises(ConfigError, match=r"flops_kep \(did you mean flops_keep") as e:
        parse_args([str(cfg)])
    assert "Valid keys:" in str(e.value) and "learning_rate" in str(e.value)


def test_unknown_flag_is_rejected():
    with pytest.raises(ConfigError, match="no_such_flag"):
        parse_args([str(ROOT / "recipes/glue/sst2.yaml"), "--no_such_flag", "1"])


def test_config_for_another_recipe_and_missing_recipe_key(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("recipe: image_classification\n")
    with pytest.raises(ConfigError, match="image_classification"):
        parse_args([str(cfg)])
    cfg.write_text("task_name: sst2\n")
    with pytest.raises(ConfigError, match="no 'recipe:' key"):
        run_recipe(str(cfg))


def test_bad_values_fail_before_work(tiny_bert, glue_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'sst3'"):
        main(_flags(tiny_bert, glue_dir, tmp_path, task_name="sst3"))
    with pytest.raises(ConfigError, match="flops_keep=1.5 is outside"):
        main(_flags(tiny_bert, glue_dir, tmp_path, flops_keep=[1.5]))
    with pytest.raises(ConfigError, match="recovery must be"):
        main(_flags(tiny_bert, glue_dir, tmp_path, recovery="partial"))
    assert not (tmp_path / "dense").exists()


def test_missing_split_and_column_errors(tiny_bert, glue_dir, tmp_path):
    bad = tmp_path / "data" / "sst2"
    bad.mkdir(parents=True)
    (bad / "train.tsv").write_text((glue_dir / "sst2" / "train.tsv").read_text())
    with pytest.raises(Exception, match="dev|validation"):
        main(_flags(tiny_bert, tmp_path / "data", tmp_path / "out"))
    (bad / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(Exception, match="sentence"):
        main(_flags(tiny_bert, tmp_path / "data", tmp_path / "out"))


def test_push_without_token_fails_before_work(tiny_bert, glue_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None, raising=False)
    with pytest.raises(Exception, match="token"):
        main(_flags(tiny_bert, glue_dir, tmp_path / "out", push_to_hub="true", hub_model_id="me/tiny-pruned"))
    assert not (tmp_path / "out" / "dense").exists()


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("fmt, match", [("gguf", "llama.cpp has no architecture.*'bert'"),
                                         ("vllm", "DeciLM runs Llama-shaped decoders.*not bert")])
def test_an_export_format_the_family_cannot_take_fails_before_the_dense_training(tiny_bert, glue_dir, tmp_path,
                                                                                  fmt, match):
    with pytest.raises(ValueError, match=match):
        main(_flags(tiny_bert, glue_dir, tmp_path / "out", export_formats=[fmt]))
    assert not (tmp_path / "out" / "dense").exists()  # refused before the dense fine-tune, the first long step


def test_sst2_recipe_end_to_end(tiny_bert, glue_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = main(_flags(tiny_bert, glue_dir, out, flops_keep=[0.6, 0.4]))
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| recovered |" in printed

    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "sst2" and len(saved["runs"]) == 2
    for name in ("results.md", "metric_vs_flops.png", "layers_flops60.png", "layers_flops40.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| recovered |" in (out / "results.md").read_text()

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    dense_flops = saved["dense"]["layer_flops"]
    for run, keep in zip(saved["runs"], (0.6, 0.4)):
        assert run["layer_flops"] <= keep * dense_flops  # the budget is never exceeded
        assert run["metrics_recovered"] is not None and "accuracy" in run["metrics_recovered"]
        ckpt = out / run["name"]
        assert (ckpt / "README.md").is_file() and (ckpt / "prune_plan.json").is_file()
        model = hp.load_pruned(ckpt, AutoModelForSequenceClassification)
        assert hp.count_flops(model, 128)["total"] == run["layer_flops"]
        # the saved checkpoint scores exactly what the recipe reported for its final model
        from transformers import DataCollatorWithPadding, TrainingArguments

        from hf_prune.recipes.metrics import glue_compute_metrics
        from hf_prune.recipes.tasks import load_task_data

        dev = load_task_data("sst2", glue_dir, splits=["validation"])["validation"]
        dev = dev.map(lambda b: tok(b["sentence"], truncation=True, max_length=32), batched=True,
                      remove_columns=["sentence", "idx"])
        args = TrainingArguments(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=32, report_to=[])
        again = evaluate(model, args, {"validation": dev}, glue_compute_metrics("sst2"), DataCollatorWithPadding(tok))
        assert again["accuracy"] == pytest.approx(run["metrics_recovered"]["accuracy"])
        assert len(run["latency"]) == 1 and run["latency"][0]["pruned_ms"] > 0

    # a second run reuses the cached dense fine-tune and gets the same dense scores
    again = main(_flags(tiny_bert, glue_dir, out, flops_keep=[0.5], recovery="none", bench_latency="false"))
    assert "reusing the fine-tuned model" in capsys.readouterr().out
    assert again["dense"]["metrics"] == results["dense"]["metrics"]
    assert again["runs"][0]["metrics_recovered"] is None


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """6 query heads sharing 2 KV heads: query-head pruning has partial groups to choose."""
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), heads=6, kv=2)


def test_a_decoder_llm_as_sequence_classifier_with_query_head_pruning(tiny_llama, glue_dir, tmp_path):
    config = ROOT / "recipes" / "glue" / "decoder" / "sst2.yaml"
    *_, prune, _, dense, _, _, _ = parse_args([str(config)])  # the shipped decoder config parses
    assert prune.head_unit == "query_head" and dense.dense_train == "auto"
    out = tmp_path / "decoder"
    argv = _flags(tiny_llama, glue_dir, out, flops_keep=[0.6], head_unit="query_head", importance="taylor",
                  bench_latency="false")
    i = argv.index("--calibration_samples")  # the old name: the config sets max_calibration_samples
    argv[i : i + 2] = ["--max_calibration_samples", "64"]
    results = main([str(config), *argv])
    run = results["runs"][0]
    assert run["layer_flops"] <= 0.6 * results["dense"]["layer_flops"] and "accuracy" in run["metrics_recovered"]
    model = hp.load_pruned(out / run["name"], AutoModelForSequenceClassification)
    assert type(model).__name__ == "PrunedLlamaForSequenceClassification"
    assert model.prune_plan.meta["budget"] == {"flops_keep": 0.6} and model.prune_plan.meta["head_unit"] == "query_head"


def test_stsb_regression_with_lora_recovery(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "stsb"
    results = main(_flags(tiny_bert, glue_dir, out, task_name="stsb", recovery="lora", flops_keep=[0.5],
                          importance="taylor", bench_latency="false", freeze=["embeddings"]))
    run = results["runs"][0]
    assert set(run["metrics_recovered"]) >= {"pearson", "spearmanr"}
    model = hp.load_pruned(out / run["name"])
    assert model.config.num_labels == 1
    assert not any("lora" in n for n, _ in model.named_parameters())  # LoRA merged into the saved weights


def test_recipe_runs_under_accelerate_launch_two_processes(tiny_bert, glue_dir, tmp_path):
    """`accelerate launch recipes/run_glue.py ...` with 2 CPU processes (gloo): one plan, one set of reports."""
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / "ddp"
    flags = _flags(tiny_bert, glue_dir, out, flops_keep=[0.5], bench_latency="false", use_cpu="true")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(launcher + [str(ROOT / "recipes" / "run_glue.py"), *flags], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["metrics_recovered"] is not None
    model = hp.load_pruned(out / "flops50")
    assert hp.count_flops(model, 128)["total"] <= 0.5 * saved["dense"]["layer_flops"]
    assert r.stdout.count("| recovered |") == 1  # the table is written by the main process only
