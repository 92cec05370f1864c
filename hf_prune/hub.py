"""Sharing pruned checkpoints on the Hugging Face Hub: a model card written from the checkpoint's own files,
and a push that checks everything it can before the first byte goes out.

``model_card`` reads ``config.json`` and ``prune_plan.json`` of a folder written by ``save_pretrained`` and
counts parameters and FLOPs on a meta-device model: no weights are read, so it is cheap at any size.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import FLOPS_SEQ_LEN, CorruptCheckpointError, checkpoint_stats
from .export import is_stock_export
from .formats.cards import serving_section
from .io import WEIGHTS_INDEX_FILE, weight_file_names, write_text_atomic
from .modeling_pruned import CONFIG_KEY, MODELING_FILE, PLAN_FILE
from .plan import PrunePlan
from .report import markdown_table

CARD_FILE = "README.md"
# Hub pipeline tags by class-name suffix; other heads get none (the Hub then guesses from the config).
_PIPELINE_TAGS = {
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForCausalLM": "text-generation",
}
# Trainer leftovers that are not part of the model (resume state, intermediate checkpoints, our temp files).
_UPLOAD_IGNORE = ["checkpoint-*", "optimizer.*", "scheduler.pt", "rng_state*.pth", "*.tmp"]


# ----------------------------------------------------------------------------------------------- reading


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_FILE
    return [folder / name for name in weight_file_names(index if index.exists() else None)]


def _is_stock_folder(folder: Path) -> bool:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return is_stock_export(raw, PrunePlan.load(folder / PLAN_FILE))
    except (OSError, ValueError):
        return False


def missing_files(checkpoint_dir: str | Path) -> list[str]:
    """Files a complete pruned checkpoint needs that ``checkpoint_dir`` lacks (empty list: complete); a stock export
    (:func:`hf_prune.save_stock`) needs no ``modeling_pruned.py``."""
    folder = Path(checkpoint_dir)
    wanted = ["config.json", PLAN_FILE] + ([] if _is_stock_folder(folder) else [MODELING_FILE])
    return [n for n in wanted if not (folder / n).is_file()] + [
        f.name for f in _weight_files(folder) if not f.is_file()
    ]


def _auto_class(config: Mapping[str, Any]) -> str:
    """The Auto class whose ``auto_map`` entry is the saved architecture (``AutoModel`` if none matches)."""
    arch = (config.get("architectures") or [""])[0]
    for auto, target in (config.get("auto_map") or {}).items():
        if target.rsplit(".", 1)[-1] == arch:
            return auto
    for suffix in _PIPELINE_TAGS:  # a stock export has no auto_map: the class name says which Auto class
        if arch.endswith(suffix):
            return f"AutoModel{suffix}"
    return "AutoModel"


# ----------------------------------------------------------------------------------------------- card


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars included


def _fmt(v: Any) -> str:
    if not _is_number(v):
        return str(v).replace("|", "\\|")  # a bare | would split the table cell
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    return f"{v:,.2f}" if abs(v) >= 100 else f"{float(v):.4g}"


def _yaml_block(data: Any) -> list[str]:
    plain = json.loads(json.dumps(data, default=str))  # numpy scalars, Paths, ... -> YAML-safe types
    return ["```yaml", yaml.safe_dump(plain, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Card tables: report.markdown_table with the card's cell format (header strings are column names)."""
    dict_rows = [dict(zip(header, r)) for r in rows]
    text = markdown_table(dict_rows, columns=list(header), cell=lambda v, _fmt_spec: _fmt("" if v is None else v))
    return text.split("\n")


def _kept(kept: int, total: int) -> str:
    return f"{kept:,}/{total:,} ({kept / total:.1%})" if total else f"{kept}/{total}"


