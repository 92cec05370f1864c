from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import BY_NAME

import hf_prune as hp
from hf_prune.retraining_free.tuning import masked_stand_in


def random_plan(model, seed: int = 0, empty_layer: int | None = None, query_heads: bool = False,
                hidden: int | None = None, layers: list[int] | None = None) -> hp.PrunePlan:
    """A plan keeping a different random subset in every layer (whole KV groups for GQA; with ``query_heads``,
    a random number of random query heads in each kept group, the same number in every group of a layer); with
    ``hidden``, that many random hidden channels; with ``layers``, only those dense layers."""
    g = torch.Generator().manual_seed(seed)
    dense = hp.PrunePlan.dense(model)
    group = dense.group_size
    heads, neurons = [], []
    for i in range(dense.num_layers):
        n_groups = dense.num_kv_heads
        if query_heads:  # 1..all groups, 1..group-1 heads in each: at least one query head goes
            k = 0 if i == empty_layer else int(torch.randint(1, n_groups + 1, (1,), generator=g))
            per = int(torch.randint(1, group, (1,), generator=g))
            groups = torch.randperm(n_groups, generator=g)[:k].tolist()
            heads.append([gi * group + int(j) for gi in groups for j in torch.randperm(group, generator=g)[:per]])
        else:
            k = 0 if i == empty_layer else int(torch.randint(1, n_groups, (1,), generator=g))  # at least one goes
            groups = torch.randperm(n_groups, generator=g)[:k].tolist()
            heads.append([gi * group + j for gi in groups for j in range(group)])
        n = 0 if i == empty_layer else int(torch.randint(1, dense.intermediate_size, (1,), generator=g))
        neurons.append(torch.randperm(dense.intermediate_size, generator=g)[:n].tolist())
    return hp.PrunePlan(
        model_type=dense.model_type,
        num_heads=dense.num_heads,
        num_kv_heads=dense.num_kv_heads,
        intermediate_size=dense.intermediate_size,
        hidden_size=dense.hidden_size,
        heads=heads,
        neurons=neurons,
        hidden=None if hidden is None else torch.randperm(dense.hidden_size, generator=g)[:hidden].tolist(),
        layers=layers,
    )


def plan_masks(plan: hp.PrunePlan) -> hp.LayerMasks:
    """0/1 masks equivalent to ``plan`` on the dense model."""
    masks = hp.LayerMasks(plan.num_layers)
    for i in range(plan.num_layers):
        masks.heads[i] = torch.zeros(plan.num_heads)
        masks.heads[i][plan.heads[i]] = 1.0
        masks.neurons[i] = torch.zeros(plan.intermediate_size)
        masks.neurons[i][plan.neurons[i]] = 1.0
    if plan.layers is not None:  # a removed layer is gated shut
        masks.layers = [None if i in plan.layers else torch.zeros(1) for i in range(plan.num_layers)]
    if plan.hidden is not None:
        masks.hidden = torch.zeros(plan.hidden_size)
        masks.hidden[plan.hidden] = 1.0
    return masks


