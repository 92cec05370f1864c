import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import random_plan
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp


def _pruned(tiny, seed=1, empty_layer=None):
    model = tiny.model()
    hp.apply_plan_(model, random_plan(model, seed=seed, empty_layer=empty_layer))
    return model


def _out(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def test_save_load_gives_identical_outputs(tiny, tmp_path):
    model = _pruned(tiny, empty_layer=2)
    inputs = inputs_only(tiny.batch())
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()} - {"generation_config.json"}
    assert files == {"config.json", "model.safetensors", "modeling_pruned.py", "shapes.py", "channels.py", "prune_plan.json"}
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["per_layer_config"] and config["hf_prune"]["arch"]["model_type"] == tiny.name
    assert all(v.startswith("modeling_pruned.Pruned") for v in config["auto_map"].values())

    loaded = hp.load_pruned(tmp_path / "ckpt", tiny.auto_class)
    assert type(loaded) is type(model)
    assert loaded.prune_plan == model.prune_plan
    torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs), atol=0, rtol=0)
    # the class recorded in config.architectures is the default
    torch.testing.assert_close(_out(hp.load_pruned(tmp_path / "ckpt"), inputs), _out(model, inputs))


@pytest.mark.parametrize("name", ["bert", "mpnet", "distilbert", "vit", "llama", "qwen3"])
def test_trust_remote_code_loads_without_hf_prune(name, tmp_path):
    tiny = BY_NAME[name]
    model = _pruned(tiny)
    model.save_pretrained(tmp_path / "ckpt")
    inputs = inputs_only(tiny.batch())
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(_out(model, inputs), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_prune"] = None  # as on a machine without hf_prune
        import torch, transformers
        model = transformers.{tiny.auto_class.__name__}.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
        assert type(model).__name__ == "Pruned{tiny.model_class.__name__}", type(model)
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            out = model(**inputs)
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}), atol=0, rtol=0)
        print("REMOTE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE-OK" in r.stdout, r.stderr[-3000:]


def test_plain_from_pretrained_fails_loudly(tmp_path):
    tiny = BY_NAME["bert"]
    _pruned(tiny).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tiny.auto_class.from_pretrained(tmp_path / "ckpt")


def test_replaying_a_saved_plan_gives_the_identical_model(tiny, tmp_path):
    model = tiny.model(seed=3)
    batch = tiny.batch(labels=tiny.labels != "none")
    cfg = hp.PruningConfig(importance="fisher", flops_keep=0.6, progress=False)
    pruned, plan = hp.prune(model, [batch, tiny.batch(seed=2, labels=tiny.labels != "none")], cfg)
    plan.save(tmp_path / "plan.json")
    replayed = hp.apply_plan_(tiny.model(seed=3), hp.PrunePlan.load(tmp_path / "plan.json"))
    a, b = pruned.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    # problem_type is set by the forward pass with labels during scoring, not by pruning
    assert {**pruned.config.to_dict(), "problem_type": None} == {**replayed.config.to_dict(), "problem_type": None}


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _pruned(BY_NAME["bert"])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("hf_prune.modeling_pruned._commit_dir", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _pruned(BY_NAME["bert"])
    model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    stock = type(model).__mro__[2]  # (PrunedX, PrunedModelMixin, X, ...)
    orig_save = stock.save_pretrained

    def half_then_crash(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(stock, "save_pretrained", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(stock, "save_pretrained", orig_save)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_into_a_folder_with_other_files_keeps_them(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    model = _pruned(BY_NAME["bert"])
    model.save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-10").is_dir()
    hp.load_pruned(out)


@pytest.mark.parametrize("name", ["bert", "vit", "deit", "llama"])
def test_weights_that_do_not_match_the_plan_are_refused(tmp_path, name):
    # vit/deit: transformers 5 saves their attention under other names than the modules have; the check
    # compares the names as saved
    tiny = BY_NAME[name]
    _pruned(tiny, seed=1).save_pretrained(tmp_path / "a")
    _pruned(tiny, seed=2).save_pretrained(tmp_path / "b")
    # weights of one save with config and plan of another
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(hp.CorruptCheckpointError, match="do not match the pruned shapes"):
        hp.load_pruned(tmp_path / "a")


def test_plan_that_disagrees_with_config_is_refused(tmp_path):
    tiny = BY_NAME["bert"]
    _pruned(tiny, seed=1).save_pretrained(tmp_path / "a")
    _pruned(tiny, seed=2).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "prune_plan.json").write_text((tmp_path / "b" / "prune_plan.json").read_text())
    with pytest.raises(hp.PlanMismatchError, match="disagree"):
        hp.load_pruned(tmp_path / "a")


def test_truncated_weights_are_refused(tmp_path):
    _pruned(BY_NAME["bert"]).save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(hp.CorruptCheckpointError, match="cannot read weights"):
        hp.load_pruned(tmp_path / "a")


def test_missing_weights_are_refused(tmp_path):
    _pruned(BY_NAME["bert"]).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(hp.CorruptCheckpointError, match="no model.safetensors"):
        hp.load_pruned(tmp_path / "a")


def test_dense_checkpoint_is_not_a_pruned_one(tmp_path):
    BY_NAME["bert"].model().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not an hf_prune checkpoint"):
        hp.load_pruned(tmp_path / "dense")


def test_checkpoint_reports_and_card_are_readable_by_others(tmp_path):
    """Under umask 022 everything hf_prune writes is 0644 / 0755, like a stock save_pretrained folder."""
    import os
    import stat

    from hf_prune import report
    from hf_prune.hub import write_model_card

    old = os.umask(0o022)
    try:
        model = _pruned(BY_NAME["bert"], empty_layer=None)
        model.save_pretrained(tmp_path / "ckpt")
        write_model_card(tmp_path / "ckpt", base_model="google-bert/bert-base-uncased")
        report.write_json(tmp_path / "out" / "results.json", {"a": 1})
        report.write_text(tmp_path / "out" / "results.md", "x\n")
    finally:
        os.umask(old)
    paths = [tmp_path / "ckpt", *(tmp_path / "ckpt").iterdir(), tmp_path / "out" / "results.json",
             tmp_path / "out" / "results.md"]
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p.name, oct(mode))
