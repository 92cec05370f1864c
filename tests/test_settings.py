"""Every PruningConfig field is reachable, under its own name, from a recipe YAML key and a CLI flag; bad values
are refused there with PruningConfig's own message; old recipe keys still work, with a warning."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import hf_prune as hp
from hf_prune.budget import BUDGETS
from hf_prune.cli import main, parse_prune_args
from hf_prune.recipes import ConfigError
from hf_prune.recipes.glue import parse_args

ROOT = Path(__file__).resolve().parents[1]

#: a non-default value per PruningConfig field, and the other settings it needs
VALUES = {
    "method": ("retraining_free", {}),
    "importance": ("taylor", {}),
    "heads_keep": (0.5, {}),
    "neurons_keep": (0.25, {}),
    "flops_keep": (0.4, {}),
    "target_params": (1_000_000, {}),
    "latency_keep": (0.6, {"method": "retraining_free"}),
    "layers_keep": (0.5, {}),
    "layer_importance": ("skip_divergence", {"layers_keep": 0.5}),
    "hidden_keep": (0.75, {}),
    "hidden_importance": ("fisher", {"hidden_keep": 0.75}),
    "hidden_search": (True, {"flops_keep": 0.5}),
    "depth_search": (True, {"flops_keep": 0.5}),
    "seq_len": (64, {}),
    "latency_batch_size": (4, {"method": "retraining_free", "latency_keep": 0.6}),
    "rearrange": (False, {"method": "retraining_free"}),
    "rearrange_scope": ("model", {"method": "retraining_free"}),
    "mask_tuning": (False, {"method": "retraining_free"}),
    "tuning_fit": ("scales", {"method": "retraining_free"}),
    "obs_reselection": (True, {"method": "retraining_free"}),
    "tuning_samples": (64, {"method": "retraining_free"}),
    "select_stages": (False, {"method": "retraining_free"}),
    "selection_samples": (32, {"method": "retraining_free"}),
    "selection_metric": ("task_loss", {"method": "retraining_free"}),
    "allocation": ("uniform", {}),
    "round_to": (8, {}),
    "head_unit": ("query_head", {}),
    "allow_empty_layers": (True, {}),
    "deployable": (True, {"allocation": "uniform"}),
    "max_calibration_samples": (100, {}),
    "custom_budget": ({"flops_keep": 0.3}, {}),
    "seed": (7, {}),
    "offload": (True, {}),
    "progress": (False, {}),
}
FIELDS = [f.name for f in dataclasses.fields(hp.PruningConfig)]


def test_the_value_table_covers_every_field():
    assert sorted(VALUES) == sorted(FIELDS)
    for name, (value, _) in VALUES.items():
        assert value != getattr(hp.PruningConfig(flops_keep=0.5), name) or name == "flops_keep"


def _yaml(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check(cfg, name, value):
    if name == "custom_budget":  # a budget by kind name: the same budget as the field would set
        assert cfg.budget() == value
    else:
        assert getattr(cfg, name) == value


def _recipe_config(tmp_path, settings: dict):
    text = "recipe: glue\ntask_name: sst2\n" + "".join(f"{k}: {_yaml(v)}\n" for k, v in settings.items())
    path = tmp_path / "c.yaml"
    path.write_text(text)
    *_, prune, _, _, _, _, train = parse_args([str(path)])
    return prune.pruning_config(prune.budgets()[0], seed=train.seed)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_a_recipe_key(tmp_path, name):
    value, needs = VALUES[name]
    cfg = _recipe_config(tmp_path, {**needs, name: value})
    _check(cfg, name, value)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_a_cli_flag(name):
    value, needs = VALUES[name]
    argv = [a for k, v in {**needs, name: value}.items() for a in (f"--{k}", _yaml(v))]
    _, cfg = parse_prune_args(argv)
    _check(cfg, name, value)
    if name not in BUDGETS and name != "custom_budget" and not set(needs) & set(BUDGETS):
        assert cfg.flops_keep == 0.5  # the default budget when none is given


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"flops_keep": 1.5}, "outside (0, 1]"),
        ({"latency_keep": 0.5}, "latency_keep needs method='retraining_free'"),
        ({"round_to": 0}, "round_to must be >= 1"),
        ({"tuning_fit": "scales"}, "only apply to method='retraining_free'"),
        ({"method": "retraining_free", "latency_batch_size": 8}, "latency_batch_size only applies"),
        ({"method": "retraining_free", "importance": "taylor"}, "does not apply"),
        ({"importance": "nope"}, "unknown importance"),
        ({"method": "retraining_free", "select_stages": False, "selection_metric": "task_loss"},
         "selection_metric only applies"),
        ({"custom_budget": {"nope": 0.5}}, "unknown budget kinds"),
        ({"method": "retraining_free", "tuning_fit": "scales", "obs_reselection": True},
         "obs_reselection re-chooses units inside the weights fit"),
    ],
)
def test_bad_values_get_pruning_configs_message_from_recipe_and_cli(tmp_path, capsys, settings, message):
    with_budget = settings if set(settings) & set(BUDGETS) else {"flops_keep": 0.5, **settings}
    with pytest.raises(ValueError, match=re.escape(message)):
        hp.PruningConfig(**with_budget)
    with pytest.raises(ConfigError, match=re.escape(message)):
        _recipe_config(tmp_path, settings)
    argv = [a for k, v in settings.items() for a in (f"--{k}", _yaml(v))]
    assert main(["prune", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_deprecated_recipe_keys_still_work_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("recipe: glue\ntask_name: sst2\nprune_method: retraining_free\ncalibration_samples: 99\n"
                    "flops_seq_len: 32\n")
    with pytest.warns(FutureWarning, match="prune_method"):
        *_, prune, _, _, _, _, train = parse_args([str(path), "--flops_seq_len", "48"])
    cfg = prune.pruning_config(prune.budgets()[0], seed=train.seed)
    assert (cfg.method, cfg.max_calibration_samples, cfg.seq_len) == ("retraining_free", 99, 48)
    path.write_text("recipe: glue\ntask_name: sst2\nprune_method: one_shot\nmethod: one_shot\n")
    with pytest.raises(ConfigError, match="same setting"), pytest.warns(FutureWarning):
        parse_args([str(path)])


def test_mistyped_flag_names_the_closest_valid_flag(capsys):
    assert main(["prune", "--flops_kep", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--flops_kep (did you mean --flops_keep" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="did you mean --learning_rate"):
        parse_args([str(ROOT / "recipes/glue/sst2.yaml"), "--learning_rat", "1e-4"])


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-prune inspect: error: no checkpoint folder") and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        main(["inspect", str(tmp_path / "nope"), "--debug"])
    assert main(["run", str(ROOT / "recipes/glue/sst2.yaml"), "--data_dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1


def test_cli_prunes_to_a_latency_budget_with_retraining_free(tmp_path, capsys):
    """The real embedded MiniLM, a few sentences: --latency_keep reaches the retraining-free search."""
    out = tmp_path / "ckpt"
    code = main(["prune", "--method", "retraining_free", "--latency_keep", "0.6", "--samples", "32",
                 "--batch_size", "16", "--max_length", "16", "--seq_len", "16", "--tuning_samples", "16",
                 "--selection_samples", "16", "--bench", "false", "--progress", "false", "--output_dir", str(out)])
    assert code == 0 and "outputs identical = True" in capsys.readouterr().out
    plan = hp.load_plan(out)
    assert plan.meta["budget"] == {"latency_keep": 0.6} and "latency_table" in plan.meta
    assert "retraining_free" in plan.meta


def test_cli_writes_a_deployable_depth_pruned_minilm_that_plain_transformers_loads(tmp_path, capsys):
    """The real embedded MiniLM: 4 of 6 layers and half of every FFN, written as the stock BertModel."""
    import transformers as T

    out = tmp_path / "stock"
    code = main(["prune", "--layers_keep", "4", "--neurons_keep", "0.5", "--allocation", "uniform", "--deployable",
                 "true", "--samples", "32", "--batch_size", "16", "--max_length", "16", "--bench", "false",
                 "--progress", "false", "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "outputs identical = True" in text and "trust_remote_code" not in text.split("saved to")[1]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["intermediate_size"] == 768 and "hf_prune" not in config
    assert type(T.AutoModel.from_pretrained(out)).__name__ == "BertModel"


def test_invalid_hub_model_id_is_refused_before_any_work(capsys):
    assert main(["run", str(ROOT / "recipes/glue/sst2.yaml"), "--hub_model_id", "a/b/c"]) == 2
    err = capsys.readouterr().err
    assert "hub_model_id 'a/b/c' is not a valid Hub repo id" in err and err.count("\n") == 1


def test_main_job_runs_from_a_folder_with_nothing_beside_it(tmp_path, monkeypatch, capsys):
    """The README's main job, with tiny step counts, from a copy of recipes/ in an empty folder: the data comes
    from the package (data_dir: embedded), never from ../shared."""
    import shutil

    work = tmp_path / "clone"
    shutil.copytree(ROOT / "recipes", work / "recipes")
    monkeypatch.chdir(work)
    assert not (work.parent / "shared").exists()
    code = main(["run", "recipes/glue/sst2.yaml", "--dense_max_steps", "2", "--max_steps", "2",
                 "--max_calibration_samples", "48", "--tuning_samples", "16", "--selection_samples", "16",
                 "--max_eval_samples", "64", "--bench_latency", "false", "--progress", "false",
                 "--output_dir", str(work / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| recovered | flops30 |" in out and "4000 train" in out
    card = (work / "out" / "flops30" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "retraining_free" in hp.load_plan(work / "out" / "flops30").meta