def assert_fold_then_cut_equals_masked(model, tuning, plan, inputs, output_tensor):
    """Folding ``tuning`` into a copy of ``model`` and cutting it to ``plan`` computes what the folded model
    computes under ``plan``'s 0/1 masks, and what ``model`` itself computes, unchanged, as a masked candidate with
    the scales as masks or the refitted projections as hooks (how offloaded weights stand in for the cut); returns
    the cut model."""
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        hooked = output_tensor(masked_stand_in(model, plan, tuning)(**inputs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing written
    folded = hp.fold_tuning_(copy.deepcopy(model), tuning)
    with torch.no_grad(), hp.mask_hooks(folded, plan_masks(plan)):
        expected = output_tensor(folded(**inputs))
    cut = hp.apply_plan_(folded, plan)
    with torch.no_grad():
        got = output_tensor(cut(**inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, got, atol=1e-5, rtol=1e-5)
    return cut


@torch.no_grad()
def masked_output(model, plan, inputs, output_tensor):
    ref = copy.deepcopy(model)
    with hp.mask_hooks(ref, plan_masks(plan)):
        return output_tensor(ref(**inputs))


GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}


@torch.no_grad()
def generate_cached_uncached_masked(dense, pruned, plan, ids) -> torch.Tensor:
    """Greedy tokens of ``pruned`` with the KV cache, asserted equal to its tokens without the cache and to the
    masked dense model's; returns them."""
    cached = pruned.generate(ids, use_cache=True, **GREEDY)
    uncached = pruned.generate(ids, use_cache=False, **GREEDY)
    with hp.mask_hooks(dense, plan_masks(plan)):
        masked = dense.generate(ids, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached) and torch.equal(cached, masked)
    return cached


def save_tiny_llama(path, heads: int = 4, kv: int = 2, head_dim: int = 8):
    """A tiny random Llama decoder with MiniLM's tokenizer (so real text tokenizes), saved without a task head like
    a pretrained LLM; returns ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_prune.resources import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=heads * head_dim, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=64,
                      max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


SHARDED_SCRIPT = Path(__file__).parent / "scripts" / "fsdp_prune.py"


def launch_sharded(out: Path, mode: str, arch: str, method: str, **env: str) -> list[dict]:
    """``tests/scripts/fsdp_prune.py`` under ``accelerate launch`` with two CPU processes (gloo): each rank's result."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env}
    r = subprocess.run(launcher + [str(SHARDED_SCRIPT), str(out), mode, arch, method], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return [json.loads((out / f"{mode}-rank{i}.json").read_text()) for i in range(2)]


def assert_reload_equals_gathered(out: Path, mode: str) -> None:
    """The pruned checkpoint a sharded run saved reloads to exactly the weights rank 0 gathered."""
    gathered = torch.load(out / f"{mode}-gathered.pt")
    reloaded = hp.load_pruned(out / f"{mode}-final").state_dict()
    assert set(gathered) == set(reloaded)
    for name, tensor in gathered.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)


def check_sharded_recovery(out: Path, engine: str, arch: str, method: str, *, resume: bool,
                           **env: str) -> list[dict]:
    """A sharded recovery (``engine``: ``fsdp`` or ``zero3``) against DDP: the same plan on both ranks and something
    cut; every parameter of the cut model and the teacher split over the ranks; the saved checkpoint equal to the
    gathered weights; for one-shot cuts, losses equal to the DDP run's at every step and, with ``resume``, a run
    resumed from the step-4 checkpoint reproducing steps 5-8. Returns each rank's result for engine-specific checks."""
    runs = launch_sharded(out, engine, arch, method, **env)
    assert [r["world_size"] for r in runs] == [2, 2]
    assert runs[0]["plan"] == runs[1]["plan"]  # every rank cut the same structure before the engine split it
    dense = hp.PrunePlan.of(BY_NAME[arch].model())
    assert runs[0]["plan"] != {"heads": dense.heads, "neurons": dense.neurons}  # something was pruned
    for rank in runs:  # every matrix of the cut model is split over the ranks, and so is the teacher
        assert rank["sharded"] == rank["params"] > 0 and rank["teacher_sharded"]
    assert_reload_equals_gathered(out, engine)
    if method == "retraining_free":
        return runs
    ddp = launch_sharded(out, "ddp", arch, method)
    assert ddp[0]["plan"] == runs[0]["plan"] and ddp[0]["sharded"] == 0
    steps = sorted(ddp[0]["losses"], key=int)
    assert steps == [str(i) for i in range(1, 9)]
    for s in steps:  # the same cut, data and updates: the sharded run computes what the replicated one does
        assert runs[0]["losses"][s] == pytest.approx(ddp[0]["losses"][s], rel=1e-5, abs=1e-7), s
    if resume:
        resumed = launch_sharded(out, f"{engine}-resume", arch, method, **env)  # from the step-4 checkpoint
        assert sorted(resumed[0]["losses"], key=int) == steps  # steps 1-4 from the checkpoint's state, 5-8 trained
        for s in ("5", "6", "7", "8"):
            assert resumed[0]["losses"][s] == pytest.approx(runs[0]["losses"][s], rel=1e-5, abs=1e-7), s
        assert_reload_equals_gathered(out, f"{engine}-resume")
    return runs
