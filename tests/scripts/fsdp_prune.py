"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU: PruningTrainer cuts a tiny model before
training, then recovers it with KD under FSDP2 (``fsdp``), DeepSpeed ZeRO-3 (``zero3``) or DDP (``ddp``);
``fsdp-resume`` / ``zero3-resume`` resume the sharded run from its step-4 checkpoint. Each rank writes its plan,
losses, whether its parameters are sharded and its peak memory; rank 0 also writes the gathered weights, and the
final model is saved as a pruned checkpoint.

    fsdp_prune.py OUT MODE MODEL METHOD      MODE: fsdp | zero3 | ddp | fsdp-resume | zero3-resume,
                                             MODEL: bert | llama,
                                             METHOD: one_shot | retraining_free

FSDP2 on CPU goes through the shim in tests/fsdp_cpu.py (accelerate selects FSDP only on accelerator devices);
DeepSpeed runs on CPU as it is (``DS_ACCELERATOR=cpu``, gloo), from ``TrainingArguments(deepspeed=...)``.
"""

import json
import resource
import sys
from pathlib import Path

import datasets
import torch
import transformers as T
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsdp_cpu import CpuFsdp2Trainer  # noqa: E402
from tiny import BY_NAME  # noqa: E402

import hf_prune as hp  # noqa: E402
from hf_prune.adapters import layers_of  # noqa: E402
from hf_prune.distributed import exit_launched  # noqa: E402
from hf_prune.trainer import DistillationConfig, PruningTrainer  # noqa: E402

out, mode, arch, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
tiny = BY_NAME[arch]
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 97, (64, 8), generator=g)
rows = {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 64}
if arch == "bert":
    rows["labels"] = (ids[:, 0] > 50).long().tolist()
ds = datasets.Dataset.from_dict(rows)
engine = mode.split("-")[0]
run = out / engine
zero3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
         "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
model = tiny.model()  # loaded before the TrainingArguments: ZeRO-3 would partition it at load time otherwise
args = T.TrainingArguments(
    output_dir=str(run), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
    save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    data_seed=0, deepspeed=zero3 if engine == "zero3" else None,
)
if method == "retraining_free":
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=8, tuning_samples=8,
                              selection_samples=8, progress=False)
else:
    config = hp.PruningConfig(flops_keep=0.5, progress=False)
cls = CpuFsdp2Trainer if engine == "fsdp" else PruningTrainer
trainer = cls(model=model, args=args, train_dataset=ds, pruning_config=config,
              distillation=DistillationConfig(alpha=1.0 if arch == "llama" else 0.5),
              data_collator=T.default_data_collator)
trainer.train(resume_from_checkpoint=str(run / "checkpoint-4") if mode.endswith("-resume") else None)
rank = trainer.args.process_index


def split(p: torch.Tensor) -> bool:
    """Whether this rank holds only part of ``p`` (an FSDP2 DTensor shard, or a ZeRO-3 partition)."""
    if isinstance(p, DTensor):
        return p.to_local().numel() < p.numel()
    return hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel


params = [p for p in trainer.model.parameters() if getattr(p, "ds_numel", p.numel()) > 1]
sharded = [split(p) for p in params]
teacher_sharded = any(split(p) for p in trainer.teacher.parameters())
# the teacher after its last forward: FSDP2 holds no unit of it gathered (it has no backward to reshard them)
teacher_whole = [n for n, p in trainer.teacher.named_parameters() if isinstance(p, torch.nn.Parameter)
                 and not isinstance(p, DTensor)] if engine == "fsdp" else []
units = [name for name, m in trainer.model.named_modules() if isinstance(m, FSDPModule)]
plan = hp.PrunePlan.of(trainer.model)
# collective under FSDP2 and ZeRO-3: every rank takes part
state = trainer.accelerator.get_state_dict(trainer.model_wrapped if engine == "zero3" else trainer.model)
if rank == 0:
    torch.save({k: v.detach().cpu() for k, v in state.items()}, out / f"{mode}-gathered.pt")
trainer.save_model(str(out / f"{mode}-final"))
(out / f"{mode}-rank{rank}.json").write_text(json.dumps({
    "world_size": trainer.args.world_size,
    "plan": {"heads": plan.heads, "neurons": plan.neurons},
    "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
    "sharded": sum(sharded), "params": len(sharded), "teacher_sharded": teacher_sharded, "teacher_whole": teacher_whole,
    "fsdp_units": units,
    "layers_wrapped": all(isinstance(layer, FSDPModule) for layer in layers_of(trainer.model)),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
exit_launched()  # not a plain exit: gloo can abort an interpreter that finalizes (see its docstring)
