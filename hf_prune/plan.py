"""``PrunePlan``: which heads and neurons each layer keeps. A JSON-serialisable value; surgery consumes it.

Indices always refer to the *dense* (original) model, so a plan replayed on the base model gives the same
pruned model, and a plan for an already pruned model is a subset of the plan it carries.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import get_adapter, model_dims

if TYPE_CHECKING:
    from .config import PruningConfig
    from .importance import ImportanceScores


class PlanMismatchError(ValueError):
    """A plan does not fit the model (or checkpoint) it is applied to."""


@dataclass
class PrunePlan:
    """Kept attention heads and FFN neurons per layer.

    Args:
        model_type: ``config.model_type`` of the model the plan was made for.
        num_heads: query heads per layer in the dense model.
        num_kv_heads: key/value heads per layer in the dense model (== num_heads without GQA).
        intermediate_size: FFN neurons per layer in the dense model.
        hidden_size: model width (a sanity check against plans for other sizes).
        heads: per layer, sorted ids of kept query heads (ids of the dense model).
        neurons: per layer, sorted ids of kept FFN neurons.
        meta: free-form provenance (criterion, budget, base model, ...).
    """

    model_type: str
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    hidden_size: int
    heads: list[list[int]]
    neurons: list[list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = [sorted(int(h) for h in hs) for hs in self.heads]
        self.neurons = [sorted(int(n) for n in ns) for ns in self.neurons]
        if len(self.heads) != len(self.neurons):
            raise PlanMismatchError(
                f"plan has {len(self.heads)} layers of heads but {len(self.neurons)} layers of neurons"
            )
        group = self.group_size
        for i, (hs, ns) in enumerate(zip(self.heads, self.neurons)):
            if len(set(hs)) != len(hs) or any(not 0 <= h < self.num_heads for h in hs):
                raise PlanMismatchError(f"layer {i}: head ids {hs} must be distinct and in [0, {self.num_heads})")
            if len(set(ns)) != len(ns) or any(not 0 <= n < self.intermediate_size for n in ns):
                raise PlanMismatchError(
                    f"layer {i}: neuron ids must be distinct and in [0, {self.intermediate_size})"
                )
            if len({h // group for h in hs}) * group != len(hs):
                raise PlanMismatchError(
                    f"layer {i}: kept heads {hs} split a key/value group of {group} query heads; with "
                    "grouped-query attention heads are kept or removed a whole group at a time"
                )

    # ------------------------------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_heads(self, layer: int) -> list[int]:
        return sorted({h // self.group_size for h in self.heads[layer]})

    def layer_sizes(self) -> list[dict[str, int]]:
        return [
            {"num_heads": len(h), "num_kv_heads": len(h) // self.group_size, "intermediate_size": len(n)}
            for h, n in zip(self.heads, self.neurons)
        ]

    def kept_fraction(self) -> dict[str, float]:
        """Fractions of heads and neurons kept over all layers."""
        return {
            "heads": sum(map(len, self.heads)) / (self.num_heads * self.num_layers),
            "neurons": sum(map(len, self.neurons)) / (self.intermediate_size * self.num_layers),
        }

    def is_subset_of(self, other: "PrunePlan") -> bool:
        return all(set(a) <= set(b) for a, b in zip(self.heads, other.heads)) and all(
            set(a) <= set(b) for a, b in zip(self.neurons, other.neurons)
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
        diff = {k: (v, theirs[k]) for k, v in mine.items() if theirs[k] != v}
        if diff:
            details = ", ".join(f"{k}: plan {a} vs model {b}" for k, (a, b) in diff.items())
            raise PlanMismatchError(
                f"this plan was made for another model ({details}). Build a plan for this model with "
                "hf_prune.build_plan(...) or load the plan saved with its own base model."
            )

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": 1, **asdict(self)}

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
        """One line per layer: kept heads and neurons."""
        rows = [f"{'layer':>5} {'heads':>7} {'neurons':>9}"]
        for i, s in enumerate(self.layer_sizes()):
            rows.append(
                f"{i:>5} {s['num_heads']:>3}/{self.num_heads:<3} {s['intermediate_size']:>4}/{self.intermediate_size}"
            )
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- budgets


@dataclass
class _Unit:
    """A prunable unit: one head group, or one block of ``round_to`` neurons, of one layer."""

    layer: int
    ids: list[int]
    score: float
    cost: float


def _head_units(scores: torch.Tensor, group: int, cost: float) -> list[list[_Unit]]:
    """Per layer, available head groups sorted best first. ``scores``: (L, H), NaN = already removed."""
    out = []
    for i, row in enumerate(scores):
        g = row.view(-1, group)  # (KV, group)
        units = [
            _Unit(i, list(range(k * group, (k + 1) * group)), float(g[k].sum()), cost)
            for k in range(g.shape[0])
            if not torch.isnan(g[k]).any()
        ]
        out.append(sorted(units, key=lambda u: -u.score))
    return out


def _neuron_units(scores: torch.Tensor, round_to: int, cost: float) -> list[list[_Unit]]:
    """Per layer, blocks of ``round_to`` neurons, best neurons first. ``scores``: (L, I)."""
    out = []
    for i, row in enumerate(scores):
        avail = (~torch.isnan(row)).nonzero().view(-1)
        order = avail[torch.argsort(row[avail], descending=True, stable=True)].tolist()
        blocks = [order[j : j + round_to] for j in range(0, len(order), round_to)]
        out.append([_Unit(i, b, float(row[b].sum()), cost * len(b)) for b in blocks])
    return out


def _normalise_(units: list[list[_Unit]], unit_cost: float) -> None:
    """Put a criterion whose heads and neurons are on unrelated scales on one scale: a unit of average
    score is worth its cost, so uniform scores give a uniform cut."""
    flat = [u for layer in units for u in layer]
    mean = sum(u.score for u in flat) / max(1, sum(u.cost for u in flat) / unit_cost)
    for u in flat:
        u.score = u.score / mean * unit_cost if mean > 0 else u.cost


def _take_count(units: list[list[_Unit]], n_keep: int, allocation: str, floor: int) -> list[list[_Unit]]:
    """Keep ``n_keep`` units' worth of ids (per layer for uniform, in total for global), never more."""
    if allocation == "uniform":
        kept = []
        for layer in units:
            chosen, n = [], 0
            for u in layer:
                if n + len(u.ids) > n_keep and len(chosen) >= min(floor, len(layer)):
                    break
                chosen.append(u)
                n += len(u.ids)
            kept.append(chosen)
        return kept
    kept = [layer[: min(floor, len(layer))] for layer in units]
    n = sum(len(u.ids) for layer in kept for u in layer)
    nxt = [len(k) for k in kept]
    pool = sorted((u for i, layer in enumerate(units) for u in layer[nxt[i] :]), key=lambda u: -u.score)
    for u in pool:
        # Within a layer units are taken in order, so ids stay the layer's best.
        if n + len(u.ids) > n_keep or units[u.layer][nxt[u.layer]] is not u:
            continue
        kept[u.layer].append(u)
        nxt[u.layer] += 1
        n += len(u.ids)
    return kept


