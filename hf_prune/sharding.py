"""Recovery under FSDP2 and DeepSpeed ZeRO: what ``PruningTrainer`` needs from a sharded run.

FSDP2 (``torch.distributed.fsdp.fully_shard``, driven by accelerate from the ``Trainer``) shards every parameter
along its first dimension when the Trainer prepares the model, inside ``train()``; DeepSpeed ZeRO-3 partitions every
parameter when the Trainer initialises its engine there (stages 1 and 2 partition only optimizer state and
gradients). A cut reshapes parameters, so it has to come before that: ``PruningTrainer`` prunes one-shot (or
retraining-free) at the start of ``train()``, on the ordinary model, with the same plan on every rank; the cut model
is an ordinary (uneven) model and is then sharded and trained like any other. The frozen KD teacher is sharded the
same way (FSDP2: ``fully_shard``; ZeRO-3: an engine of its own without optimizer, as TRL does for its reference
models), so each rank holds its shard of the weights and gathers one layer at a time for the forward pass. Saves
gather the full state dict, written by rank 0 as the usual pruned checkpoint (ZeRO-3 only does that with
``stage3_gather_16bit_weights_on_model_save``, so it is required).

What cannot be honoured sharded is refused here, before any work, with the reason and the alternative.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
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


#: how the refusals name each engine
_NAMES = {"fsdp2": "FSDP2", "deepspeed": "DeepSpeed ZeRO"}


def check_whole_parameters(model: nn.Module) -> None:
    """Refuse a model whose parameters ZeRO-3 partitioned at load time (before anything else reads them)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "the model's parameters are already partitioned by DeepSpeed ZeRO-3 (it was loaded after "
            "TrainingArguments(deepspeed=...) with stage 3 existed, so from_pretrained used deepspeed.zero.Init), and "
            "hf_prune cuts whole tensors before DeepSpeed wraps the model: load the model before creating the "
            "TrainingArguments"
        )


def check_sharded_run(trainer: Any, *, one_shot_at_start: bool, recovery: str, embedder: bool) -> None:
    """Refuse the settings a sharded recovery cannot honour (no-op without FSDP/DeepSpeed)."""
    engine = sharding_engine(trainer)
    if engine is None:
        return
    if engine == "deepspeed":
        zero = _deepspeed_config(trainer).get("zero_optimization", {})
        if zero.get("stage", 0) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ValueError(
                "under ZeRO-3 DeepSpeed saves only its partitions unless told to gather, and a pruned checkpoint "
                "needs the full weights: set \"stage3_gather_16bit_weights_on_model_save\": true in the DeepSpeed "
                "config's zero_optimization"
            )
    if engine == "fsdp1":
        raise NotImplementedError(
            "PruningTrainer needs FSDP2 (fsdp_version 2): FSDP1 flattens parameters into buffers hf_prune's surgery "
            "and checkpoints cannot read; set fsdp_config={'fsdp_version': 2} (or fsdp_version: 2 in accelerate's "
            "config)"
        )
    if not one_shot_at_start:
        raise ValueError(
            f"under {_NAMES[engine]} the cut must come before training: a gradual or iterative schedule masks and "
            f"then cuts parameters {_NAMES[engine]} has already sharded. Prune before training (schedule one_shot at "
            "start_step=0, with method 'one_shot' or 'retraining_free'), or run this schedule under DDP"
        )
    if recovery == "lora":
        raise NotImplementedError(
            f"LoRA recovery under {_NAMES[engine]} is not supported: merging the adapters at the end needs the full "
            f"weights. LoRA's optimizer state is small, so run it under DDP, or use recovery='full' under "
            f"{_NAMES[engine]}"
        )
    if trainer.pruning_config.deployable:
        raise ValueError(
            f"deployable=True under {_NAMES[engine]} is not supported (the stock export is built from full weights, "
            "which only the gathered state dict holds): save the pruned checkpoint, then convert it with "
            "`hf-prune export DIR --format stock --output_dir OUT`"
        )
    if embedder:
        raise NotImplementedError(
            f"sentence-transformers models are not recovered under {_NAMES[engine]} (their folder is saved from the "
            "full model): an embedder fits one device, so use DDP"
        )


def check_teacher_fits(teacher: nn.Module, device: torch.device) -> None:
    """Refuse, before training, a KD teacher whose weights do not fit the free memory of ``device`` (an accelerator;
    the teacher is placed there whole before an engine shards it)."""
    if device.type not in ("cuda", "xpu"):
        return
    need = sum(p.numel() * p.element_size() for p in teacher.parameters() if p.device != device)
    free, _ = getattr(torch, device.type).mem_get_info(device)
    if need > free:
        raise ValueError(
            f"the KD teacher needs {need / 2**30:.1f} GiB on {device} and {free / 2**30:.1f} GiB are free: load it in "
            "bfloat16 (teacher_model=AutoModel...from_pretrained(..., dtype=torch.bfloat16)), distil from a smaller "
            "teacher, or free the device (one process per GPU)")


def shard_teacher(trainer: Any, teacher: nn.Module) -> nn.Module:
    """The frozen teacher sharded like the student: FSDP2 prepares it with the trainer's accelerator; ZeRO-3 gives it
    an inference engine of its own (no optimizer: only its weights are split); under ZeRO-1/2, which do not
    partition parameters, it stays whole. Idempotent."""
    engine = sharding_engine(trainer)
    if engine == "deepspeed":
        return _deepspeed_teacher(trainer, teacher)
    if engine != "fsdp2" or isinstance(teacher, FSDPModule):
        return teacher
    teacher = trainer.accelerator.prepare(teacher)
    # FSDP2 leaves some units gathered after their forward (the input embedding, which a tied head reads again; the
    # root) for the backward that follows; the frozen teacher has no backward, so they would stay whole on every rank
    teacher.register_forward_hook(_reshard)
    return teacher


def _reshard(module: nn.Module, args: Any, output: Any) -> None:
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def _deepspeed_config(trainer: Any) -> dict[str, Any]:
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config


def _deepspeed_teacher(trainer: Any, teacher: nn.Module) -> nn.Module:
    import deepspeed

    config = copy.deepcopy(_deepspeed_config(trainer))
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) != 3 or isinstance(teacher, deepspeed.DeepSpeedEngine):
        return teacher
    for key in ("optimizer", "scheduler"):  # inference only
        config.pop(key, None)
    # values the Trainer fills from the model when it builds its own engine, later in train(); same rule here
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None) or 1024
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}
    config["zero_optimization"] = {k: auto.get(k, v) if v == "auto" else v for k, v in zero.items()}
    config = {k: v for k, v in config.items() if v != "auto"}
    config.setdefault("train_micro_batch_size_per_gpu", trainer.args.per_device_train_batch_size)
    config.setdefault("gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine
