"""Physical pruning: ``apply_plan_`` cuts weights, module attributes and config together, in place."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from .adapters import get_adapter, model_dims
from .modeling_pruned import CONFIG_KEY, FORMAT_VERSION, layer_list, prune_layer_, pruned_class, set_layer_sizes
from .plan import PlanMismatchError, PrunePlan

M = TypeVar("M", bound=nn.Module)


def apply_plan_(model: M, plan: PrunePlan) -> M:
    """Remove every head and neuron that ``plan`` does not keep, in place, and return the model.

    Slices Q/K/V/O and FFN up/gate/down weights and biases, updates ``in/out_features`` and the head counts
    the forward pass reads, records per-layer sizes in ``config.per_layer_config`` and makes the model a
    ``Pruned<Class>`` whose ``save_pretrained`` writes a checkpoint that reloads in one call.

    The model may already be pruned: ``plan`` (ids of the dense model) must then keep a subset of what the
    model still has. The optimizer of a model being trained is invalid afterwards (parameters are replaced).
    """
    adapter = get_adapter(model)
    plan.check_compatible(model)
    current = PrunePlan.of(model)
    if not plan.is_subset_of(current):
        raise PlanMismatchError(
            "the plan keeps heads or neurons that this model has already removed; apply it to the base "
            "model instead (plans hold ids of the dense model)"
        )
    dims = model_dims(model)
    head_pos, neuron_pos = plan.positions_in(current)  # in the layers as they are now
    for i, layer in enumerate(layer_list(model, adapter)):
        heads = head_pos[i] if plan.heads[i] != current.heads[i] else None
        neurons = neuron_pos[i] if plan.neurons[i] != current.neurons[i] else None
        if heads is not None or neurons is not None:
            prune_layer_(layer, adapter, dims["head_dim"], plan.group_size, heads, neurons)

    config = model.config
    set_layer_sizes(config, adapter, plan.layer_sizes())
    setattr(config, CONFIG_KEY, {"format_version": FORMAT_VERSION, "arch": adapter.to_dict()})
    model.__class__ = pruned_class(type(model))
    model.prune_plan = plan
    return model