def _take_budget(
    heads: list[list[_Unit]], neurons: list[list[_Unit]], budget: float, allocation: str, floor: int
) -> tuple[list[list[_Unit]], list[list[_Unit]]]:
    """Maximise kept score under a cost budget. Tries every number of head units (per layer for uniform,
    in total for global) and fills what is left with the best neuron blocks."""
    L = len(heads)
    h_floor = [min(floor, len(x)) for x in heads]
    n_floor = [min(floor, len(x)) for x in neurons]
    fixed = sum(u.cost for i in range(L) for u in heads[i][: h_floor[i]] + neurons[i][: n_floor[i]])
    if fixed > budget:
        raise ValueError(
            f"budget unreachable: it allows {budget:.4g} but keeping one head group and one neuron block per "
            f"layer already costs {fixed:.4g}; raise the budget or set allow_empty_layers=True"
        )

    neuron_pool = sorted((u for i, x in enumerate(neurons) for u in x[n_floor[i] :]), key=lambda u: -u.score)

    def fill(kept: list[list[_Unit]], units: list[list[_Unit]], left: float) -> float:
        """Add neuron blocks best-first (each layer in its own order) while they fit; return what is left."""
        nxt = [len(k) for k in kept]
        for u in neuron_pool:
            if u.cost <= left + 1e-9 and units[u.layer][nxt[u.layer]] is u:
                kept[u.layer].append(u)
                nxt[u.layer] += 1
                left -= u.cost
        return left

    best: tuple[float, list[list[_Unit]], list[list[_Unit]]] | None = None
    if allocation == "uniform":
        max_h = max((len(x) for x in heads), default=0)
        for k in range(min(h_floor or [0]), max_h + 1):
            kh = [x[: max(k, h_floor[i])] for i, x in enumerate(heads)]
            left = budget - sum(u.cost for x in kh for u in x) - sum(
                u.cost for i in range(L) for u in neurons[i][: n_floor[i]]
            )
            if left < -1e-9:
                break
            kn = [x[: n_floor[i]] for i, x in enumerate(neurons)]
            # Same number of neuron blocks in every layer: add block rounds while a whole round fits.
            depth = max(n_floor or [0])
            while True:
                extra = [x[depth] for i, x in enumerate(neurons) if depth < len(x) and depth >= n_floor[i]]
                cost = sum(u.cost for u in extra)
                if not extra or cost > left + 1e-9:
                    break
                for u in extra:
                    kn[u.layer].append(u)
                left -= cost
                depth += 1
            score = sum(u.score for x in kh + kn for u in x)
            if best is None or score > best[0]:
                best = (score, kh, kn)
    else:
        base_h = [x[: h_floor[i]] for i, x in enumerate(heads)]
        pool = sorted((u for i, x in enumerate(heads) for u in x[h_floor[i] :]), key=lambda u: -u.score)
        for n_h in range(len(pool) + 1):
            kh = [list(x) for x in base_h]
            for u in pool[:n_h]:
                kh[u.layer].append(u)
            for x in kh:  # keep each layer's heads in its own best-first order
                x.sort(key=lambda u: -u.score)
            left = budget - fixed - sum(u.cost for u in pool[:n_h])
            if left < -1e-9:
                break
            kn = [x[: n_floor[i]] for i, x in enumerate(neurons)]
            fill(kn, neurons, left)
            score = sum(u.score for x in kh + kn for u in x)
            if best is None or score > best[0]:
                best = (score, kh, kn)
    assert best is not None
    return best[1], best[2]


