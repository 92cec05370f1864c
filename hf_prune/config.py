"""``PruningConfig``: what to score, how much to keep, and how to spread it over layers."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .budget_kinds import set_budget
from .config_rules import check_config


@dataclass
class PruningConfig:
    """Settings of one pruning step. Set exactly one width budget: ``heads_keep``/``neurons_keep`` (either or
    both), ``flops_keep``, ``target_params``, (``method="retraining_free"`` only) ``latency_keep``, or a
    registered kind in ``custom_budget``; and/or the depth budget ``layers_keep``. The kinds are the table
    :data:`hf_prune.budget.BUDGETS`.

    Args:
        method: a registered :class:`hf_prune.methods.PruningMethod` (:func:`hf_prune.register_method` adds one).
            ``one_shot`` scores units and cuts the lowest; ``retraining_free`` is Kwon et al. (2022):
            Fisher mask search, mask rearrangement with per-layer Fisher blocks and least-squares mask
            tuning folded into the kept weights (see :mod:`hf_prune.retraining_free`). It needs
            ``importance="fisher"`` and calibration data.
        importance: scoring criterion, a name registered in :data:`hf_prune.criteria.CRITERIA` (``magnitude``,
            ``taylor``, ``fisher``, ``activation``, ``random``, or your own via ``register_criterion``).
        heads_keep: fraction of the dense model's attention heads to keep, in (0, 1].
        neurons_keep: fraction of the dense model's FFN neurons to keep, in (0, 1].
        flops_keep: fraction of the dense model's layer FLOPs (at ``seq_len`` tokens) to keep, in (0, 1];
            heads and neurons compete for it.
        target_params: total parameter count of the pruned model (embeddings and heads included).
        latency_keep: fraction of the dense encoder layers' latency to keep, in (0, 1], predicted by a
            per-layer latency table measured on the model's device at ``latency_batch_size`` x ``seq_len``
            (``retraining_free`` only).
        layers_keep: depth budget: the layers to keep, a fraction of the dense model's layers in (0, 1] or a
            whole count above 1; the lowest-scoring layers (``layer_importance``) are removed whole. Alone, or with
            one width budget, which then counts the removed layers as saved (``flops_keep=0.4, layers_keep=0.5``:
            half the layers go, and heads and neurons of the rest are cut until 40% of the FLOPs remain).
        hidden_keep: hidden-width budget: the residual (hidden) channels to keep, a fraction of the dense hidden size
            in (0, 1] or a whole count above 1 (a fraction of a width that is a multiple of 32 keeps a multiple of
            32: llama.cpp's quant blocks and kernels; a count is taken as given). Every embedding, projection, norm
            and output layer loses the same channels (:mod:`hf_prune.channels`). Alone, or with one width budget
            and/or ``layers_keep``: the channels are chosen first (``hidden_importance``) and the width budget is
            spent at the kept width (``target_params=...``: every head and neuron then costs less, the embeddings
            shrink with the width).
        hidden_search: with a ``flops_keep`` or ``target_params`` budget and no ``hidden_keep`` (``one_shot``): let
            the budget trade hidden channels against heads and neurons. One plan per hidden width in
            :data:`hf_prune.selection.HIDDEN_CANDIDATES` (100% down to 50% of the hidden size; the budget is spent on
            heads and neurons at each width), and the plan whose cut model's outputs are closest to the dense model's
            on the first 256 calibration samples wins (as ``depth_search`` does for layers).
        hidden_importance: how hidden channels are scored for ``hidden_keep`` and ``hidden_search``, a name in
            :data:`hf_prune.hidden.HIDDEN_CRITERIA`: ``activation`` (mean magnitude of every norm's output per channel,
            Minitron-style), ``fisher`` / ``taylor`` (squared / absolute gradient of a per-sample channel mask),
            ``magnitude`` (weights of the channel, no data), ``random``.
        layer_importance: how whole layers are scored for ``layers_keep`` and ``depth_search``, a name in
            :data:`hf_prune.depth.LAYER_CRITERIA` (``block_influence``, ``fisher``, ``skip_divergence``).
        depth_search: with a ``flops_keep`` or ``latency_keep`` budget and no ``layers_keep``: let the budget trade
            layers against heads and neurons. One plan per number of layers kept (from all of them down to the
            budget's share; the lowest-scoring layers go first, the width budget is spent on the rest); the plan
            whose cut model's outputs are closest to the dense model's (KL of the logits, squared error otherwise)
            on held-out calibration samples wins (``retraining_free``: each candidate mask-tuned on the tuning
            samples, then compared on the selection samples; ``one_shot``: the first 256 calibration samples).
        custom_budget: a budget of a kind added with :func:`hf_prune.budget.register_budget`, by name, e.g.
            ``{"my_kind": 0.5}`` (recipes and the CLI take it as JSON).
        seq_len: sequence length at which FLOPs are counted (and latency is measured).
        latency_batch_size: batch size at which the latency table for ``latency_keep`` is measured.
        rearrange: ``retraining_free``: re-choose each layer's kept units (same counts) to minimise the
            second-order loss estimate with the layer's full Fisher matrix.
        rearrange_scope: ``retraining_free``: ``layer`` (the paper's) swaps units inside each layer; ``model`` then
            also swaps heads for heads and neurons for neurons between layers (same budget), with the whole
            cross-layer Fisher of all masks (terms between layers and between heads and neurons included; ``N^2``
            floats for ``N`` masks, refused above 20k masks). Needs ``allocation="global"``,
            ``round_to=1``, ``head_unit="kv_group"`` and a FLOPs, parameter or head/neuron budget. Measured in the
            README (retraining-free section).
        mask_tuning: ``retraining_free``: layer by layer, fit the cut layers to reconstruct the dense model's
            layers on calibration data (least squares) and fold the fit into the kept weights.
        tuning_fit: ``retraining_free``: what mask tuning fits. ``weights``: the whole attention-output and
            FFN down projections of each cut layer (weights and biases, ridge towards the cut weights);
            ``scales``: one scale per kept head and neuron, as in Kwon et al. Same cost; how much closer to the
            dense model ``weights`` lands is measured in ``benchmarks/results/retraining_free.md``. Both give an
            ordinary smaller model.
        obs_reselection: ``retraining_free`` with ``tuning_fit="weights"``: also tune a candidate whose kept heads
            and neurons (same counts per layer) are re-chosen by OBS elimination on the tuning's own least squares
            (ZipLM-style, :mod:`hf_prune.retraining_free.obs`); ``select_stages`` keeps it only if it is closer on
            the held-out samples (without selection it replaces the rearranged units). About 40-50 s more per cut
            on MiniLM; what it gains is in the README (retraining-free section).
        tuning_samples: ``retraining_free``: calibration samples the mask tuning fits on (the first ones; None =
            all).
        select_stages: ``retraining_free``: keep the stage (search, rearranged, tuned; when rearrangement changed
            the plan, the search plan is tuned too; with ``tuning_fit="weights"``, the final plan is also tuned
            with scales, the fallback when the weights fit overfits few tokens) whose cut model is
            closest to the dense model's outputs (KL of logits, squared error for regression and hidden states)
            on ``selection_samples`` calibration samples that the tuning did not fit on. Each stage optimises a
            proxy, and on some models rearrangement or tuning makes the real outputs worse.
        selection_samples: ``retraining_free``: held-out calibration samples for ``select_stages``.
        selection_metric: ``retraining_free``: what ``select_stages`` (and ``depth_search``) minimise on the
            held-out samples: ``divergence`` from the dense model's outputs (no labels needed) or ``task_loss``,
            the model's own loss on the samples' ``labels`` (the calibration data must carry them).
        allocation: ``global`` ranks units of all layers together; ``uniform`` keeps the same number in
            every layer.
        round_to: keep FFN neurons per layer in multiples of this (e.g. 8 or 64, for fast kernels).
        head_unit: under grouped-query attention, what is kept or removed as one: ``kv_group`` (a key/value
            head with all its query heads) or ``query_head`` (single query heads; a KV head goes with its last
            query head). Attention repeats each KV head for a fixed number of query heads, so with ``query_head``
            every kept KV head of a layer keeps the same number of its query heads: each layer chooses how many
            KV heads and how many query heads per KV head to keep (a model with one KV head, like Gemma-3-270M,
            can lose attention heads only this way). With ``method="retraining_free"`` the search ranks query heads
            by their Fisher diagonal and the rearrangement swaps query heads inside the kept groups. Without
            grouped-query attention both mean one head.
        deployable: aim for a checkpoint that stock transformers and serving runtimes load without custom code:
            every layer keeps the same shape (needs ``allocation="uniform"``; ``layers_keep`` is fine), and recipes,
            the CLI and ``PruningTrainer.save_model`` save the stock architecture (:func:`hf_prune.save_stock`);
            a shape the family's stock config cannot express fails before anything is written.
        allow_empty_layers: allow a layer to lose its whole attention block or FFN block. By default
            every layer keeps at least one head (group) and one block of ``round_to`` neurons.
        max_calibration_samples: samples scored from the dataloader (data criteria only).
        seed: for the ``random`` criterion and label-free projections.
        offload: run the gradient passes (Fisher/Taylor scores, the retraining-free Fisher, ``fisher`` layer scores)
            one layer at a time: each backward holds one layer's activations, the layer boundaries of the batch wait
            on the CPU, and a layer whose weights accelerate offloads (``cpu_offload``) is brought to the execution
            device only for its own turn. Same plan as in memory, one more forward pass
            (:mod:`hf_prune.gradients`). Hidden-channel gradient criteria span the whole model and are refused.
            The retraining-free stage selection and fidelity then run their candidates on the model itself under
            masks (no cut copy beside it), at the dense FLOPs.
        progress: show progress bars.
    """

    method: str = field(
        default="one_shot", metadata={"help": "Registered pruning method: one_shot, retraining_free, or your own."}
    )
    importance: str = field(
        default="fisher",
        metadata={"help": "Unit criterion: magnitude, taylor, fisher, activation, random, or a registered one."},
    )
    heads_keep: float | None = field(default=None, metadata={"help": "Fraction of attention heads to keep, in (0, 1]."})
    neurons_keep: float | None = field(default=None, metadata={"help": "Fraction of FFN neurons to keep, in (0, 1]."})
    flops_keep: float | None = field(default=None, metadata={"help": "Fraction of the layer FLOPs to keep, in (0, 1]."})
    target_params: int | None = field(default=None, metadata={"help": "Total parameter count of the pruned model."})
    latency_keep: float | None = field(
        default=None, metadata={"help": "Fraction of measured layer latency to keep (retraining_free)."}
    )
    layers_keep: float | None = field(
        default=None, metadata={"help": "Layers to keep: a fraction in (0, 1] or a count above 1."}
    )
    hidden_keep: float | None = field(
        default=None, metadata={"help": "Hidden (residual) channels to keep: a fraction in (0, 1] or a count above 1."}
    )
    hidden_search: bool = field(
        default=False, metadata={"help": "Let a flops/params budget trade hidden channels against heads and neurons."}
    )
    hidden_importance: str = field(
        default="activation", metadata={"help": "Hidden-channel criterion: activation, fisher, taylor, magnitude, random."}
    )
    layer_importance: str = field(
        default="block_influence", metadata={"help": "Whole-layer criterion: block_influence, fisher, skip_divergence."}
    )
    depth_search: bool = field(
        default=False, metadata={"help": "Let a flops/latency budget trade layers against heads and neurons."}
    )
    custom_budget: dict[str, float] | None = field(
        default=None, metadata={"help": "A registered budget kind and its value, e.g. {\"my_kind\": 0.5}."}
    )
    seq_len: int = field(default=128, metadata={"help": "Tokens at which FLOPs are counted and latency measured."})
    latency_batch_size: int = field(default=1, metadata={"help": "Batch size of the latency table (latency_keep)."})
    rearrange: bool = field(
        default=True, metadata={"help": "retraining_free: re-choose kept units with each layer's Fisher matrix."}
    )
    rearrange_scope: Literal["layer", "model"] = field(
        default="layer", metadata={"help": "retraining_free: swap units inside a layer, or also between layers."}
    )
    mask_tuning: bool = field(
        default=True, metadata={"help": "retraining_free: least-squares fit of each cut layer, folded in."}
    )
    tuning_fit: Literal["weights", "scales"] = field(
        default="weights", metadata={"help": "retraining_free: fit whole output projections or per-unit scales."}
    )
    obs_reselection: bool = field(
        default=False, metadata={"help": "retraining_free: also try units re-chosen by OBS elimination."}
    )
    tuning_samples: int | None = field(
        default=256, metadata={"help": "retraining_free: calibration samples the tuning fits on (None = all)."}
    )
    select_stages: bool = field(
        default=True, metadata={"help": "retraining_free: keep the stage closest to dense on held-out data."}
    )
    selection_samples: int = field(
        default=256, metadata={"help": "retraining_free: held-out samples for select_stages."}
    )
    selection_metric: Literal["divergence", "task_loss"] = field(
        default="divergence", metadata={"help": "Selection minimises divergence from dense outputs, or task_loss."}
    )
    allocation: Literal["global", "uniform"] = field(
        default="global", metadata={"help": "Rank units across layers (global) or keep the same count per layer."}
    )
    round_to: int = field(default=1, metadata={"help": "Keep FFN neurons per layer in multiples of this."})
    head_unit: Literal["kv_group", "query_head"] = field(
        default="kv_group", metadata={"help": "Under GQA, remove whole KV groups or single query heads."}
    )
    allow_empty_layers: bool = field(
        default=False, metadata={"help": "Allow a layer to lose its whole attention or FFN block."}
    )
    deployable: bool = field(
        default=False, metadata={"help": "Same shape in every layer: save the stock architecture (no custom code)."}
    )
    max_calibration_samples: int | None = field(
        default=2048, metadata={"help": "Calibration samples scored (data criteria)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random criterion and label-free projections."})
    offload: bool = field(
        default=False, metadata={"help": "Gradient passes one layer at a time (memory of one layer's activations)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        check_config(self)  # the table in config_rules.py

    def budget(self) -> dict[str, Any]:
        """The budget fields that are set."""
        return set_budget(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningConfig":
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown PruningConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)


#: Fields a command line takes as JSON text (argparse has no dict type).
JSON_FIELDS = ("custom_budget",)


def flag_fields(*, lists: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """PruningConfig's fields as ``make_dataclass`` entries for ``HfArgumentParser``: same names, types and
    defaults and ``--help`` text (each field's ``metadata["help"]``); ``lists`` take several values (one run each),
    dict fields JSON text. The recipes' and the CLI's arguments are made from this, so every field is a recipe key
    and a flag."""
    types = typing.get_type_hints(PruningConfig)
    out = []
    for f in fields(PruningConfig):
        if f.name in exclude:
            continue
        help_text = f.metadata["help"]
        if f.name in lists:
            out.append((f.name, list[types[f.name].__args__[0]] | None,  # type: ignore[index]
                        field(default=None, metadata={"help": help_text + " (several values: one run each)"})))
        elif f.name in JSON_FIELDS:
            out.append((f.name, str | None, field(default=None, metadata={"help": help_text + " (JSON)"})))
        else:
            out.append((f.name, types[f.name], field(default=f.default, metadata={"help": help_text})))
    return out


def from_flag(name: str, value: Any) -> Any:
    """A parsed flag's value as the PruningConfig field takes it (JSON text -> dict)."""
    if name in JSON_FIELDS and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} must be JSON, e.g. '{{\"my_kind\": 0.5}}': {e}") from e
    return value
