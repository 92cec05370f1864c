"""The image-classification recipe: an end-to-end run on ~200 MNIST digits with a tiny ViT from config, the
shipped configs parse, and bad input fails with a ConfigError before any training."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

import hf_prune as hp
from hf_prune.recipes import ConfigError
from hf_prune.recipes import image_classification as ic

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT / ".." / "shared" / "data" / "vision" / "mnist_5k.csv.gz"
TINY_VIT = {"patch_size": 7, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}


def _write_digits(path: Path, n: int = 200) -> Path:
    """``n`` MNIST rows (784 pixels, then the label): every 25th of the shared file (sorted by class, so all ten
    digits appear), or synthetic digits-like strokes when the shared data is not beside the checkout."""
    if SHARED_MNIST.is_file():
        with gzip.open(SHARED_MNIST, "rt") as f:
            lines = [line for i, line in enumerate(f) if i % 25 == 0][:n]
    else:
        g = np.random.default_rng(0)
        lines = []
        for i in range(n):
            label, img = i % 10, np.zeros((28, 28), np.uint8)
            img[4 + 2 * label : 6 + 2 * label, 4:24] = 255  # one bar per class, jittered and noisy
            img = np.roll(img, g.integers(-1, 2), axis=1) | g.integers(0, 40, (28, 28), dtype=np.uint8)
            lines.append(",".join(map(str, [*img.ravel(), label])) + "\n")
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    return path


def _argv(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["--mnist_csv", str(csv), "--vit_config", json.dumps(TINY_VIT), "--validation_split_percentage", "20",
            "--dense_max_steps", "10", "--dense_learning_rate", "0.003", "--max_steps", "4", "--learning_rate",
            "0.001", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
            "--calibration_samples", "32", "--flops_keep", "0.5", "--augment", "true", "--augment_dense", "true",
            "--bench_latency", "false", "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--disable_tqdm", "true", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image")
    csv = _write_digits(tmp / "digits.csv.gz")
    out = tmp / "out"
    return csv, out, ic.main(_argv(csv, out))


def test_end_to_end(run):
    csv, out, _ = run
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"] == "image_classification" and saved["bench_seq_len"] == 17  # 4x4 patches + CLS
    assert (out / "results.md").is_file()
    (r,) = saved["runs"]
    for metrics in (saved["dense"]["metrics"], r["metrics_pruned"], r["metrics_recovered"]):
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert r["layer_flops"] <= 0.5 * saved["dense"]["layer_flops"]
    ckpt = Path(r["checkpoint"])
    assert (ckpt / "README.md").is_file() and (ckpt / "preprocessor_config.json").is_file()

    # The checkpoint reloads as the recipe's final model: same FLOPs, and the same accuracy on the same eval set.
    model = hp.load_pruned(str(ckpt), AutoModelForImageClassification).eval()
    assert hp.count_flops(model, 17)["total"] == r["layer_flops"]
    proc = json.loads((ckpt / "preprocessor_config.json").read_text())
    data = ic.load_image_data(ic.DataArguments(mnist_csv=str(csv), validation_split_percentage=20), seed=0)
    batch = data["validation"].with_transform(ic.ImageTransform(28, 1, proc["image_mean"], proc["image_std"]))[:]
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
        again = model(pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(logits, again, rtol=0, atol=0)
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy == pytest.approx(r["metrics_recovered"]["accuracy"], abs=1e-6)


def test_dense_cache_reused(run, capsys):
    csv, out, results = run
    again = ic.main(_argv(csv, out, "--recovery", "none"))
    assert "reusing the trained model" in capsys.readouterr().out
    assert again["dense"]["metrics"] == pytest.approx(results["dense"]["metrics"])


def test_pretrained_folder_gets_new_head(run, tmp_path, capsys):
    """A local DeiT checkpoint for 3 classes on 10-class data: the head is replaced and trained (dense_train auto),
    images are normalised with the checkpoint's processor, FLOPs are counted at 16 patches + CLS + distillation."""
    from transformers import DeiTConfig, DeiTForImageClassification, ViTImageProcessorPil

    csv, _, _ = run
    cfg = DeiTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, num_labels=3)
    DeiTForImageClassification(cfg).save_pretrained(tmp_path / "deit")
    ViTImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.2], image_std=[0.3]).save_pretrained(
        tmp_path / "deit")
    argv = _argv(csv, tmp_path / "out", "--recovery", "none")
    argv[argv.index("--vit_config") : argv.index("--vit_config") + 2] = ["--model_name_or_path", str(tmp_path / "deit")]
    results = ic.main(argv)
    assert "dense: training" in capsys.readouterr().out
    assert results["bench_seq_len"] == 18
    assert results["runs"][0]["layer_flops"] <= 0.5 * results["dense"]["layer_flops"]
    saved = json.loads((tmp_path / "out" / "flops50" / "config.json").read_text())
    assert saved["model_type"] == "deit" and len(saved["id2label"]) == 10


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "image").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_parse(config):
    model_args, _, prune_args, *_ = ic.parse_args([str(config)])
    model_args.vit_fields()  # the ViT fields are valid ViTConfig fields
    assert prune_args.budgets()