def _front_matter(
    config: Mapping[str, Any],
    repo_id: str,
    base_model: str | None,
    task: str | None,
    dataset: str | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
    extra_tags: Sequence[str],
) -> dict[str, Any]:
    arch = (config.get("architectures") or [""])[0]
    pipeline_tag = next((t for suffix, t in _PIPELINE_TAGS.items() if arch.endswith(suffix)), None)
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "tags": list(dict.fromkeys(["hf_prune", "pruned", "structured-pruning", *extra_tags])),
    }
    if base_model:
        meta["base_model"] = base_model
    if dataset:
        meta["datasets"] = [dataset]
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    if metrics and dataset and pipeline_tag:  # the spec requires a task type and a dataset
        # The Hub spec wants results of *this* model: the last metrics row (e.g. "recovered"), not the baseline.
        row, values = list(metrics.items())[-1]
        scores = [{"type": k, "value": float(v), "name": f"{k} ({row})"} for k, v in values.items() if _is_number(v)]
        task_ = {"type": pipeline_tag, "name": task or pipeline_tag}
        result = {"task": task_, "dataset": {"type": dataset, "name": dataset}, "metrics": scores}
        meta["model-index"] = [{"name": repo_id.split("/")[-1], "results": [result]}]
    return meta


def model_card(
    checkpoint_dir: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    speedup: Mapping[str, Any] | None = None,
    runtime_speed: Sequence[Mapping[str, Any]] = (),
    recipe: Mapping[str, Any] | str | None = None,
    extra_tags: Sequence[str] = (),
    seq_len: int = FLOPS_SEQ_LEN,
) -> str:
    """README.md text (YAML front matter + markdown) for a pruned checkpoint folder written by save_pretrained.

    Args:
        checkpoint_dir: the folder holding config.json, prune_plan.json and the safetensors weights.
        repo_id: Hub id used in the loading snippets; default: the folder name.
        seq_len: tokens (or patches + 1 for ViT) per sequence at which FLOPs are counted.
        base_model: Hub id of the dense model that was pruned (``hf_prune.resources.base_model_id`` turns a
            model name or path into one, or None for a local folder); an invalid id is an error.
        task: what the model does, e.g. ``"SST-2 sentiment classification"``.
        dataset: Hub id of the evaluation/training dataset, e.g. ``"nyu-mll/glue"``.
        metrics: ``{row: {metric: value}}``, e.g. ``{"dense": {"accuracy": 0.91}, "pruned": {...}}``. The
            last row is this checkpoint: it goes into the ``model-index`` metadata when ``dataset`` is given
            and the architecture has a pipeline tag.
        speedup: measured latency, e.g. ``{"device": "cpu", "seq_len": 128, "rows": [{"batch_size": 1,
            "dense_ms": 9.1, "pruned_ms": 5.2, "speedup": 1.75}]}``; every key is rendered.
        runtime_speed: the exported files timed in their runtimes against the dense model's exports: rows
            ``{format, runtime, metric, dense, pruned, speedup}`` (``export_beside`` returns them).
        recipe: the pruning recipe, a mapping (rendered as YAML) or a command line.
        extra_tags: Hub tags added to ``hf_prune``, ``pruned``, ``structured-pruning``.
    """
    folder = Path(checkpoint_dir)
    if base_model is not None:
        check_repo_id(base_model, "base_model")
    if repo_id is not None:
        check_repo_id(repo_id, "repo_id")
    s = checkpoint_stats(folder, seq_len)
    config, dense, sizes = s["config"], s["dense"], s["sizes"]
    repo_id = repo_id or folder.resolve().name
    auto = _auto_class(config)
    meta = _front_matter(config, repo_id, base_model, task, dataset, metrics, extra_tags)
    n = s["dense_layers"]
    heads = sum(x["num_heads"] for x in sizes)
    neurons = sum(x["intermediate_size"] for x in sizes)
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "A transformers model"
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {repo_id}", ""]
    out += [
        f"{base} structurally pruned with hf_prune"
        + (f" for {task}" if task else "")
        + (f": layers kept {_kept(len(sizes), n)}," if len(sizes) < n else ":")
        + f" attention heads kept {_kept(heads, dense['num_heads'] * n)}, "
        f"FFN neurons kept {_kept(neurons, dense['intermediate_size'] * n)}, "
        f"parameters kept {_kept(*s['params'])}, "
        f"layer FLOPs kept at sequence length {seq_len} {_kept(*s['flops'])}.",
        "",
        (
            "Whole layers, heads and neurons are removed, so the weights are physically smaller and the model is "
            "faster without sparse kernels."
        ),
        "",
        "## Per-layer shapes",
        "",
    ]
    gqa = dense["num_kv_heads"] != dense["num_heads"]  # KV column only where it can differ from the heads
    header = ["layer", "heads kept / dense"] + (["KV heads kept / dense"] if gqa else []) + ["FFN neurons kept / dense"]
    by_id = dict(zip(s["kept_layers"], sizes))  # dense layer id -> its kept sizes
    rows = [
        [i, f"{x['num_heads']}/{dense['num_heads']}"]
        + ([f"{x['num_kv_heads']}/{dense['num_kv_heads']}"] if gqa else [])
        + [f"{x['intermediate_size']}/{dense['intermediate_size']}"]
        if x is not None else [i, "removed"] + (["removed"] if gqa else []) + ["removed"]
        for i, x in ((i, by_id.get(i)) for i in range(n))
    ]
    out += _table(header, rows) + [""]
    if metrics:
        names = list(dict.fromkeys(k for row in metrics.values() for k in row))
        out += ["## Results", ""]
        out += _table(["model", *names], [[r, *(v.get(k, "") for k in names)] for r, v in metrics.items()]) + [""]
    if speedup:
        out += ["## Measured speedup", ""]
        info = {k: v for k, v in speedup.items() if k != "rows"}
        if info:
            out += [", ".join(f"{k.replace('_', ' ')}: {_fmt(v)}" for k, v in info.items()), ""]
        rows_ = list(speedup.get("rows") or [])
        if rows_:
            cols = list(dict.fromkeys(k for r in rows_ for k in r))
            out += _table(cols, [[r.get(c, "") for c in cols] for r in rows_]) + [""]
    out += [
        "## Usage",
        "",
        "With hf_prune (runs hf_prune's own modeling code and checks the files against each other):",
        "",
        "```python",
        "import hf_prune",
        f"from transformers import {auto}",
        "",
        f'model = hf_prune.load_pruned("{repo_id}", {auto})',
        "```",
        "",
    ]
    if s["stock"]:
        out += [
            ("Without hf_prune: this checkpoint is the stock architecture with smaller global sizes (every layer has "
             "the same shape), so plain transformers and runtimes that read the stock config (vLLM, TGI, llama.cpp's "
             "converter) load it, no custom code:"),
            "",
            "```python",
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    else:
        out += [
            (
                f"Without hf_prune (`{MODELING_FILE}` in this repo rebuilds the per-layer shapes; it needs only torch "
                "and transformers):"
            ),
            "",
            "```python",
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{repo_id}", trust_remote_code=True)',
            "```",
            "",
        ]
    out += serving_section(folder, repo_id, runtime_speed)  # GGUF / ONNX / vLLM files exported beside it
    # Plan provenance (criterion, budget, ...); large entries such as latency tables stay in prune_plan.json.
    small_meta = {k: v for k, v in s["plan_meta"].items() if len(json.dumps(v, default=str)) <= 200}
    if recipe or small_meta:
        out += ["## Recipe", ""]
        if isinstance(recipe, str):
            out += ["```bash", recipe.strip(), "```", ""]
        elif recipe:
            out += _yaml_block(recipe)
        if small_meta:
            out += [f"Plan provenance (`meta` of {PLAN_FILE}):", ""] + _yaml_block(small_meta)
    return "\n".join(out)


def write_model_card(checkpoint_dir: str | Path, **kwargs: Any) -> Path:
    """Write ``model_card(checkpoint_dir, **kwargs)`` to ``checkpoint_dir/README.md`` atomically; return the path.

    Args:
        checkpoint_dir: the pruned checkpoint folder.
        **kwargs: keyword arguments of :func:`model_card`.
    """
    folder = Path(checkpoint_dir)
    text = model_card(folder, **kwargs)
    write_text_atomic(folder / CARD_FILE, text)
    return folder / CARD_FILE


# ----------------------------------------------------------------------------------------------- push


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN`` / the stored login; PermissionError if none.

    Args:
        token: an explicit Hub token (wins over the environment and the stored login).
    """
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            "pushing to the Hub needs a token with write access and none was found. Run `hf auth login`, or set "
            "HF_TOKEN=hf_... in the environment, or pass token=... (create one at "
            "https://huggingface.co/settings/tokens)."
        )
    return token


def check_repo_id(repo_id: str, what: str = "repo id") -> None:
    """Refuse a string the Hub would not accept as a repo id, naming the setting and the fix."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id ({e}); use 'namespace/name', e.g. "
                         "'your-username/model-name'") from e


