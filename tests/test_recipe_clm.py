"""The causal-LM recipe: the shipped config parses, bad input fails before any long step with a clear error,
and the whole recipe (prune → KD recovery on text → perplexity → save → card) runs end to end on a tiny Llama
with a real tokenizer and real text (the SST-2 sentences shipped in the package, or a folder of .txt files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_llama
from transformers import AutoTokenizer

import hf_prune as hp
from hf_prune.lm import perplexity
from hf_prune.recipes import ConfigError, run_recipe
from hf_prune.recipes.clm import main, parse_args
from hf_prune.resources import embedded_model_path, sst2_sample

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "clm" / "smollm2.yaml"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _flags(model: Path, out: Path, **extra) -> list[str]:
    args = {"model_name_or_path": model, "output_dir": out, "block_size": 32, "max_train_blocks": 24,
            "max_eval_blocks": 4, "max_calibration_samples": 8, "max_steps": 3, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4, "bench_latency": False, "logging_steps": 1, "warmup_steps": 0,
            **extra}
    return [str(CONFIG)] + [x for k, v in args.items() for x in (f"--{k}", *(map(str, v) if isinstance(v, list)
                                                                           else [str(v)]))]


def test_the_shipped_config_parses():
    model, data, prune, recovery, *_ = parse_args([str(CONFIG)])
    assert model.model_name_or_path == "smollm2" and data.data_dir == "embedded"
    assert prune.method == "retraining_free" and recovery.distill_alpha == 1.0


@pytest.mark.parametrize("method", ["one_shot", "retraining_free"])
def test_clm_recipe_runs_end_to_end_on_embedded_text(tiny_llama, tmp_path, method):
    extra = {"method": method, "flops_keep": [0.6], "head_unit": "query_head"} if method == "one_shot" else \
        {"flops_keep": [0.6], "tuning_samples": 4, "selection_samples": 4}
    if method == "one_shot":
        argv = _flags(tiny_llama, tmp_path, **extra)
        # the shipped config's retraining-free settings do not apply to one_shot: drop them from the config
        config = tmp_path / "one_shot.yaml"
        config.write_text("\n".join(line for line in CONFIG.read_text().splitlines()
                                    if not line.startswith(("tuning_samples", "selection_samples"))))
        argv[0] = str(config)
    else:
        argv = _flags(tiny_llama, tmp_path, **extra)
    results = main(argv)
    run = results["runs"][0]
    assert results["main_metric"] == "perplexity"
    assert set(run["metrics_pruned"]) == {"perplexity"} and run["metrics_recovered"]["perplexity"] > 1
    assert run["layer_flops"] <= 0.6 * results["dense"]["layer_flops"]
    folder = Path(run["checkpoint"])
    assert (folder / "README.md").is_file() and (tmp_path / "results.md").is_file()
    pruned = hp.load_pruned(folder).eval()
    if method == "one_shot":  # head_unit reached the allocation
        assert pruned.prune_plan.meta["head_unit"] == "query_head"
    # the reloaded checkpoint scores the recipe's held-out text as the recipe measured it
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [line.split("\t")[0] for line in
             (Path(hp.__file__).parent / "data" / "glue" / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    from hf_prune.lm import pack_text_blocks

    blocks = pack_text_blocks(tok, texts, block_size=32, batch_size=4, max_blocks=4)
    assert perplexity(pruned, blocks) == pytest.approx(run["metrics_recovered"]["perplexity"], rel=1e-4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"][0]["perplexity"] == pytest.approx(results["dense"]["metrics"]["perplexity"])


def test_clm_recipe_reads_a_folder_of_text_files_and_recovers_with_lora(tiny_llama, tmp_path):
    texts, _ = sst2_sample()
    data = tmp_path / "text"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(texts[:200]) + "\n")
    (data / "validation.txt").write_text("\n".join(texts[200:]) + "\n")
    results = run_recipe(str(CONFIG), _flags(tiny_llama, tmp_path / "out", data_dir=data, recovery="lora",
                                             flops_keep=[0.7], tuning_samples=4, selection_samples=4)[1:])
    assert results["task"] == "text" and results["runs"][0]["metrics_recovered"]["perplexity"] > 1


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"data_dir": ""}, "no text"),
        ({"dataset_name": "wikitext"}, "both data_dir"),
        ({"data_dir": "/nonexistent/folder"}, "not a folder"),
        ({"dense_train": "yes"}, "prunes the causal LM as it is"),
        ({"block_size": 1}, "block_size"),
    ],
)
def test_bad_clm_input_is_refused_before_any_work(tiny_llama, tmp_path, extra, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        main(_flags(tiny_llama, tmp_path, **extra))
    assert not any(p.name.startswith("flops") for p in tmp_path.iterdir())  # nothing half-written


def test_a_folder_without_a_validation_file_or_with_too_little_text_is_refused(tiny_llama, tmp_path):
    (tmp_path / "train.txt").write_text("some text\n")
    with pytest.raises(ConfigError, match="validation or dev"):
        main(_flags(tiny_llama, tmp_path / "out", data_dir=tmp_path))
    (tmp_path / "dev.txt").write_text("more text\n")
    with pytest.raises(ValueError, match="fewer than one block"):
        main(_flags(tiny_llama, tmp_path / "out", data_dir=tmp_path))


def test_text_blocks_start_with_the_special_tokens_the_tokenizer_puts_before_a_text():
    from hf_prune.lm import pack_text_blocks

    tok = AutoTokenizer.from_pretrained(embedded_model_path())  # BERT WordPiece: [CLS] before a text
    texts, _ = sst2_sample()
    blocks = pack_text_blocks(tok, texts, block_size=16, batch_size=4, max_blocks=6)
    ids = torch.cat([b["input_ids"] for b in blocks])  # (6, 16)
    assert ids.shape == (6, 16) and (ids[:, 0] == tok.cls_token_id).all()
    stream = tok("\n".join(texts), add_special_tokens=False)["input_ids"]
    assert ids[:, 1:].reshape(-1).tolist() == stream[: 6 * 15]  # the text itself, packed without gaps


def test_export_formats_write_a_gguf_beside_the_checkpoint_that_llama_cpp_runs(tmp_path):
    """``export_formats: [gguf]`` in a recipe: the pruned checkpoint folder also holds model-f32.gguf, which llama.cpp
    runs to the checkpoint's own logits, and the model card says how to run it and how fast it ran in llama.cpp
    against the dense model's GGUF (bench_latency)."""
    import numpy as np
    from serving import require, tiny_lm, tiny_tokenizer

    from hf_prune.formats.runtimes import llama_logits, load_llama

    require("llama_cpp")
    tok = tiny_tokenizer()
    tiny_lm("llama", len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    results = main(_flags(tmp_path / "base", tmp_path / "out", flops_keep=[0.6], tuning_samples=4,
                          selection_samples=4, export_formats=["gguf"], outtype="f32", bench_latency=True,
                          bench_batch_sizes=[1], bench_repeats=2))
    folder = Path(results["runs"][0]["checkpoint"])
    assert results["runs"][0]["exports"] == [str(folder / "model-f32.gguf")]
    card = (folder / "README.md").read_text()
    assert "llama-cli -m model-f32.gguf" in card
    speed = results["runs"][0]["runtime_speed"]
    assert [r["metric"].split()[0] for r in speed] == ["prompt", "decode"] and {r["format"] for r in speed} == {"gguf"}
    for r in speed:
        assert r["dense"] > 0 and r["pruned"] > 0 and r["speedup"] == pytest.approx(r["pruned"] / r["dense"])
        assert f"| gguf | {r['runtime']} | {r['metric']} | {r['dense']:.1f} | {r['pruned']:.1f} |" in card
    model = hp.load_pruned(folder).eval()
    ids = tok("the movie was great and the plot was fine")["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(load_llama(folder / "model-f32.gguf", n_ctx=64, exact=True), ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra, match", [({"export_formats": ["stock"]}, "deployable"),
                                          ({"export_formats": ["gguf"], "quantize": "int8"},
                                           "--quantize does not apply to gguf")])
def test_export_settings_that_cannot_apply_fail_before_the_run(tiny_llama, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        parse_args(_flags(tiny_llama, tmp_path, **extra))


MINITRON = ROOT / "recipes" / "clm" / "smollm2_minitron.yaml"


def test_the_minitron_recipe_cuts_the_hidden_width_to_a_parameter_count_then_distils(tiny_llama, tmp_path):
    _, _, prune, recovery, *_ = parse_args([str(MINITRON)])
    assert prune.hidden_search and prune.target_params and recovery.distill_alpha == 1.0
    from transformers import AutoModelForCausalLM

    target = int(0.9 * hp.count_params(AutoModelForCausalLM.from_pretrained(tiny_llama)))
    argv = _flags(tiny_llama, tmp_path, target_params=target)
    argv[0] = str(MINITRON)
    run = main(argv)["runs"][0]
    pruned = hp.load_pruned(run["checkpoint"]).eval()
    search = pruned.prune_plan.meta["hidden_search"]
    assert len(search["divergence"]) > 1 and hp.count_params(pruned) <= target
    assert pruned.get_input_embeddings().weight.shape[1] == search["chosen"]
    assert run["metrics_recovered"]["perplexity"] > 1
