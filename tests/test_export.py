"""Stock export: a homogeneous pruned model saved as its stock architecture loads with plain from_pretrained (no
trust_remote_code, no per_layer_config, no custom code) to bitwise-identical outputs; shapes a family's stock config
cannot express are refused before anything is written, with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.cli import main

#: families whose configs carry head_dim take any head count; BERT-style ones (head size = hidden / heads) only FFN
HEADS_AND_FFN = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
FFN_ONLY = ["bert", "roberta", "electra", "distilbert", "vit"]


def _uniform(name: str, heads: bool):
    model = BY_NAME[name].model()
    budget = {"heads_keep": 0.5, "neurons_keep": 0.5} if heads else {"neurons_keep": 0.5}
    hp.prune(model, None, hp.PruningConfig(importance="magnitude", allocation="uniform", round_to=8, **budget))
    return model


@pytest.mark.parametrize("name", HEADS_AND_FFN + FFN_ONLY)
def test_stock_export_loads_with_plain_from_pretrained_to_identical_outputs(name, tmp_path):
    tiny = BY_NAME[name]
    model = _uniform(name, heads=name in HEADS_AND_FFN)
    folder = hp.save_stock(model, tmp_path / "stock")
    files = {p.name for p in folder.iterdir()} - {"generation_config.json"}
    assert files == {"config.json", "model.safetensors", "prune_plan.json"}
    config = json.loads((folder / "config.json").read_text())
    assert "per_layer_config" not in config and "auto_map" not in config and "hf_prune" not in config
    assert config["architectures"] == [tiny.model_class.__name__]
    stock = tiny.auto_class.from_pretrained(folder).eval()  # no trust_remote_code
    assert type(stock) is tiny.model_class
    x = inputs_only(tiny.batch())
    with torch.no_grad():
        assert torch.equal(output_tensor(stock(**x)), output_tensor(model(**x)))
    again = hp.load_pruned(folder)  # hf_prune loads it too, with the plan as provenance
    assert again.prune_plan.meta["format"] == "stock" and again.prune_plan.heads == model.prune_plan.heads
    with torch.no_grad():
        assert torch.equal(output_tensor(again(**x)), output_tensor(model(**x)))


def test_stock_export_of_a_decoder_generates_like_the_pruned_model(tmp_path):
    model = _uniform("llama", heads=True)
    stock = BY_NAME["llama"].auto_class.from_pretrained(hp.save_stock(model, tmp_path / "s")).eval()
    ids = BY_NAME["llama"].batch(batch_size=1, seq_len=5, labels=False)["input_ids"]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(stock.generate(ids, **kw), model.generate(ids, **kw))


def test_uneven_layers_are_refused_with_the_layers_that_differ(tmp_path):
    from helpers import random_plan

    model = BY_NAME["llama"].model()
    hp.apply_plan_(model, random_plan(model, seed=3))
    with pytest.raises(hp.NotStockExpressible, match="not all the same shape.*layer 1.*allocation='uniform'"):
        hp.save_stock(model, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_fewer_heads_in_a_bert_config_are_refused_with_the_reason(tmp_path):
    model = _uniform("bert", heads=True)
    with pytest.raises(hp.NotStockExpressible, match="derives the head size as hidden_size / num_attention_heads"):
        hp.save_stock(model, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())


def test_cli_exports_a_saved_checkpoint(tmp_path, capsys):
    model = _uniform("qwen2", heads=True)
    model.save_pretrained(tmp_path / "pruned")
    assert main(["export", str(tmp_path / "pruned"), "--output_dir", str(tmp_path / "stock")]) == 0
    assert "no trust_remote_code" in capsys.readouterr().out
    assert "trust_remote_code" not in (tmp_path / "stock" / "README.md").read_text()
    stock = BY_NAME["qwen2"].auto_class.from_pretrained(tmp_path / "stock").eval()
    x = inputs_only(BY_NAME["qwen2"].batch())
    with torch.no_grad():
        assert torch.equal(output_tensor(stock(**x)), output_tensor(model(**x)))
    uneven = BY_NAME["bert"].model()
    from helpers import random_plan

    hp.apply_plan_(uneven, random_plan(uneven, seed=1))
    uneven.save_pretrained(tmp_path / "uneven")
    assert main(["export", str(tmp_path / "uneven"), "--output_dir", str(tmp_path / "x")]) == 2
    assert "not all the same shape" in capsys.readouterr().err


def test_the_card_of_a_stock_export_says_how_to_load_it_without_custom_code(tmp_path):
    model = _uniform("llama", heads=True)
    dense = BY_NAME["llama"].model()
    folder = hp.save_stock(model, tmp_path / "stock")
    text = hp.write_model_card(folder, repo_id="me/tiny-stock").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-stock")' in text and "trust_remote_code" not in text
    assert f"parameters kept {hp.count_params(model):,}/{hp.count_params(dense):,}" in text
    assert "| 0 | 2/4 | 1/2 | 24/48 |" in text  # kept / dense per layer, from the plan's dense sizes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flops_keep": 0.5, "deployable": True}, "set allocation='uniform'"),
        ({"method": "retraining_free", "flops_keep": 0.5, "allocation": "uniform", "deployable": True},
         "sizes each layer on its own"),
        ({"neurons_keep": 0.5, "allocation": "uniform", "allow_empty_layers": True, "deployable": True},
         "drop allow_empty_layers"),
    ],
)
def test_deployable_settings_that_cannot_give_one_shape_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hp.PruningConfig(**kwargs)
    hp.PruningConfig(layers_keep=2, deployable=True)  # depth alone is always one shape
    hp.PruningConfig(method="retraining_free", layers_keep=2, deployable=True)


def test_deployable_bert_with_fewer_heads_fails_right_after_the_cut():
    model = BY_NAME["bert"].model()
    cfg = hp.PruningConfig(importance="magnitude", heads_keep=0.5, allocation="uniform", deployable=True)
    with pytest.raises(hp.NotStockExpressible, match="derives the head size"):
        hp.prune(model, None, cfg)


def test_deployable_trainer_saves_the_stock_architecture(tmp_path):
    import datasets
    import transformers as T

    tiny = BY_NAME["llama"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (16, 8), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 16, "labels": ids})
    args = T.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                               report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    cfg = hp.PruningConfig(layers_keep=2, heads_keep=0.5, neurons_keep=0.5, allocation="uniform", deployable=True,
                           progress=False)
    trainer = hp.PruningTrainer(model=tiny.model(), args=args, train_dataset=data, pruning_config=cfg)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "hf_prune" not in config and config["num_hidden_layers"] == 2 and config["num_attention_heads"] == 2
    stock = tiny.auto_class.from_pretrained(tmp_path / "final").eval()
    x = inputs_only(tiny.batch())
    with torch.no_grad():
        assert torch.equal(stock(**x).logits, trainer.model.eval()(**x).logits)


def test_deployable_trainer_refuses_to_push_training_checkpoints(tmp_path):
    import transformers as T

    args = T.TrainingArguments(output_dir=str(tmp_path / "out"), push_to_hub=True, hub_model_id="me/x",
                               report_to=[], use_cpu=True)
    cfg = hp.PruningConfig(layers_keep=2, deployable=True, progress=False)
    with pytest.raises(ValueError, match="push that folder with hf_prune.push_pruned"):
        hp.PruningTrainer(model=BY_NAME["llama"].model(), args=args, train_dataset=[], pruning_config=cfg)