def check_can_push(repo_id: str | None, token: str | None = None) -> str:
    """Fail now, before any long job, if a push could not work; return the token. Makes no network call.

    Args:
        repo_id: target repo, ``"name"`` or ``"namespace/name"``.
        token: explicit Hub token; default: ``HF_TOKEN`` or the stored ``hf auth login`` token.
    """
    from huggingface_hub import constants

    if not repo_id:
        raise ValueError("pushing needs a repo id: pass repo_id='your-username/model-name'")
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:  # the flag every huggingface_hub request checks
        raise RuntimeError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE to push")
    return resolve_token(token)


def push_pruned(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    card_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Upload a pruned checkpoint folder to the Hub (creating the repo if needed); return the commit URL.

    Writes README.md first when the folder has none or ``card_kwargs`` is given. Trainer resume files
    (``checkpoint-*`` folders, optimizer/scheduler/RNG state) are not uploaded.

    Args:
        checkpoint_dir: folder written by ``save_pretrained`` of a pruned model (or by ``save_stock``).
        repo_id: target repo, ``"namespace/name"``.
        token: Hub token; default: ``HF_TOKEN`` or the stored login.
        private: create the repo private (only applies when the repo does not exist yet).
        commit_message: default: ``"Upload pruned model (hf_prune)"``.
        card_kwargs: keyword arguments of :func:`model_card` (``base_model``, ``metrics``, ...).
    """
    from huggingface_hub import HfApi

    folder = Path(checkpoint_dir)
    token = check_can_push(repo_id, token)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the directory given to save_pretrained")
    missing = missing_files(folder)
    if missing:
        raise CorruptCheckpointError(
            f"{folder} is not a complete pruned checkpoint: missing {', '.join(missing)}. Save the pruned model "
            "with model.save_pretrained(folder) (after hf_prune.prune / apply_plan_) and push that folder."
        )
    if CONFIG_KEY not in json.loads((folder / "config.json").read_text(encoding="utf-8")) and not \
            _is_stock_folder(folder):
        raise CorruptCheckpointError(f"{folder}/config.json has no '{CONFIG_KEY}' section: not saved by hf_prune")
    if card_kwargs is not None or not (folder / CARD_FILE).exists():
        write_model_card(folder, **{"repo_id": repo_id, **(card_kwargs or {})})
    # huggingface_hub reads HF_ENDPOINT once at import; read it again so a later setting is honoured.
    api = HfApi(endpoint=(os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None, token=token)
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(
        repo_id=repo.repo_id,  # namespace filled in by the Hub when repo_id had none
        folder_path=folder,
        commit_message=commit_message or "Upload pruned model (hf_prune)",
        ignore_patterns=list(_UPLOAD_IGNORE),
    )
    return info.commit_url
