"""``PruningCallback``: prune inside any existing ``transformers.Trainer`` by masking, on a schedule.

The callback never reshapes parameters (the optimizer would keep stale tensors). It hooks head/neuron masks
into the forward pass, keeps the weights of masked units at zero through optimizer steps, and leaves a plan
that :func:`hf_prune.apply_plan_` turns into a physically smaller model with the same outputs::

    trainer = Trainer(model, args, ..., callbacks=[PruningCallback(PruningConfig(flops_keep=0.5),
                                                   PruningSchedule("gradual", start_step=100, end_step=600))])
    trainer.train()
    hf_prune.apply_plan_(trainer.model, trainer.callback_handler.callbacks[-1].plan)  # or callback.prune_model_()

The pruning statistics (``prune/flops_kept``, ...) join every log. Trainer runs its reporting callbacks
(TensorBoard, W&B, ...) before the ones passed in ``callbacks=``, so for them to log the statistics too, add the
callback with ``PruningCallback(...).add_to(trainer)``, which puts it first; ``PruningTrainer`` does that itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import PruningConfig
from .costs import CostModel, count_params
from .criteria import get_criterion
from .distributed import broadcast_parameters_, is_main
from .mask_controller import MaskController
from .methods import MethodContext, get_method
from .model_kinds import inner_model, pruning_view
from .plan import PrunePlan
from .schedule import PruningSchedule
from .surgery import apply_plan_


class PruningCallback(TrainerCallback, ExportableState):
    """Mask heads and neurons, and gate whole layers, on a schedule inside a ``Trainer`` run.

    With ``layers_keep``, the layers to remove are gated: at once for one-shot and iterative schedules; a gradual
    schedule chooses them at its first event and fades their gates from 1 to 0 along its cubic, reaching 0 (the
    layer skipped, exactly what removing it computes) at ``end_step``.

    Args:
        config: budget and importance criterion (:class:`PruningConfig`, or its dict).
        schedule: when to prune (:class:`PruningSchedule`, or its dict); default one-shot at step 0.
        calibration_dataloader: batches to score at each event. Without it, ``fisher``/``taylor`` scores
            come from the mask gradients of the real training steps since the last event (batch-level
            statistics; under DDP summed over processes), and ``magnitude``/``random`` need no data.
    """

    def __init__(
        self,
        config: PruningConfig | Mapping[str, Any],
        schedule: PruningSchedule | Mapping[str, Any] | None = None,
        calibration_dataloader: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        self.config = config if isinstance(config, PruningConfig) else PruningConfig.from_dict(dict(config))
        self.schedule = (
            schedule if isinstance(schedule, PruningSchedule) else PruningSchedule(**dict(schedule or {}))
        )
        self.calibration_dataloader = calibration_dataloader
        method = get_method(self.config.method)
        if method.once_at_start and (self.schedule.kind != "one_shot" or self.schedule.start_step != 0):
            raise ValueError(
                f"method={method.name!r} is a one-shot cut of the trained model: use the default schedule "
                f"(one_shot at start_step=0), not {self.schedule.kind} from step {self.schedule.start_step}; "
                "for a gradual schedule use method='one_shot'"
            )
        if method.needs_data and calibration_dataloader is None:
            raise ValueError(f"method={method.name!r} needs calibration data: pass calibration_dataloader=...")
        if self.config.depth_search and self.schedule.kind != "one_shot":
            raise ValueError(f"depth_search chooses the layer count at one one-shot event, not on a "
                             f"{self.schedule.kind} schedule: use a one_shot schedule, or set layers_keep (a gradual "
                             "schedule fades those layers out)")
        hidden = self.config.hidden_keep
        if hidden is not None and hidden > 1 and self.schedule.kind != "one_shot":
            raise ValueError(f"hidden_keep={hidden} is a channel count, and a {self.schedule.kind} schedule moves "
                             "fractions: give hidden_keep as a fraction of the hidden size")
        if (self.config.layers_keep is not None or self.config.depth_search) and calibration_dataloader is None:
            raise ValueError(f"layers_keep scores whole layers (layer_importance={self.config.layer_importance!r}) on "
                             "calibration data: pass calibration_dataloader=...")
        crit = get_criterion(self.config.importance)
        uses_gradients = method.uses_criterion and calibration_dataloader is None and crit.gradient
        if method.uses_criterion and crit.needs_data and not crit.gradient and calibration_dataloader is None:
            raise ValueError(
                f"importance={crit.name!r} needs a calibration_dataloader (it is not a gradient statistic)"
            )
        if uses_gradients and self.schedule.events()[0] == 0:
            raise ValueError(
                f"importance={self.config.importance!r} from training gradients cannot score at step 0 (no "
                "gradients yet): pass a calibration_dataloader or start the schedule at step >= 1"
            )
        self.controller: MaskController | None = None
        self.plan: PrunePlan | None = None
        self.done_events: list[int] = []
        self._restored: dict[str, Any] | None = None
        self._stats: dict[str, float] = {}
        self._scored: nn.Module | None = None  # what the steps run (set at train begin)
        self._calibration: Any = calibration_dataloader  # as batches (a list of sentences is tokenized then)

    # state for resume (stored in trainer_state.json with every checkpoint) -----------------------
    def state(self) -> dict[str, Any]:
        c = self.controller
        return {
            "args": {"config": self.config.to_dict(), "schedule": self.schedule.to_dict()},
            "attributes": {
                "done_events": list(self.done_events),
                "plan_dict": self.plan.to_dict() if self.plan is not None else None,
                "acc": None if c is None else [a.tolist() for a in c.acc_heads + c.acc_neurons],
            },
        }

    def _restore(self, state: Any) -> None:
        data = state[-1] if isinstance(state, list) else state
        attrs = data.get("attributes", {})
        self.done_events = list(attrs.get("done_events", []))
        if attrs.get("plan_dict") is not None and self.controller is not None:
            plan = PrunePlan.from_dict(attrs["plan_dict"])
            if plan.is_subset_of(self.controller.physical) and plan != self.controller.physical:
                self.controller.set_plan(plan, self.schedule.fade(self._resume_step))
            self.plan = plan
        if attrs.get("acc") and self.controller is not None:
            c = self.controller
            for t, values in zip(c.acc_heads + c.acc_neurons, attrs["acc"]):
                if len(values) == t.numel():
                    t.copy_(torch.tensor(values))

    def add_to(self, trainer: Any) -> PruningCallback:
        """Add this callback to ``trainer`` ahead of its other callbacks, so that the reporting ones (TensorBoard,
        W&B, ...) see the pruning statistics in each log. Returns the callback."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    @property
    def stats(self) -> dict[str, float]:
        """What is kept now (``prune/heads_kept``, ``prune/neurons_kept``, ``prune/layers_kept``, ``prune/flops_kept``);
        empty before training starts."""
        return dict(self._stats)

    # events --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.schedule.check_fits(state.max_steps)
        # a SentenceTransformer is masked in its encoder and scored on its embedding; a plain model is itself
        model, _, self._calibration = pruning_view(_unwrap(model), self.calibration_dataloader, self.config)
        self._scored = model
        self.controller = MaskController(model, self.config.importance, hidden=self.config.hidden_keep is not None)
        self.controller.install()
        self._dense_params = count_params(model)
        self._resume_step = state.global_step
        if state.global_step > 0:  # resuming: masks and statistics come from the checkpoint's trainer state
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if saved:
                self._restore(saved)
        if self.plan is None:
            self.plan = self.controller.plan
        if 0 in self.schedule.events() and 0 not in self.done_events and state.global_step == 0:
            self._prune_event(model, 0)
        self._update_stats(model)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.controller is not None and self.config.layers_keep is not None:
            self.controller.set_gate_(self.schedule.fade(state.global_step))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.controller is not None and self.calibration_dataloader is None:
            self.controller.accumulate_()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.zero_masked_weights_()  # optimizer moments move masked weights off zero

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step in self.schedule.events() and step not in self.done_events:
            self._prune_event(self._scored, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._stats:
            logs.update(self._stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._stats)  # Trainer copied the logs there before on_log

    def on_train_end(self, args, state, control, **kwargs):
        # Masked weights are zero, so outputs stay those of the masked model without the hooks; a gated-off layer
        # cannot be zeroed into the identity (post-LN layers normalise their input), nor can zeroed hidden channels
        # make the norms run over the kept ones, so those masks stay hooked until prune_model_ cuts.
        if self.controller is not None and (self.plan is None or (self.plan.layers is None
                                                                    and self.plan.hidden is None)):
            self.controller.remove()

    # ---------------------------------------------------------------------------------------------
    def _prune_event(self, model: nn.Module, step: int) -> None:
        assert self.controller is not None
        cfg = self.schedule.budget_at(self.config, step, self._dense_params, self.controller.physical.num_layers)
        self.plan = self._new_plan(model, cfg, step)
        self.controller.set_plan(self.plan, self.schedule.fade(step))
        self.controller.reset_statistics()
        self.done_events.append(step)
        self._update_stats(model)
        self.on_plan_update(model, step)

    def _new_plan(self, model: nn.Module, cfg: PruningConfig, step: int) -> PrunePlan:
        """This event's plan from the configured method (scores from the calibration data, or from the training
        gradients), its refit folded into the kept weights in place (same tensors, so the optimizer and DDP's
        buckets stay valid); the masks then make the model compute what the cut one would."""
        assert self.controller is not None
        method = get_method(cfg.method)
        context = MethodContext(step=step, main_process=is_main(), gradient_scores=self.controller.gradient_scores,
                                restrict=self.controller.restrict, unmasked=self._unmasked)
        plan, tuning = method.plan(model, self._calibration, cfg, context)
        if tuning is not None and method.fold is not None:
            with torch.no_grad():
                method.fold(model, tuning)
            # each rank fitted on its own calibration shard; the plan is the same everywhere (the methods reduce
            # their statistics over ranks), the refitted weights are made rank 0's
            broadcast_parameters_(model)
        return plan

    @contextlib.contextmanager
    def _unmasked(self) -> Iterator[None]:
        """The model without this callback's mask hooks (a method that scores or cuts copies of it)."""
        assert self.controller is not None
        self.controller.remove()
        try:
            yield
        finally:
            self.controller.install()

    def on_plan_update(self, model: nn.Module, step: int) -> None:
        """Called after each pruning event (``PruningTrainer`` cuts the model here)."""

    def _update_stats(self, model: nn.Module) -> None:
        if self.plan is None:
            return
        cost = CostModel.for_model(model)
        dense = PrunePlan.dense(model).layer_sizes()
        kept = self.plan.kept_fraction()
        flops = cost.with_hidden(self.plan.hidden_channels).total(self.plan.layer_sizes(), self.config.seq_len)[
            "total"] / cost.with_hidden(self.plan.hidden_size).total(dense, self.config.seq_len)["total"]
        self._stats = {"prune/heads_kept": kept["heads"], "prune/neurons_kept": kept["neurons"],
                       "prune/layers_kept": kept["layers"], "prune/flops_kept": flops,
                       **({"prune/hidden_kept": kept["hidden"]} if self.plan.hidden is not None else {}),
                       **{f"prune/{name}_kept": kept[name] for name in self.plan.units}}

    def prune_model_(self, model: nn.Module) -> nn.Module:
        """Physically remove what the callback masked (call after training)."""
        if self.plan is None:
            raise RuntimeError("no plan yet: the callback has not run a pruning event")
        if self.controller is not None:
            self.controller.remove()
        model = _unwrap(model)
        apply_plan_(inner_model(model), self.plan)  # a SentenceTransformer: its encoder
        return model


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
