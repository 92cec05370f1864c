"""Stock export: a pruned model whose layers all keep the same shape, saved as the stock architecture.

Serving runtimes and converters (vLLM, TGI, llama.cpp's converter, ONNX exporters) read the stock ``config.json``
and run no remote code. A homogeneous plan (every layer the same kept heads, KV heads and FFN neurons) is an
ordinary smaller model of the stock family: :func:`save_stock` writes it with new global sizes
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``), no ``per_layer_config``,
no ``auto_map``, no custom code, so ``AutoModelFor*.from_pretrained(folder)`` returns it with identical outputs.

Whether a family's stock config can express the shape is not assumed from its name: the stock class is built from
the new config (on the meta device, no memory) and every tensor shape is compared with the pruned model's. BERT-style
configs derive the head size as ``hidden_size / num_attention_heads``, so fewer heads cannot be written there (FFN
width can); decoders with a ``head_dim`` field (Llama, Mistral, Qwen2/3) take any head count.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from .adapters import get_adapter, model_dims
from .channels import hidden_width
from .costs import model_layer_sizes
from .io import staged_folder
from .model_kinds import model_kind
from .modeling_pruned import stock_class
from .shapes import CONFIG_KEY, PLAN_FILE, config_get
from .unit_kinds import refuse_units

#: ``prune_plan.json``'s ``meta["format"]`` for a stock export (the plan still records the dense ids kept).
STOCK_FORMAT = "stock"


class NotStockExpressible(ValueError):
    """The pruned model's shape cannot be written as its stock architecture; the message says why."""


def stock_config(model: nn.Module) -> Any:
    """The stock config of ``model``'s pruned shape (global sizes = the kept sizes), or NotStockExpressible."""
    return _stock_probe(model)[0]


def _stock_probe(model: nn.Module) -> tuple[Any, nn.Module]:
    """The stock config and the stock model built from it on the meta device (checked against ``model``'s
    shapes); :func:`save_stock` loads ``model``'s tensors into that same probe."""
    refuse_units(model, "a stock config")
    adapter = get_adapter(model)
    sizes = model_layer_sizes(model)
    first = sizes[0]
    differ = [i for i, s in enumerate(sizes) if s != first]
    if differ:
        shown = ", ".join(f"layer {i}: {sizes[i]['num_heads']} heads / {sizes[i]['num_kv_heads']} KV / "
                          f"{sizes[i]['intermediate_size']} neurons" for i in differ[:4])
        raise NotStockExpressible(
            f"the layers are not all the same shape (layer 0: {first['num_heads']} heads / {first['num_kv_heads']} KV "
            f"/ {first['intermediate_size']} neurons; {shown}{' ...' if len(differ) > 4 else ''}): a stock config "
            "has one size for all layers. Prune with PruningConfig(allocation='uniform') for a stock export, or save "
            "the per-layer format (save_pretrained)"
        )
    if first["num_heads"] == 0 or first["intermediate_size"] == 0:
        raise NotStockExpressible("the layers have an empty attention or FFN block, which stock code cannot build")
    config = copy.deepcopy(model.config)
    dims = model_dims(model)  # dense sizes; head_dim is unchanged by pruning, written where the family has it
    for key in ("per_layer_config", "_heterogeneity_spec", "auto_map", CONFIG_KEY,
                "allow_global_per_layer_attribute_access"):
        config.__dict__.pop(key, None)
    width = hidden_width(model, adapter)
    try:
        setattr(config, adapter.num_heads_field, first["num_heads"])
        if adapter.num_kv_heads_field:
            setattr(config, adapter.num_kv_heads_field, first["num_kv_heads"])
        setattr(config, adapter.intermediate_field, first["intermediate_size"])
        setattr(config, adapter.hidden_field, width)  # the residual width it has (a hidden cut narrows it)
        if adapter.head_dim_field:  # families that read it take any head count; the shape check finds the others
            setattr(config, adapter.head_dim_field, dims["head_dim"])
        stock = stock_class(type(model))
        config.architectures = [stock.__name__]
        if callable(getattr(config, "validate", None)):  # what save_pretrained checks, checked before anything is written
            config.validate()
        probe = _check_shapes(model, stock, config, heads_changed=first["num_heads"] != dims["num_heads"],
                              hidden_changed=width != dims["hidden_size"])
    except NotStockExpressible:
        raise
    except (ValueError, TypeError, StrictDataclassError) as e:  # the config validates its sizes (Llama: hidden % heads)
        cause = getattr(e, "__cause__", None) or e
        raise NotStockExpressible(
            f"the stock {config.model_type} config refuses the pruned sizes ({cause}); "
            + ("keep a hidden width that is a multiple of the kept heads, or " if width != dims["hidden_size"] else "")
            + "save the per-layer format (save_pretrained)"
        ) from e
    return config, probe


