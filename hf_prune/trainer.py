"""``PruningTrainer``: a ``transformers.Trainer`` that prunes, recovers (full or LoRA, optionally with
knowledge distillation from the unpruned model) and saves a reloadable pruned checkpoint, in one ``train()``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .adapters import get_adapter, is_peft
from .api import prune
from .callbacks import PruningCallback
from .checkpoint import load_plan
from .config import PruningConfig
from .distributed import broadcast_parameters_, is_distributed, is_main
from .export import save_pruned
from .model_kinds import model_kind, scored_view
from .plan import PlanMismatchError, PrunePlan
from .schedule import PruningSchedule
from .sharding import check_sharded_run, check_teacher_fits, check_whole_parameters, shard_teacher
from .surgery import apply_plan_

logger = logging.get_logger(__name__)


@dataclass
class DistillationConfig:
    """Knowledge distillation from the unpruned (teacher) model during recovery.

    Args:
        alpha: weight of the distillation loss; the task loss gets ``1 - alpha`` (``alpha=1``: no labels needed).
        temperature: softmax temperature of the logit KL (``T^2``-scaled, Hinton et al. 2015). Regression
            heads (one output) use the mean squared error to the teacher instead.
        hidden_weight: weight of the hidden-state MSE loss; 0 turns it off.
        layer_map: ``(student_layer, teacher_layer)`` pairs of the *dense* model's ``hidden_states`` indices
            (0 = embeddings, ``i + 1`` = layer ``i``'s output) for the hidden loss; after depth pruning the student
            side is mapped to the layers it kept. Default: every kept layer to the same dense layer of the teacher.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0
    layer_map: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


class _TrainerPruning(PruningCallback):
    """The schedule inside ``PruningTrainer``: masks until the last event, then a physical cut."""

    def __init__(self, trainer: "PruningTrainer", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def on_plan_update(self, model: nn.Module, step: int) -> None:
        if step == self.schedule.events()[-1] and not is_distributed():
            self.trainer._cut_now(self.plan)


class PruningTrainer(Trainer):
    """``Trainer`` that prunes ``model`` under ``pruning_config`` and recovers it while training.

    Args:
        pruning_config: budget and importance criterion. ``method="retraining_free"`` (what the GLUE recipes use)
            starts recovery from the retraining-free cut, calibrated on the calibration data below; the default
            ``one_shot`` from a plain cut by ``importance``.
        schedule: when to prune; default one-shot before the first step. Gradual/iterative schedules mask until
            their last event, then cut the model and rebuild optimizer and LR scheduler (under DDP the cut
            waits for the end of training: DDP's gradient buckets are bound to the parameter tensors). Under
            FSDP2 only the cut before training is possible (:mod:`hf_prune.sharding`).
        calibration_dataloader: batches for importance scores; default: the first
            ``pruning_config.max_calibration_samples`` samples of the training dataloader (sharded per process,
            scores summed over processes so every rank builds the same plan).
        distillation: knowledge-distillation settings, or None for plain task-loss recovery.
        teacher_model: the teacher for distillation; default: a frozen copy of ``model`` before pruning.
        recovery: ``"full"`` fine-tunes all weights; ``"lora"`` wraps the pruned model with peft LoRA, trains the
            adapters and merges them at the end (the saved checkpoint needs no peft).
        lora_config: a ``peft.LoraConfig``; default: rank 8 on the adapter's Q/K/V/O and FFN linears, with the
            task head trained in full.
        **kwargs: everything ``transformers.Trainer`` takes.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        pruning_config: PruningConfig,
        schedule: PruningSchedule | None = None,
        calibration_dataloader: Iterable[Mapping[str, Any]] | None = None,
        distillation: DistillationConfig | None = None,
        teacher_model: nn.Module | None = None,
        recovery: Literal["full", "lora"] = "full",
        lora_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if recovery not in ("full", "lora"):
            raise ValueError(f"recovery must be 'full' or 'lora', not {recovery!r}")
        self.pruning_config = pruning_config
        self.schedule = schedule or PruningSchedule()
        self.calibration_dataloader = calibration_dataloader
        self.distillation = distillation
        self.recovery = recovery
        self.lora_config = lora_config
        one_shot_at_start = self.schedule.kind == "one_shot" and self.schedule.start_step == 0
        if recovery == "lora" and not one_shot_at_start:
            raise ValueError(
                "LoRA recovery trains adapters on an already pruned model, so it needs the cut before training "
                "(schedule one_shot at start_step=0); gradual and iterative schedules train all weights"
            )
        # a SentenceTransformer trains as its embedding view (shared parameters): the loss reads the embedding
        self.outer_model = model if model_kind(model) is not None else None
        if self.outer_model is not None:
            model = scored_view(model)
            teacher_model = scored_view(teacher_model) if teacher_model is not None else None
        get_adapter(model)  # unsupported architectures and peft-wrapped models fail here, before any work
        check_whole_parameters(model)
        if distillation is not None and teacher_model is None:
            if PrunePlan.of(model) != PrunePlan.dense(model):
                raise ValueError(
                    "distillation needs a teacher: this model is already pruned, so pass the unpruned model as "
                    "teacher_model=..."
                )
            teacher_model = copy.deepcopy(model)
        self.teacher = teacher_model.eval().requires_grad_(False) if teacher_model is not None else None
        if pruning_config.deployable and getattr(args, "push_to_hub", False):
            raise ValueError(
                "deployable=True saves the final model as its stock architecture, but TrainingArguments(push_to_hub="
                "True) pushes the per-layer training checkpoints: drop push_to_hub, save with trainer.save_model(DIR) "
                "and push that folder with hf_prune.push_pruned(DIR, repo_id)"
            )
        super().__init__(model=model, args=args, **kwargs)
        check_sharded_run(self, one_shot_at_start=one_shot_at_start, recovery=recovery,
                          embedder=self.outer_model is not None)
        if self.teacher is not None:
            check_teacher_fits(self.teacher, self.args.device)
            self.teacher.to(self.args.device)
        self.plan: PrunePlan | None = None  # the plan of the cut, once made
        self._pruner: _TrainerPruning | None = None
        if not one_shot_at_start:
            # first: the reporting callbacks (TensorBoard, W&B, ...) then log the pruning statistics
            self._pruner = _TrainerPruning(self, pruning_config, self.schedule, calibration_dataloader).add_to(self)

    # ------------------------------------------------------------------------------------ train
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint and self.outer_model is not None:
            raise ValueError("resuming the recovery of a sentence-transformers model is not supported yet: train "
                             "again from the pruned model")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("no parameter of the model requires grad, so recovery would train nothing (a model "
                             "passed as teacher_model before is frozen): call model.requires_grad_(True), or pass a "
                             "copy as the teacher")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            self._rebuild_pruned_shapes(str(resume_from_checkpoint))
        elif self._pruner is None and PrunePlan.of(self._base_model()) == PrunePlan.dense(self._base_model()):
            self._one_shot_prune()
        if self.distillation is not None and self.distillation.hidden_weight > 0:
            n = len(PrunePlan.of(self._base_model()).kept_layers) + 1
            self._hidden_pairs(n)  # a layer_map into removed layers fails here, before any training
        if self.recovery == "lora" and not is_peft(self.model):
            self._wrap_lora()
        if self.teacher is not None:
            self.teacher = shard_teacher(self, self.teacher)  # after the cut: the student is sharded in train()
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self._pruner is not None and self._pruner.plan is not None:
            plan = self._pruner.plan
            if PrunePlan.of(self._base_model()) != plan:  # cut deferred (DDP) or schedule never finished
                self._pruner.prune_model_(self._base_model())
            self.plan = plan
        if is_peft(self.model):
            self.model = self.model.merge_and_unload()
            self.model_wrapped = self.model
        return output

    def _base_model(self) -> nn.Module:
        return self.model.get_base_model() if is_peft(self.model) else self.model

    def _one_shot_prune(self) -> None:
        """The cut before training: ``hf_prune.prune`` with the whole config (one-shot or retraining-free)."""
        cfg = dataclasses.replace(self.pruning_config, progress=self.pruning_config.progress and is_main())
        data = self.calibration_dataloader if self.calibration_dataloader is not None else self.get_train_dataloader()
        _, self.plan = prune(self.model, data, cfg)
        # Every rank cut the same plan (scores are reduced over ranks); retraining-free's refits used each rank's
        # own calibration shard, so the weights are made rank 0's.
        broadcast_parameters_(self.model)

    def _rebuild_pruned_shapes(self, checkpoint: str) -> None:
        """Give the model the checkpoint's pruned shapes before Trainer loads weights and optimizer state."""
        plan = load_plan(checkpoint)
        base = self._base_model()
        if plan is None:
            return  # saved before any cut: the dense shapes are right
        plan.check_compatible(base)
        current = PrunePlan.of(base)
        if plan == current:
            return
        if not plan.is_subset_of(current):
            raise PlanMismatchError(
                f"{checkpoint} holds a model pruned with a different plan than this trainer's model; resume "
                "with the unpruned base model (or the same pruned model) the run started from"
            )
        apply_plan_(base, plan)

    def _wrap_lora(self) -> None:
        from peft import get_peft_model

        config = self.lora_config or default_lora_config(self.model)
        try:
            self.model = get_peft_model(self.model, config)
        except ValueError as e:
            raise ValueError(
                f"LoRA found no modules to adapt in {type(self.model).__name__} ({e}); pass a lora_config whose "
                "target_modules name linears of this model"
            ) from e
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None

    def _cut_now(self, plan: PrunePlan) -> None:
        """Physically prune mid-training (single process) and rebuild optimizer and LR scheduler.

        The new optimizer starts with empty moments: the old ones belong to tensors that no longer exist.
        The scheduler is rebuilt and stepped to the current step, so the learning rate curve continues.
        """
        assert self._pruner is not None
        if self._pruner.controller is not None:
            self._pruner.controller.remove()
            self._pruner.controller = None
        apply_plan_(self.model, plan)
        self.optimizer = None
        self.create_optimizer()
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.lr_scheduler, self._created_lr_scheduler = None, False
        self.create_scheduler(num_training_steps=self.state.max_steps, optimizer=self.optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
            for _ in range(self.state.global_step):
                self.lr_scheduler.step()
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler

    def _load_best_model(self) -> None:
        """Trainer's best-checkpoint reload, after giving the model that checkpoint's pruned shapes."""
        best = self.state.best_model_checkpoint
        base = self._base_model()
        saved = load_plan(best) or PrunePlan.dense(base)
        current = PrunePlan.of(base)
        if saved != current:
            if not saved.is_subset_of(current):
                logger.warning(
                    f"the best checkpoint {best} predates the physical cut (its model has other shapes); keeping "
                    "the final pruned model instead"
                )
                return
            apply_plan_(base, saved)
        super()._load_best_model()

    # ------------------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``; with ``PruningConfig(deployable=True)`` the final model (not the training
        checkpoints, which resume in the per-layer format) is saved as its stock architecture. A
        sentence-transformers model is saved as a sentence-transformers folder."""
        if self.outer_model is not None and not _internal_call:
            if is_main():
                save_pruned(self.outer_model, output_dir or self.args.output_dir,
                            deployable=self.pruning_config.deployable)
            return
        if _internal_call or not self.pruning_config.deployable:
            return super().save_model(output_dir, _internal_call)
        if is_main():
            model = copy.deepcopy(self.model).merge_and_unload() if is_peft(self.model) else self.model
            save_pruned(model, output_dir or self.args.output_dir, deployable=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir or self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if is_peft(self.model) and self.outer_model is None:
            # The adapter (saved above) lets training resume; the merged model next to it is the reloadable
            # pruned checkpoint.
            merged = copy.deepcopy(self.model).merge_and_unload()
            merged.save_pretrained(output_dir or self.args.output_dir)

    # ------------------------------------------------------------------------------------ loss
    def _hidden_pairs(self, n_student: int) -> list[tuple[int, int]]:
        """``(student, teacher)`` hidden-state indices for the hidden loss. ``layer_map`` speaks of the dense
        model's indices on both sides; after layers are removed they are mapped to the student's own."""
        assert self.distillation is not None
        kept = PrunePlan.of(self._base_model()).kept_layers
        where = _student_hidden_index(kept, n_student)
        pairs = self.distillation.layer_map or [(i, i) for i in where]
        gone = [(s, t) for s, t in pairs if s not in where]
        if gone:
            raise ValueError(
                f"DistillationConfig.layer_map pairs {gone} point at student hidden states of layers the plan removes "
                f"(kept dense layers: {kept}; index i + 1 is layer i's output): drop those pairs or keep the layers"
            )
        return [(where[s], t) for s, t in pairs]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kd = self.distillation
        if kd is None or self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden = kd.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=hidden) if hidden else model(**inputs)
        features = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_out = self.teacher(**features, output_hidden_states=hidden) if hidden else self.teacher(**features)
        if getattr(outputs, "logits", None) is None:  # an embedding model: match the teacher's embedding
            loss = kd.alpha * embedding_distillation_loss(outputs.last_hidden_state, teacher_out.last_hidden_state)
        else:
            loss = kd.alpha * distillation_loss(outputs.logits, teacher_out.logits, kd.temperature,
                                                inputs.get("attention_mask"))
        if kd.alpha < 1:
            if outputs.get("loss") is None:
                raise ValueError("the batch has no labels: set DistillationConfig(alpha=1.0) to train on the teacher alone")
            loss = loss + (1 - kd.alpha) * outputs.loss
        if hidden:
            pairs = self._hidden_pairs(len(outputs.hidden_states))
            kept = PrunePlan.of(self._base_model()).kept_hidden  # a narrower student matches the channels it kept
            hid = sum(F.mse_loss(outputs.hidden_states[s], _channels(teacher_out.hidden_states[t], kept,
                                                                     outputs.hidden_states[s].shape[-1]))
                      for s, t in pairs)
            loss = loss + kd.hidden_weight * hid / len(pairs)
        return (loss, outputs) if return_outputs else loss


def _channels(teacher: torch.Tensor, kept: list[int], width: int) -> torch.Tensor:
    """The teacher's hidden state at the channels a student of ``width`` channels kept (a masked student is full)."""
    return teacher if teacher.shape[-1] == width else teacher[..., kept]


def _student_hidden_index(kept: list[int], n_student: int) -> dict[int, int]:
    """Dense ``hidden_states`` index -> the student's: 0 = embeddings, ``i + 1`` = the output of dense layer ``i``.
    A model with every layer (masked or not yet cut) maps each index to itself."""
    if n_student != len(kept) + 1:
        return {i: i for i in range(n_student)}
    return {0: 0, **{i + 1: p + 1 for p, i in enumerate(kept)}}


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over examples (or tokens, for
    per-token logits with their padding excluded); MSE for single-output regression heads."""
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    q = F.softmax(teacher.float() / temperature, dim=-1)
    kl = (q * (q.clamp_min(1e-12).log() - log_p)).sum(-1)  # (B,) or (B, T)
    if kl.dim() == 2 and attention_mask is not None:
        w = attention_mask.to(kl.dtype)
        return (kl * w).sum() / w.sum().clamp_min(1) * temperature**2
    return kl.mean() * temperature**2


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared distance between the student's and the teacher's sentence embeddings ``(B, D)``, summed over the
    dimensions and averaged over sentences (sentence-transformers' MSE distillation, scaled by ``D``; for normalised
    embeddings it is ``2 (1 - cos)``)."""
    return (student.float() - teacher.float()).pow(2).sum(-1).mean()


def default_lora_config(model: nn.Module, r: int = 8) -> Any:
    """LoRA on the adapter's attention and FFN linears; the task head (if any) trained in full."""
    from peft import LoraConfig

    a = get_adapter(model)
    targets = [p for p in (a.q, a.k, a.v, a.o, a.up, a.gate, a.down) if p]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)  # None: a wrapper (a SentenceTransformer's view), no head
    heads = [
        name for name, child in model.named_children()
        if prefix is not None and name != prefix and child is not out_emb and any(True for _ in child.parameters())
    ]
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, modules_to_save=heads or None)