def build_plan(scores: "ImportanceScores", model: nn.Module, config: "PruningConfig") -> PrunePlan:
    """Choose the heads and neurons to keep from ``scores`` under ``config``'s budget.

    Heads of a grouped-query-attention model are chosen a whole key/value group at a time; neurons in
    blocks of ``config.round_to``. Unless ``config.allow_empty_layers``, each layer keeps at least one
    head group and one neuron block. Never exceeds the budget; raises ``ValueError`` if it cannot be met.
    """
    from .costs import CostModel, count_params, model_layer_sizes

    current = PrunePlan.of(model)
    d = model_dims(model)
    L = d["num_layers"]
    if tuple(scores.heads.shape) != (L, d["num_heads"]) or tuple(scores.neurons.shape) != (
        L,
        d["intermediate_size"],
    ):
        raise PlanMismatchError(
            f"scores of shape heads {tuple(scores.heads.shape)} / neurons {tuple(scores.neurons.shape)} do not "
            f"fit this model ({L} layers, {d['num_heads']} heads, {d['intermediate_size']} neurons)"
        )
    cost = CostModel.for_model(model)
    group = current.group_size
    floor = 0 if config.allow_empty_layers else 1
    flops = config.flops_keep is not None
    seq = config.seq_len if flops else None
    head_cost = group * (cost.head_flops(seq) if flops else cost.head_params) + (
        cost.kv_flops(seq) if flops else cost.kv_params
    )
    neuron_cost = cost.neuron_flops(seq) if flops else cost.neuron_params
    heads = _head_units(scores.heads, group, head_cost)
    neurons = _neuron_units(scores.neurons, config.round_to, neuron_cost)

    if config.flops_keep is None and config.target_params is None:
        kh = heads
        if config.heads_keep is not None:
            n = round(config.heads_keep * (L if config.allocation == "global" else 1) * d["num_kv_heads"])
            kh = _take_count(heads, n * group, config.allocation, floor)
        kn = neurons
        if config.neurons_keep is not None:
            per = config.neurons_keep * d["intermediate_size"]
            n = int(per * L) if config.allocation == "global" else int(per) // config.round_to * config.round_to
            kn = _take_count(neurons, n, config.allocation, floor)
    else:
        if not scores.comparable:
            _normalise_(heads, head_cost)
            _normalise_(neurons, neuron_cost)
        if flops:
            budget = config.flops_keep * cost.total(PrunePlan.dense(model).layer_sizes(), seq)["total"]
        else:
            fixed_params = count_params(model) - cost.total(model_layer_sizes(model))["total"]
            budget = config.target_params - fixed_params
            if budget < 0:
                raise ValueError(
                    f"target_params={config.target_params} is unreachable: the parts pruning cannot touch "
                    f"(embeddings, norms, task head, output biases) already hold {fixed_params} parameters"
                )
        kh, kn = _take_budget(heads, neurons, budget, config.allocation, floor)

    plan = PrunePlan(
        model_type=current.model_type,
        num_heads=current.num_heads,
        num_kv_heads=current.num_kv_heads,
        intermediate_size=current.intermediate_size,
        hidden_size=current.hidden_size,
        heads=[[h for u in x for h in u.ids] for x in kh],
        neurons=[[n for u in x for n in u.ids] for x in kn],
        meta={
            **current.meta,
            "criterion": scores.criterion,
            "calibration_samples": scores.num_samples,
            "budget": config.budget(),
            "allocation": config.allocation,
            "round_to": config.round_to,
            "seq_len": config.seq_len,
        },
    )
    return plan