def _check_shapes(model: nn.Module, stock: type, config: Any, heads_changed: bool, hidden_changed: bool) -> nn.Module:
    """Build ``stock`` from ``config`` without memory, compare every tensor's shape (and every constant its modules
    derive from the config, like an embedding scale) with ``model``'s and return it."""
    with torch.device("meta"):
        probe = stock(copy.deepcopy(config))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    wrong = sorted(k for k in want if got.get(k) != want[k]) + sorted(set(got) - set(want))
    if not wrong:
        _check_constants(model, probe)
    if wrong:
        adapter = get_adapter(model)
        reason = ""
        if heads_changed or hidden_changed:
            reason = (f" ({config.model_type}'s modeling code derives the head size as {adapter.hidden_field} / "
                      f"{adapter.num_heads_field}, so {'a narrower hidden width' if hidden_changed else 'fewer heads'}"
                      f" cannot be expressed unless heads are cut in proportion; FFN width can)")
        raise NotStockExpressible(
            f"the stock {stock.__name__} built from the pruned sizes does not have the pruned tensors' shapes{reason}: "
            f"{wrong[0]} is {got.get(wrong[0])} there, {want.get(wrong[0])} here. Save the per-layer format "
            "(save_pretrained) instead"
        )
    return probe


def _check_constants(model: nn.Module, probe: nn.Module) -> None:
    """Numbers a stock module computes from the config at construction (Gemma's embedding scale sqrt(hidden_size),
    attention scalings) must be the ones the pruned model runs with: a hidden cut changes ``hidden_size``."""
    mine = dict(model.named_modules())
    for name, module in probe.named_modules():
        ours = mine.get(name)
        for attr, value in vars(module).items():
            theirs = getattr(ours, attr, None) if ours is not None else None
            if isinstance(value, float) and isinstance(theirs, float) and abs(value - theirs) > 1e-6 * abs(theirs):
                raise NotStockExpressible(
                    f"the stock {type(probe).__name__} built from the pruned sizes computes {name}.{attr} = {value:.6g} "
                    f"from its config, while the pruned model runs with {theirs:.6g} (a hidden cut changes "
                    "hidden_size, which this family's code reads as a value): save the per-layer format "
                    "(save_pretrained) or export to ONNX instead"
                )


def stock_model(model: nn.Module) -> nn.Module:
    """``model`` as an instance of its stock class with the stock config of its pruned shape, sharing its tensors
    (no copy); raises :class:`NotStockExpressible` when the shape cannot be expressed. Its ``prune_plan`` is the
    plan marked as a stock export."""
    config, stock = _stock_probe(model)
    stock.load_state_dict(model.state_dict(), assign=True)  # the same tensors, no copy
    if getattr(config, "tie_word_embeddings", False):
        stock.tie_weights()
    plan = getattr(model, "prune_plan", None)
    if plan is not None:
        data = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
        stock.prune_plan = {**data, "meta": {**data.get("meta", {}), "format": STOCK_FORMAT}}
    return stock.eval()


def write_stock_plan(model: nn.Module, folder: Path) -> None:
    """``prune_plan.json`` of a :func:`stock_model` (provenance: the dense ids kept), if it has one."""
    plan = getattr(model, "prune_plan", None)
    if plan is not None:
        (folder / PLAN_FILE).write_text(json.dumps(plan, indent=1), encoding="utf-8")


def save_stock(model: nn.Module, save_directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save a homogeneous pruned ``model`` as its stock architecture, atomically (a temporary sibling folder renamed
    into place), with ``prune_plan.json`` beside it for provenance. Raises :class:`NotStockExpressible` (before
    anything is written) when the shape cannot be expressed. ``overwrite``: replace an existing folder (its files
    are kept until the new one is complete). Returns the folder."""
    stock = stock_model(model)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file: choose a folder for the export")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not an empty folder: choose a new folder for the export")
    with staged_folder(target, overwrite=True) as stage:  # refused above unless it may be replaced
        stock.save_pretrained(stage)
        write_stock_plan(stock, stage)
    return target


def save_pruned(model: nn.Module, save_directory: str | Path, *, deployable: bool = False) -> Path:
    """Save a pruned model the way ``PruningConfig(deployable=...)`` asks: the stock architecture
    (:func:`save_stock`, replacing the folder) or the per-layer format (``save_pretrained``). A model of a registered
    kind (a ``SentenceTransformer``) is saved in its own format, replacing the folder."""
    kind = model_kind(model)
    if kind is not None and kind.save is not None:
        return kind.save(model, Path(save_directory), deployable, True)
    if deployable:
        return save_stock(model, save_directory, overwrite=True)
    model.save_pretrained(save_directory)
    return Path(save_directory)


def is_stock_export(config: Any, plan: Any) -> bool:
    """Whether a checkpoint's config (object or ``config.json`` dict) and plan are :func:`save_stock`'s: the stock
    family's own config (no hf_prune section) with a plan marked as a stock export."""
    section = config.get(CONFIG_KEY) if isinstance(config, dict) else config_get(config, CONFIG_KEY)
    return not section and plan is not None and plan.meta.get("format") == STOCK_FORMAT
