"""The model card of a pruned checkpoint, written from the checkpoint's own files and built from sections (summary,
per-layer shapes, results, measured speedup, usage, serving files, recipe).

``model_card`` reads ``config.json`` and ``prune_plan.json`` of a folder written by ``save_pretrained`` and counts
parameters and FLOPs on a meta-device model: no weights are read, so it is cheap at any size.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .channels import CHANNELS_FILE
from .checkpoint import FLOPS_SEQ_LEN, checkpoint_stats
from .formats.cards import serving_section
from .io import write_text_atomic
from .report import markdown_table
from .shapes import MODELING_FILE, PLAN_FILE, SHAPES_FILE

CARD_FILE = "README.md"
# Hub pipeline tags by class-name suffix; other heads get none (the Hub then guesses from the config).
PIPELINE_TAGS = {
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForCausalLM": "text-generation",
}


def check_repo_id(repo_id: str, what: str = "repo id") -> None:
    """Refuse a string the Hub would not accept as a repo id, naming the setting and the fix."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id ({e}); use 'namespace/name', e.g. "
                         "'your-username/model-name'") from e


def _auto_class(config: Mapping[str, Any]) -> str:
    """The Auto class whose ``auto_map`` entry is the saved architecture (``AutoModel`` if none matches)."""
    arch = (config.get("architectures") or [""])[0]
    for auto, target in (config.get("auto_map") or {}).items():
        if target.rsplit(".", 1)[-1] == arch:
            return auto
    for suffix in PIPELINE_TAGS:  # a stock export has no auto_map: the class name says which Auto class
        if arch.endswith(suffix):
            return f"AutoModel{suffix}"
    return "AutoModel"



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
    sentence_transformers: bool = False,
) -> dict[str, Any]:
    arch = (config.get("architectures") or [""])[0]
    pipeline_tag = next((t for suffix, t in PIPELINE_TAGS.items() if arch.endswith(suffix)), None)
    library = "transformers"
    if sentence_transformers:  # a sentence-transformers folder: what the Hub lists embedders under
        library, pipeline_tag = "sentence-transformers", "sentence-similarity"
        extra_tags = ["sentence-transformers", "feature-extraction", *extra_tags]
    meta: dict[str, Any] = {
        "library_name": library,
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
    repo_id = repo_id or folder.resolve().name
    st = (folder / "modules.json").is_file()  # a sentence-transformers folder (its module 0 is this checkpoint)
    meta = _front_matter(s["config"], repo_id, base_model, task, dataset, metrics, extra_tags, st)
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {repo_id}", ""]
    out += summary_section(s, base_model, task, seq_len)
    out += shapes_section(s)
    out += results_section(metrics) + speedup_section(speedup)
    out += sentence_transformers_usage(s, repo_id) if st else usage_section(s, repo_id)
    out += serving_section(folder, repo_id, runtime_speed)  # GGUF / ONNX / vLLM files exported beside it
    out += recipe_section(s, recipe)
    return "\n".join(out)


def summary_section(s: Mapping[str, Any], base_model: str | None, task: str | None, seq_len: int) -> list[str]:
    """What was kept, in one sentence (``s``: :func:`hf_prune.checkpoint.checkpoint_stats`)."""
    dense, sizes, n = s["dense"], s["sizes"], s["dense_layers"]
    heads = sum(x["num_heads"] for x in sizes)
    neurons = sum(x["intermediate_size"] for x in sizes)
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "A transformers model"
    return [
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
    ]


def shapes_section(s: Mapping[str, Any]) -> list[str]:
    """One row per dense layer: heads (and KV heads under GQA) and FFN neurons kept, or "removed"."""
    dense, sizes, n = s["dense"], s["sizes"], s["dense_layers"]
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
    return ["## Per-layer shapes", ""] + _table(header, rows) + [""]


def results_section(metrics: Mapping[str, Mapping[str, float]] | None) -> list[str]:
    if not metrics:
        return []
    names = list(dict.fromkeys(k for row in metrics.values() for k in row))
    return (["## Results", ""] + _table(["model", *names], [[r, *(v.get(k, "") for k in names)]
                                                              for r, v in metrics.items()]) + [""])


def speedup_section(speedup: Mapping[str, Any] | None) -> list[str]:
    if not speedup:
        return []
    out = ["## Measured speedup", ""]
    info = {k: v for k, v in speedup.items() if k != "rows"}
    if info:
        out += [", ".join(f"{k.replace('_', ' ')}: {_fmt(v)}" for k, v in info.items()), ""]
    rows = list(speedup.get("rows") or [])
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        out += _table(cols, [[r.get(c, "") for c in cols] for r in rows]) + [""]
    return out


def usage_section(s: Mapping[str, Any], repo_id: str) -> list[str]:
    """Loading snippets: with hf_prune, and without it (stock class, or the checkpoint's remote code)."""
    auto = _auto_class(s["config"])
    out = [
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
        intro = ("Without hf_prune: this checkpoint is the stock architecture with smaller global sizes (every layer "
                 "has the same shape), so plain transformers and runtimes that read the stock config (vLLM, TGI, "
                 "llama.cpp's converter) load it, no custom code:")
        call = f'model = {auto}.from_pretrained("{repo_id}")'
    else:
        intro = (f"Without hf_prune (`{MODELING_FILE}`, `{SHAPES_FILE}` and `{CHANNELS_FILE}` in this repo rebuild the "
                 "per-layer shapes; "
                 "they need only torch and transformers):")
        call = f'model = {auto}.from_pretrained("{repo_id}", trust_remote_code=True)'
    return out + [intro, "", "```python", f"from transformers import {auto}", "", call, "```", ""]


def sentence_transformers_usage(s: Mapping[str, Any], repo_id: str) -> list[str]:
    """Loading snippet of a sentence-transformers folder (a stock encoder needs no remote code)."""
    remote = "" if s["stock"] else ", trust_remote_code=True"
    why = ("the encoder is the stock architecture with smaller sizes: no custom code" if s["stock"] else
           f"`{MODELING_FILE}`, `{SHAPES_FILE}` and `{CHANNELS_FILE}` in this repo rebuild the encoder's per-layer "
           "shapes; they need only "
           "torch and transformers, not hf_prune")
    return ["## Usage", "", f"With sentence-transformers ({why}):", "", "```python",
            "from sentence_transformers import SentenceTransformer", "",
            f'model = SentenceTransformer("{repo_id}"{remote})',
            'embeddings = model.encode(["A pruned sentence encoder.", "It embeds sentences faster."])', "```", ""]


def recipe_section(s: Mapping[str, Any], recipe: Mapping[str, Any] | str | None) -> list[str]:
    """The recipe (YAML or a command line) and the plan's provenance; large entries such as latency tables stay in
    prune_plan.json."""
    small_meta = {k: v for k, v in s["plan_meta"].items() if len(json.dumps(v, default=str)) <= 200}
    if not recipe and not small_meta:
        return []
    out = ["## Recipe", ""]
    if isinstance(recipe, str):
        out += ["```bash", recipe.strip(), "```", ""]
    elif recipe:
        out += _yaml_block(recipe)
    if small_meta:
        out += [f"Plan provenance (`meta` of {PLAN_FILE}):", ""] + _yaml_block(small_meta)
    return out


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
