"""Physical pruning: ``apply_plan_`` cuts layers, weights, module attributes and config together, in place."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn
from transformers import PreTrainedModel

from .adapters import get_adapter
from .channels import prune_hidden_
from .modeling_pruned import pruned_class
from .plan import PlanMismatchError, PrunePlan
from .shapes import (
    CONFIG_KEY,
    FORMAT_VERSION,
    ArchSpec,
    config_get,
    dense_dims,
    get_module,
    layer_list,
    prune_layer_,
    set_layer_sizes,
)
from .unit_kinds import cut_units_, kept_counts

M = TypeVar("M", bound=nn.Module)


def apply_plan_(model: M, plan: PrunePlan) -> M:
    """Remove every layer, head, neuron, hidden channel and unit of a registered kind that ``plan`` does not keep, in
    place; return the model.

    Slices Q/K/V/O and FFN up/gate/down weights and biases, updates ``in/out_features`` and the head counts
    the forward pass reads, deletes removed layers (renumbering the layer indices the KV cache reads and the
    config's per-layer lists), cuts hidden channels from every tensor carrying the residual width
    (:mod:`hf_prune.channels`; the kept width is recorded in the config's ``hf_prune`` section), records per-layer sizes in ``config.per_layer_config`` and makes the model a
    ``Pruned<Class>`` whose ``save_pretrained`` writes a checkpoint that reloads in one call.

    The model may already be pruned: ``plan`` (ids of the dense model) must then keep a subset of what the
    model still has. The optimizer of a model being trained is invalid afterwards (parameters are replaced).
    """
    adapter = get_adapter(model)
    plan.check_compatible(model)
    current = PrunePlan.of(model)
    if not plan.is_subset_of(current):
        raise PlanMismatchError(
            "the plan keeps layers, heads or neurons that this model has already removed; apply it to the base "
            "model instead (plans hold ids of the dense model)"
        )
    dims = dense_dims(model.config, adapter)
    head_pos, neuron_pos = plan.positions_in(current)  # in the layers as they are now
    kept = set(plan.kept_layers)
    for p, layer in enumerate(layer_list(model, adapter)):
        i = current.kept_layers[p]
        if i not in kept:
            continue
        heads = head_pos[i] if plan.heads[i] != current.heads[i] else None
        neurons = neuron_pos[i] if plan.neurons[i] != current.neurons[i] else None
        if heads is not None or neurons is not None:
            prune_layer_(layer, adapter, dims["head_dim"], heads, neurons)
    stay = [p for p, i in enumerate(current.kept_layers) if i in kept]
    if len(stay) != len(current.kept_layers):
        remove_layers_(model, adapter, stay)
    if plan.hidden != current.hidden:  # the residual width: embeddings, every projection's stream side, norms, heads
        prune_hidden_(model, adapter, plan.hidden_positions_in(current))
    cut_units_(model, plan.units, current.units)  # registered unit kinds (hf_prune.unit_kinds)

    config = model.config
    section: dict[str, Any] = {"format_version": FORMAT_VERSION, "arch": adapter.to_dict()}
    if plan.layers is not None:  # the config's own layer count is now the layers left
        section.update(num_layers=plan.num_layers, layers=plan.kept_layers)
    if plan.hidden is not None:  # the config's hidden size stays the dense one (head sizes and scales derive from it)
        section.update(hidden_channels=plan.hidden_channels)
    if plan.units:  # what a reload resizes each registered kind to
        section.update(units=kept_counts(plan.units))
    setattr(config, CONFIG_KEY, section)
    set_layer_sizes(config, adapter, plan.physical_sizes())
    # the transformers model becomes Pruned<Class>: the model itself, or the one a wrapper (a SentenceTransformer's
    # SentenceEmbedder) reads its config and layers from
    owner = model if isinstance(model, PreTrainedModel) else model.base_model
    owner.__class__ = pruned_class(type(owner))
    owner.prune_plan = plan
    return model


def remove_layers_(model: nn.Module, spec: ArchSpec, stay: list[int]) -> None:
    """Keep only the layers at positions ``stay`` (in order), in place.

    Everything the forward pass reads by layer position follows: the ``layer_idx`` of every submodule (the KV
    cache is indexed by it), the config's layer count and its per-layer lists (``spec.layer_lists``).
    """
    config = model.config
    n = int(config_get(config, spec.layers_field))
    if not stay:
        raise PlanMismatchError("removing every layer leaves no model: keep at least one layer")
    owner_path, _, name = spec.layers.rpartition(".")
    owner = get_module(model.base_model, owner_path) if owner_path else model.base_model
    layers = getattr(owner, name)
    setattr(owner, name, nn.ModuleList([layers[p] for p in stay]))
    for new, layer in enumerate(getattr(owner, name)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    # per-layer lists before the count: some configs validate len(layer_types) == num_hidden_layers on set
    for field in spec.layer_lists:
        values = config_get(config, field)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, field, type(values)(values[p] for p in stay))
    setattr(config, spec.layers_field, len(stay))
