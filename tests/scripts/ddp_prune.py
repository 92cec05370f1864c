"""Run under `accelerate launch --cpu --num_processes 2`: one-shot prune with Fisher scores from each rank's
shard of the training data (summed over ranks), then a few recovery steps under DDP. Each rank writes its plan
and its final weights' checksum so the test can compare them."""

import json
import sys
from pathlib import Path

import datasets
import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import BY_NAME  # noqa: E402

import hf_prune as hp  # noqa: E402
from hf_prune.distributed import exit_launched  # noqa: E402
from hf_prune.schedule import PruningSchedule  # noqa: E402
from hf_prune.trainer import DistillationConfig, PruningTrainer  # noqa: E402

out = Path(sys.argv[1])
schedule = sys.argv[2] if len(sys.argv) > 2 else "one_shot"
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 97, (64, 8), generator=g)
ds = datasets.Dataset.from_dict(
    {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 64, "labels": (ids[:, 0] > 50).long().tolist()}
)
args = T.TrainingArguments(
    output_dir=str(out / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
    save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
)
if schedule == "retraining_free":  # the retraining-free cut from each rank's shard, then DDP recovery
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=8, tuning_samples=8,
                              selection_samples=8, progress=False)
else:
    config = hp.PruningConfig(flops_keep=0.5, progress=False)
trainer = PruningTrainer(
    model=BY_NAME["bert"].model(), args=args, train_dataset=ds,
    pruning_config=config,
    schedule=None if schedule != "gradual" else PruningSchedule("gradual", start_step=2, end_step=6, frequency=2),
    distillation=DistillationConfig(alpha=0.5),
)
trainer.train()
rank = trainer.args.process_index
plan = hp.PrunePlan.of(trainer.model)
checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
(out / f"rank{rank}.json").write_text(json.dumps({
    # the kept units (meta holds per-rank timings)
    "world_size": trainer.args.world_size, "plan": {"heads": plan.heads, "neurons": plan.neurons}, "checksum": checksum,
    "retraining_free": "retraining_free" in (trainer.plan.meta if trainer.plan is not None else {}),
    "params": hp.count_params(trainer.model),
}))
exit_launched()  # not a plain exit: gloo can abort an interpreter that finalizes (see its docstring)
