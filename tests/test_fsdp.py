"""PruningTrainer under FSDP2: two processes on CPU (gloo) through `accelerate launch`, FSDP2 through the shim in
``fsdp_cpu.py`` (accelerate does not select FSDP on a CPU by itself). The cut happens before the model is wrapped;
the cut model and the KD teacher train sharded; the result must equal the DDP run's, save to a reloadable pruned
checkpoint, and resume."""

import pytest
import torch
import transformers as T
from fsdp_cpu import CpuFsdp2Trainer
from helpers import check_sharded_recovery
from tiny import BY_NAME

import hf_prune as hp
from hf_prune.schedule import PruningSchedule


@pytest.mark.parametrize("arch,method", [("bert", "one_shot"), ("llama", "one_shot"), ("bert", "retraining_free")])
def test_fsdp2_recovery_shards_and_equals_ddp(tmp_path, arch, method):
    fsdp = check_sharded_recovery(tmp_path, "fsdp", arch, method, resume=arch == "bert")
    assert fsdp[0]["plan"]["heads"] != [[0, 1, 2, 3]] * 3  # heads were cut
    for rank in fsdp:  # the root and each layer are FSDP units: gathered one at a time
        assert rank["layers_wrapped"] and "" in rank["fsdp_units"]
        assert rank["teacher_whole"] == []  # no teacher unit stays gathered after its forward


def _trainer(tmp_path, cls=CpuFsdp2Trainer, **kwargs):
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    config = kwargs.pop("config", hp.PruningConfig(flops_keep=0.5))
    return cls(model=BY_NAME["bert"].model(), args=args, pruning_config=config, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": PruningSchedule("gradual", start_step=1, end_step=2, frequency=1)}, "cut must come before"),
    ({"recovery": "lora"}, "LoRA recovery under FSDP2"),
    ({"config": hp.PruningConfig(flops_keep=0.5, deployable=True, allocation="uniform")},
     "hf-prune export DIR --format stock"),
])
def test_fsdp2_refuses_what_it_cannot_honour_before_training(tmp_path, kwargs, match):
    with pytest.raises((ValueError, NotImplementedError), match=match):
        _trainer(tmp_path, **kwargs)


def test_fsdp1_is_refused_with_the_version_to_set(tmp_path):
    class Fsdp1(CpuFsdp2Trainer):
        fsdp_version = 1

    with pytest.raises(NotImplementedError, match="fsdp_version"):
        _trainer(tmp_path, cls=Fsdp1)


def test_a_teacher_that_does_not_fit_the_gpu_is_refused_before_training(monkeypatch):
    """The teacher goes to the accelerator whole at init: more than its free memory is a one-line error naming both
    sizes and the ways round; on the CPU nothing is checked."""
    from hf_prune.sharding import check_teacher_fits

    teacher = BY_NAME["bert"].model()
    need = sum(p.numel() * p.element_size() for p in teacher.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 80 * 2**30))
    with pytest.raises(ValueError, match=r"KD teacher needs 0\.0 GiB on cuda:0 and 0\.0 GiB are free.*bfloat16"):
        check_teacher_fits(teacher, torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 80 * 2**30))
    check_teacher_fits(teacher, torch.device("cuda:0"))  # exactly fits
    check_teacher_fits(teacher, torch.device("cpu"))
