"""Run as one process with the torch.distributed environment set (``test_deepspeed.py``): what PruningTrainer refuses
under DeepSpeed ZeRO-3 before any work, printed one ``REFUSED: <message>`` line per case.

    zero3_refusals.py OUT
"""

import sys
from pathlib import Path

import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import BY_NAME  # noqa: E402

import hf_prune as hp  # noqa: E402
from hf_prune.trainer import PruningTrainer  # noqa: E402

out = Path(sys.argv[1])
BY_NAME["bert"].model().save_pretrained(out / "tiny")
model = T.AutoModelForSequenceClassification.from_pretrained(out / "tiny")
config = hp.PruningConfig(flops_keep=0.5, progress=False)
zero3 = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}  # no gathering on save
args = T.TrainingArguments(str(out / "run"), max_steps=2, report_to=[], use_cpu=True, deepspeed=zero3)
# loaded after a stage-3 TrainingArguments exists: from_pretrained partitions it with deepspeed.zero.Init
late = T.AutoModelForSequenceClassification.from_pretrained(out / "tiny")
print("partitioned at load:", all(hasattr(p, "ds_id") for p in late.parameters()), flush=True)
for case in (late, model):  # the partitioned model is refused before the Trainer builds its Accelerator
    try:
        PruningTrainer(model=case, args=args, pruning_config=config)
        print("ACCEPTED", flush=True)
    except ValueError as e:
        print(f"REFUSED: {e}", flush=True)