def test_augment_keeps_shape_and_identity():
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(ic.augment_batch(x, 0.0, 0.0), x)
    assert ic.augment_batch(x, 0.1, 10.0).shape == x.shape


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("recipe: image_classification\nmnist_cvs: digits.csv.gz\n")
    with pytest.raises(ConfigError, match="mnist_cvs.*did you mean mnist_csv"):
        ic.main([str(cfg)])


def test_bad_vit_field(tmp_path):
    with pytest.raises(ConfigError, match="hiden_size"):
        ic.main(["--mnist_csv", "x.csv", "--vit_config", '{"hiden_size": 8}', "--output_dir", str(tmp_path)])


def test_missing_label_column(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat"  # images without class folders: imagefolder gives no label column
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 60, np.uint8)).save(flat / f"{i}.png")
    with pytest.raises(ConfigError, match="no column 'label'"):
        ic.main(["--train_dir", str(flat), "--output_dir", str(tmp_path / "out")])


def test_local_dataset_custom_columns(tmp_path):
    import datasets

    # A dataset folder with other column names and string labels; "cat" is missing from the validation split,
    # so encoding each split on its own would number the classes differently.
    def split(labels):
        images = [np.full((6, 6, 3), 40 * i, np.uint8) for i in range(len(labels))]
        feats = datasets.Features({"img": datasets.Image(), "target": datasets.Value("string")})
        return datasets.Dataset.from_dict({"img": images, "target": labels}, features=feats)

    split(["cat", "dog", "emu", "dog"]).to_parquet(str(tmp_path / "train.parquet"))
    split(["emu", "dog"]).to_parquet(str(tmp_path / "validation.parquet"))
    args = ic.DataArguments(dataset_name=str(tmp_path), image_column="img", label_column="target")
    data = ic.load_image_data(args, seed=0)
    names = data["train"].features["label"].names
    assert names == data["validation"].features["label"].names == ["cat", "dog", "emu"]
    assert [names[i] for i in data["validation"]["label"]] == ["emu", "dog"]
    batch = data["validation"].with_transform(ic.ImageTransform(4, 1, [0.5], [0.5]))[:]
    assert batch["pixel_values"].shape == (2, 1, 4, 4)
    with pytest.raises(ConfigError, match="no column 'label'.*target"):
        ic.load_image_data(ic.DataArguments(dataset_name=str(tmp_path), image_column="img"), seed=0)


@pytest.mark.parametrize("argv, match", [
    ([], "exactly one data source"),
    (["--mnist_csv", "missing.csv.gz"], "does not exist"),
    (["--train_dir", "no/such/folder"], "does not exist"),
])
def test_bad_data_source(tmp_path, argv, match):
    with pytest.raises(ConfigError, match=match):
        ic.main([*argv, "--output_dir", str(tmp_path)])
