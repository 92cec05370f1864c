"""``PrunePlan``: which layers, and in each layer which heads and neurons, a model keeps (and its hidden channels
and the units of any registered kind, :mod:`hf_prune.unit_kinds`). A JSON-serialisable value; surgery consumes it.

Indices always refer to the *dense* (original) model, so a plan replayed on the base model gives the same
pruned model, and a plan for an already pruned model is a subset of the plan it carries. Rows of ``heads`` and
``neurons`` are per *dense* layer; a removed layer's rows are empty. Code that walks a model's layer list maps its
positions to dense ids with :attr:`PrunePlan.kept_layers` (position ``p`` holds dense layer ``kept_layers[p]``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import Any

from torch import nn

from .adapters import get_adapter, model_dims
from .unit_kinds import check_units, dense_sizes, ranks


class PlanMismatchError(ValueError):
    """A plan does not fit the model (or checkpoint) it is applied to."""


@dataclass
class PrunePlan:
    """Kept layers, and the attention heads and FFN neurons each of them keeps.

    Args:
        model_type: ``config.model_type`` of the model the plan was made for.
        num_heads: query heads per layer in the dense model.
        num_kv_heads: key/value heads per layer in the dense model (== num_heads without GQA).
        intermediate_size: FFN neurons per layer in the dense model.
        hidden_size: model width (a sanity check against plans for other sizes).
        heads: per layer, sorted ids of kept query heads (ids of the dense model). Under grouped-query
            attention every kept key/value group keeps the same number of its query heads (a KV head is kept
            while any of its query heads is).
        neurons: per layer, sorted ids of kept FFN neurons.
        meta: free-form provenance (criterion, budget, base model, ...).
        layers: sorted ids of the dense layers kept (depth pruning), or None when every layer stays. The rows of
            removed layers in ``heads`` and ``neurons`` are empty.
        hidden: sorted ids of the hidden (residual) channels kept, or None when the model keeps its whole width.
        units: per registered unit kind the plan cuts (:func:`hf_prune.register_unit_kind`), ``{"size": dense count,
            "kept": sorted dense ids}``; a kind it does not name keeps every unit.
    """

    model_type: str
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    hidden_size: int
    heads: list[list[int]]
    neurons: list[list[int]]
    meta: dict[str, Any] = field(default_factory=dict)
    layers: list[int] | None = None
    hidden: list[int] | None = None
    units: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = [sorted(int(h) for h in hs) for hs in self.heads]
        self.neurons = [sorted(int(n) for n in ns) for ns in self.neurons]
        if len(self.heads) != len(self.neurons):
            raise PlanMismatchError(
                f"plan has {len(self.heads)} layers of heads but {len(self.neurons)} layers of neurons"
            )
        if self.layers is not None:
            kept = sorted(int(i) for i in self.layers)
            if len(set(kept)) != len(kept) or any(not 0 <= i < len(self.heads) for i in kept):
                raise PlanMismatchError(f"kept layer ids {kept} must be distinct and in [0, {len(self.heads)})")
            if not kept:
                raise PlanMismatchError("the plan removes every layer; keep at least one (layers_keep >= 1)")
            gone = set(range(len(self.heads))) - set(kept)
            for i in gone:  # a removed layer keeps nothing: costs and subsets then need no special case
                self.heads[i], self.neurons[i] = [], []
            self.layers = None if not gone else kept
        if self.hidden is not None:
            kept_h = sorted(int(c) for c in self.hidden)
            if not kept_h or len(set(kept_h)) != len(kept_h) or any(not 0 <= c < self.hidden_size for c in kept_h):
                raise PlanMismatchError(f"kept hidden channels must be distinct, at least one, and in [0, "
                                        f"{self.hidden_size})")
            self.hidden = None if len(kept_h) == self.hidden_size else kept_h
        try:
            self.units = check_units(self.units or {})
        except ValueError as e:
            raise PlanMismatchError(str(e)) from None
        group = self.group_size
        for i, (hs, ns) in enumerate(zip(self.heads, self.neurons)):
            if len(set(hs)) != len(hs) or any(not 0 <= h < self.num_heads for h in hs):
                raise PlanMismatchError(f"layer {i}: head ids {hs} must be distinct and in [0, {self.num_heads})")
            if len(set(ns)) != len(ns) or any(not 0 <= n < self.intermediate_size for n in ns):
                raise PlanMismatchError(
                    f"layer {i}: neuron ids must be distinct and in [0, {self.intermediate_size})"
                )
            per_group = [sum(1 for h in hs if h // group == k) for k in sorted({h // group for h in hs})]
            if len(set(per_group)) > 1:
                raise PlanMismatchError(
                    f"layer {i}: kept heads {hs} keep {per_group} query heads in their key/value groups of "
                    f"{group}; every kept KV head must keep the same number of query heads (attention repeats "
                    "each KV head for a fixed number of query heads)"
                )

    # ------------------------------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kept_layers(self) -> list[int]:
        """Dense ids of the layers kept, in order (the layer at position ``p`` of the cut model is
        ``kept_layers[p]``)."""
        return list(range(self.num_layers)) if self.layers is None else list(self.layers)

    @property
    def hidden_channels(self) -> int:
        """The residual width the cut model has."""
        return self.hidden_size if self.hidden is None else len(self.hidden)

    @property
    def kept_hidden(self) -> list[int]:
        """Dense ids of the hidden channels kept (channel ``c`` of the cut model is ``kept_hidden[c]``)."""
        return list(range(self.hidden_size)) if self.hidden is None else list(self.hidden)

    def kv_heads(self, layer: int) -> list[int]:
        return sorted({h // self.group_size for h in self.heads[layer]})

    def layer_sizes(self) -> list[dict[str, int]]:
        """Kept sizes per *dense* layer (a removed layer: all zero, which is what it costs)."""
        return [
            {"num_heads": len(h), "num_kv_heads": len({x // self.group_size for x in h}), "intermediate_size": len(n)}
            for h, n in zip(self.heads, self.neurons)
        ]

    def physical_sizes(self) -> list[dict[str, int]]:
        """Kept sizes of the layers the cut model has, in order."""
        sizes = self.layer_sizes()
        return [sizes[i] for i in self.kept_layers]

    def positions_in(self, current: "PrunePlan") -> tuple[list[list[int]], list[list[int]]]:
        """Per layer, the positions in a model cut to ``current`` (its weights as they are now) of the heads and
        neurons this plan keeps: the kept dense ids' ranks among the ids ``current`` still has."""
        heads = [ranks(kept, cur) for cur, kept in zip(current.heads, self.heads)]
        neurons = [ranks(kept, cur) for cur, kept in zip(current.neurons, self.neurons)]
        return heads, neurons

    def hidden_positions_in(self, current: "PrunePlan") -> list[int]:
        """Positions, in a model cut to ``current``, of the hidden channels this plan keeps."""
        return ranks(self.kept_hidden, current.kept_hidden)

    def kept_fraction(self) -> dict[str, float]:
        """Fractions of heads and neurons kept over all layers (and of each registered kind the plan cuts)."""
        return {
            "heads": sum(map(len, self.heads)) / (self.num_heads * self.num_layers),
            "neurons": sum(map(len, self.neurons)) / (self.intermediate_size * self.num_layers),
            "layers": len(self.kept_layers) / self.num_layers,
            "hidden": self.hidden_channels / self.hidden_size,
            **{name: len(u["kept"]) / u["size"] for name, u in self.units.items()},
        }

    def is_subset_of(self, other: "PrunePlan") -> bool:
        return (
            set(self.kept_layers) <= set(other.kept_layers)
            and set(self.kept_hidden) <= set(other.kept_hidden)
            and all(set(a) <= set(b) for a, b in zip(self.heads, other.heads))
            and all(set(a) <= set(b) for a, b in zip(self.neurons, other.neurons))
            and all(name in self.units and set(self.units[name]["kept"]) <= set(u["kept"])
                    for name, u in other.units.items())
        )

    # ------------------------------------------------------------------------------------------ making
    @classmethod
    def dense(cls, model_or_config: Any) -> "PrunePlan":
        """The plan that keeps everything."""
        config = getattr(model_or_config, "config", model_or_config)
        d = model_dims(config)
        return cls(
            model_type=config.model_type,
            num_heads=d["num_heads"],
            num_kv_heads=d["num_kv_heads"],
            intermediate_size=d["intermediate_size"],
            hidden_size=d["hidden_size"],
            heads=[list(range(d["num_heads"]))] * d["num_layers"],
            neurons=[list(range(d["intermediate_size"]))] * d["num_layers"],
        )

    @classmethod
    def of(cls, model: nn.Module) -> "PrunePlan":
        """The plan a model currently carries (the dense plan for an unpruned model)."""
        plan = getattr(model, "prune_plan", None)
        if plan is None:
            return cls.dense(model)
        return plan if isinstance(plan, cls) else cls.from_dict(plan)

    # ------------------------------------------------------------------------------------------ checks
    def check_compatible(self, model_or_config: Any) -> None:
        """Raise :class:`PlanMismatchError` unless the plan was made for this model's architecture."""
        config = getattr(model_or_config, "config", model_or_config)
        get_adapter(config)
        d = model_dims(config)
        mine = {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_size": self.hidden_size,
        }
        theirs = {**d, "model_type": config.model_type}
        for name, size in dense_sizes(config, self.units).items():
            mine[f"units[{name}]"], theirs[f"units[{name}]"] = self.units[name]["size"], size
        diff = {k: (v, theirs[k]) for k, v in mine.items() if theirs[k] != v}
        if diff:
            details = ", ".join(f"{k}: plan {a} vs model {b}" for k, (a, b) in diff.items())
            raise PlanMismatchError(
                f"this plan was made for another model ({details}). Build a plan for this model with "
                "hf_prune.build_plan(...) or load the plan saved with its own base model."
            )

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["units"]:  # plans without registered kinds keep the spelling they always had
            del data["units"]
        return {"format_version": 1, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        data = dict(data)
        data.pop("format_version", None)
        try:
            return cls(**data)
        except TypeError as e:
            raise PlanMismatchError(f"not a valid hf_prune plan: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | PathLike) -> "PrunePlan":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def summary(self) -> str:
        """One line per layer: kept heads and neurons (or that the layer is removed), and the hidden width kept."""
        rows = [f"{'layer':>5} {'heads':>7} {'neurons':>9}"]
        if self.hidden is not None:
            rows.insert(0, f"hidden channels {self.hidden_channels}/{self.hidden_size}")
        for name, u in self.units.items():
            rows.insert(0, f"{name} {len(u['kept'])}/{u['size']}")
        kept = set(self.kept_layers)
        for i, s in enumerate(self.layer_sizes()):
            if i not in kept:
                rows.append(f"{i:>5} {'removed':>17}")
                continue
            rows.append(
                f"{i:>5} {s['num_heads']:>3}/{self.num_heads:<3} {s['intermediate_size']:>4}/{self.intermediate_size}"
            )
        return "\n".join(rows)

