"""Device and dtype placement: pruning, retraining-free, recovery and generation on whatever device the model is on,
with calibration batches left on the CPU (as a user's DataLoader gives them).

Every test runs on the CPU (float32 and bfloat16, the dtype GPU users train in) and on CUDA where there is one
(``scripts/gpu_check.sh`` runs this file there); on a CPU-only machine the CUDA cases are reported as skipped.
On another device the result must be the CPU's: the same plan, outputs equal up to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from helpers import plan_masks
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.retraining_free import swap_descent

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
FAMILIES = ["bert", "llama", "gemma3_text"]


def _calib(tiny, n: int = 4) -> list[dict]:
    return [tiny.batch(batch_size=4, seq_len=8, seed=s) for s in range(n)]


def _on(model, device: str, dtype=torch.float32):
    return model.to(device=device, dtype=dtype)


def _assert_placed(model, device: str, dtype) -> None:
    wrong = {n: (p.device.type, p.dtype) for n, p in model.named_parameters()
             if p.device.type != device or p.dtype != dtype}
    assert not wrong, f"parameters left off {device}/{dtype}: {wrong}"


def _units(plan: hp.PrunePlan) -> dict:
    """What a plan keeps (its meta records timings)."""
    return {k: v for k, v in plan.to_dict().items() if k != "meta"}


def _logits(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return output_tensor(model(**{k: v.to(device) for k, v in inputs_only(batch).items()})).float().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fisher", "retraining_free", "retraining_free_model"])
def test_prune_on_device_matches_cpu(device, family, method):
    tiny = BY_NAME[family]
    # retraining_free_model: the cross-layer Fisher (accumulated on the model's device) and the swaps across layers
    cfg = hp.PruningConfig(importance="fisher", flops_keep=0.5, progress=False) if method == "fisher" else \
        hp.PruningConfig(method="retraining_free", flops_keep=0.5, progress=False, tuning_samples=8,
                         selection_samples=8, rearrange_scope="model" if method.endswith("model") else "layer")
    ref, ref_plan = hp.prune(tiny.model(), _calib(tiny), cfg)
    model, plan = hp.prune(_on(tiny.model(), device), _calib(tiny), cfg)
    _assert_placed(model, device, torch.float32)
    if device == "cpu":
        assert _units(plan) == _units(ref_plan)
    else:  # other kernels round differently: the plan may differ only where scores tie within that rounding
        assert plan.physical_sizes() == ref_plan.physical_sizes()
    if _units(plan) == _units(ref_plan):
        torch.testing.assert_close(_logits(model, tiny.batch()), _logits(ref, tiny.batch()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_descent_on_device_matches_cpu(device):
    # Fisher blocks on the device with masks, groups and segments from CPU code: the same swaps as on the CPU.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    fisher, keep = a @ a.T, torch.arange(12) % 3 != 0
    kw = {"groups": torch.arange(12) % 2, "segments": torch.arange(12) // 4, "floor": 1,
          "movable": torch.arange(12) != 5}
    ref = swap_descent(fisher, keep, **kw)
    got = swap_descent(fisher.to(device), keep, **kw)
    assert got.device.type == device and torch.equal(got.cpu(), ref)
    assert not torch.equal(ref, keep)  # the search really swapped something


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_model_prunes_and_keeps_its_dtype(device, family):
    """A bf16 model (as trained on GPUs) gets a valid cut in bf16: the plan's sizes meet the budget, the pruned
    model is the bf16 dense model with the dropped units masked."""
    tiny = BY_NAME[family]
    dense = _on(tiny.model(), device, torch.bfloat16)
    model, plan = hp.prune(copy.deepcopy(dense), _calib(tiny), hp.PruningConfig(importance="fisher",
                                                                                  flops_keep=0.5, progress=False))
    _assert_placed(model, device, torch.bfloat16)
    assert hp.count_flops(model)["total"] <= 0.5 * hp.count_flops(dense)["total"] * 1.0001
    batch = {k: v.to(device) for k, v in inputs_only(tiny.batch()).items()}
    with torch.no_grad(), hp.mask_hooks(dense, plan_masks(plan)):
        masked = output_tensor(dense(**batch)).float()
    with torch.no_grad():
        pruned = output_tensor(model(**batch)).float()
    torch.testing.assert_close(pruned, masked, rtol=2e-2, atol=2e-2)  # bf16 sums in another order


@pytest.mark.parametrize("device", DEVICES)
def test_generate_on_device_with_cache_equals_without(device):
    tiny = BY_NAME["llama"]
    model, _ = hp.prune(_on(tiny.model(), device), _calib(tiny), hp.PruningConfig(importance="fisher",
                                                                                  flops_keep=0.5, progress=False))
    ids = tiny.batch(batch_size=2, labels=False)["input_ids"].to(device)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **greedy), model.generate(ids, use_cache=False, **greedy))


@pytest.mark.parametrize("device", DEVICES)
def test_pruning_trainer_recovers_on_device(device, tmp_path):
    """PruningTrainer (Fisher cut at step 0, KD from the dense teacher) in the precision a GPU user trains in:
    bf16 on CUDA, fp32 on the CPU; the student ends up pruned, on the device, with finite losses."""
    tiny = BY_NAME["bert"]
    rows = [{k: v[i] for k, v in tiny.batch(batch_size=8, seq_len=8, seed=s).items()} for s in range(4)
            for i in range(8)]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                               learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True,
                               use_cpu=device == "cpu", bf16=device == "cuda", logging_steps=1)
    trainer = hp.PruningTrainer(tiny.model(), args, train_dataset=rows, teacher_model=tiny.model(),
                                pruning_config=hp.PruningConfig(importance="fisher", flops_keep=0.5, progress=False,
                                                                max_calibration_samples=16))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert next(trainer.model.parameters()).device.type == device
    assert hp.count_flops(trainer.model)["total"] <= 0.5 * hp.count_flops(tiny.model())["total"] * 1.0001
