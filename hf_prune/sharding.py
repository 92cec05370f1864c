"""Recovery under FSDP2: what ``PruningTrainer`` needs from a sharded run.

FSDP2 (``torch.distributed.fsdp.fully_shard``, driven by accelerate from the ``Trainer``) shards every parameter
along its first dimension when the Trainer prepares the model, inside ``train()``. A cut reshapes parameters, so it
has to come before that: ``PruningTrainer`` prunes one-shot (or retraining-free) at the start of ``train()``, on the
ordinary model, with the same plan on every rank; the cut model is an ordinary (uneven) model and is then sharded and
trained like any other. The frozen KD teacher is sharded the same way (it has no optimizer state, so each rank holds
its shard of the weights and gathers one layer at a time for the forward pass). Saves go through the Trainer's FSDP
path (the full state dict gathered, written by rank 0 as the usual pruned checkpoint).

What cannot be honoured sharded is refused here, before any work, with the reason and the alternative.
"""

from __future__ import annotations

from typing import Any

from torch import nn

try:  # public from torch 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch 2.4 and 2.5
    from torch.distributed._composable.fsdp import FSDPModule


def sharding_engine(trainer: Any) -> str | None:
    """``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"`` or None: the engine that shards ``trainer``'s parameters."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    plugin = trainer.accelerator.state.fsdp_plugin
    return "fsdp2" if getattr(plugin, "fsdp_version", 1) == 2 else "fsdp1"


def check_sharded_run(trainer: Any, *, one_shot_at_start: bool, recovery: str, embedder: bool) -> None:
    """Refuse the settings a sharded recovery cannot honour (no-op without FSDP/DeepSpeed)."""
    engine = sharding_engine(trainer)
    if engine is None:
        return
    if engine == "deepspeed":
        raise NotImplementedError(
            "PruningTrainer does not run under DeepSpeed (ZeRO-3 is not tested on this project's machines): use "
            "FSDP2 for sharded recovery (TrainingArguments(fsdp='full_shard', fsdp_config={'fsdp_version': 2}) or "
            "accelerate's FSDP2 config), or DDP"
        )
    if engine == "fsdp1":
        raise NotImplementedError(
            "PruningTrainer needs FSDP2 (fsdp_version 2): FSDP1 flattens parameters into buffers hf_prune's surgery "
            "and checkpoints cannot read; set fsdp_config={'fsdp_version': 2} (or fsdp_version: 2 in accelerate's "
            "config)"
        )
    if not one_shot_at_start:
        raise ValueError(
            "under FSDP2 the cut must come before training: a gradual or iterative schedule masks and then cuts "
            "parameters FSDP2 has already sharded. Prune before training (schedule one_shot at start_step=0, with "
            "method 'one_shot' or 'retraining_free'), or run this schedule under DDP"
        )
    if recovery == "lora":
        raise NotImplementedError(
            "LoRA recovery under FSDP2 is not supported: merging the adapters at the end needs the full weights. "
            "LoRA's optimizer state is small, so run it under DDP, or use recovery='full' under FSDP2"
        )
    if trainer.pruning_config.deployable:
        raise ValueError(
            "deployable=True under FSDP2 is not supported (the stock export is built from full weights, which only "
            "the gathered state dict holds): save the pruned checkpoint, then convert it with "
            "`hf-prune export DIR --format stock --output_dir OUT`"
        )
    if embedder:
        raise NotImplementedError(
            "sentence-transformers models are not recovered under FSDP2 (their folder is saved from the full "
            "model): an embedder fits one device, so use DDP"
        )


def shard_teacher(trainer: Any, teacher: nn.Module) -> nn.Module:
    """The frozen teacher prepared by the trainer's accelerator like the student (FSDP2: sharded; it has no
    optimizer, so only its weights are split). Idempotent: a teacher already sharded is returned as it is."""
    if isinstance(teacher, FSDPModule):
        return teacher
    return trainer.accelerator.prepare(teacher)
