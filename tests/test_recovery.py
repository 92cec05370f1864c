"""PruningCallback inside a vanilla Trainer, and PruningTrainer (KD, LoRA, gradual cut, resume)."""

import copy

import datasets
import pytest
import torch
import transformers as T
from tiny import BY_NAME

import hf_prune as hp
from hf_prune.callbacks import PruningCallback
from hf_prune.schedule import PruningSchedule
from hf_prune.shapes import get_module, layer_list
from hf_prune.trainer import DistillationConfig, PruningTrainer

TINY = BY_NAME["bert"]


def _dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, 8), generator=g)
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * n, "labels": labels.tolist()})


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, learning_rate=2e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    )
    base.update(kw)
    return T.TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _probe():
    return {"input_ids": torch.randint(3, 97, (4, 8), generator=torch.Generator().manual_seed(9)),
            "attention_mask": torch.ones(4, 8, dtype=torch.long)}


class _Recorder(PruningCallback):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.events = []

    def on_plan_update(self, model, step):
        self.events.append((step, [len(h) for h in self.plan.heads], [len(n) for n in self.plan.neurons]))


def test_callback_masks_the_scheduled_fraction_and_the_cut_matches(tmp_path):
    model = TINY.model()
    cfg = hp.PruningConfig(heads_keep=0.5, neurons_keep=0.25, allocation="uniform", progress=False)
    schedule = PruningSchedule("gradual", start_step=2, end_step=8, frequency=3)
    cb = _Recorder(cfg, schedule)
    trainer = T.Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()

    assert [s for s, _, _ in cb.events] == [2, 5, 8]
    for step, heads, neurons in cb.events:
        p = schedule.progress(step)
        h_keep = 1 + (0.5 - 1) * p  # the cubic schedule, written out
        n_keep = 1 + (0.25 - 1) * p
        assert heads == [round(h_keep * 4)] * 3
        assert neurons == [int(n_keep * 48)] * 3
    logged = [h for h in trainer.state.log_history if "prune/heads_kept" in h]
    assert logged[-1]["prune/heads_kept"] == 0.5 and logged[-1]["prune/neurons_kept"] == 0.25

    # masked weights stayed zero through the optimizer steps after the last event
    adapter = hp.get_adapter(model)
    for i, layer in enumerate(layer_list(model, adapter)):
        gone = [h for h in range(4) if h not in cb.plan.heads[i]]
        q = get_module(layer, adapter.q).weight.view(4, 8, -1)
        assert gone and q[gone].abs().sum() == 0
        dropped = [n for n in range(48) if n not in cb.plan.neurons[i]]
        assert get_module(layer, adapter.down).weight[:, dropped].abs().sum() == 0
        assert get_module(layer, adapter.up).weight[dropped].abs().sum() == 0

    model.eval()
    with torch.no_grad():
        masked = model(**_probe()).logits
        cb.prune_model_(model)
        pruned = model(**_probe()).logits
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert hp.count_params(model) < hp.count_params(TINY.model())


class _Reporter(T.TrainerCallback):
    """Stands for TensorBoard / W&B: logs what each on_log hands it."""

    def __init__(self):
        self.keys = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys |= set(logs or {})


def test_reporting_callbacks_see_the_pruning_statistics(tmp_path):
    cfg = hp.PruningConfig(flops_keep=0.5, importance="magnitude", progress=False)
    reporter = _Reporter()  # a callback Trainer runs before the pruning one, as it does its report_to callbacks
    trainer = T.Trainer(model=TINY.model(), args=_args(tmp_path, max_steps=3), train_dataset=_dataset(),
                        callbacks=[reporter])
    cb = PruningCallback(cfg).add_to(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    assert {"prune/flops_kept", "prune/heads_kept"} <= reporter.keys and cb.stats["prune/flops_kept"] <= 0.5

    reporter = _Reporter()
    trainer = PruningTrainer(model=TINY.model(), args=_args(tmp_path, max_steps=3), train_dataset=_dataset(),
                             pruning_config=cfg, schedule=PruningSchedule("one_shot", start_step=1),
                             callbacks=[reporter])
    trainer.train()
    assert "prune/flops_kept" in reporter.keys


def test_trainer_one_shot_with_distillation(tmp_path):
    model = TINY.model()
    dense_params = hp.count_params(model)
    trainer = PruningTrainer(
        model=model, args=_args(tmp_path, max_steps=24), train_dataset=_dataset(),
        pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False),
        distillation=DistillationConfig(alpha=0.5, temperature=2.0, hidden_weight=0.1),
    )
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert hp.count_params(trainer.model) < dense_params
    assert hp.count_flops(trainer.model, 128)["total"] <= 0.5 * hp.count_flops(TINY.model(), 128)["total"]
    trainer.save_model(str(tmp_path / "final"))
    reloaded = hp.load_pruned(tmp_path / "final")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_probe()).logits, trainer.model(**_probe()).logits, atol=0, rtol=0)


def test_trainer_lora_recovery_merges_into_a_plain_pruned_model(tmp_path):
    model = TINY.model()
    trainer = PruningTrainer(
        model=model, args=_args(tmp_path, max_steps=16, learning_rate=5e-3, save_strategy="steps", save_steps=8),
        train_dataset=_dataset(),
        pruning_config=hp.PruningConfig(heads_keep=0.5, neurons_keep=0.5, importance="magnitude", progress=False),
        recovery="lora", distillation=DistillationConfig(alpha=0.5),
    )
    pruned_before = None

    class Snapshot(T.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            nonlocal pruned_before
            pruned_before = copy.deepcopy(model).merge_and_unload().state_dict()  # LoRA B = 0: the pruned base

    trainer.add_callback(Snapshot())
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert not any(c.__module__.startswith("peft") for c in type(trainer.model).__mro__)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert trainer.model.state_dict()[q].shape == pruned_before[q].shape == (16, 32)
    assert not torch.equal(trainer.model.state_dict()[q], pruned_before[q])  # LoRA update merged in
    # a mid-training checkpoint holds the adapter (to resume) and the merged pruned model (to load)
    ckpt = tmp_path / "out" / "checkpoint-8"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "prune_plan.json").exists()
    assert type(hp.load_pruned(ckpt)).__name__ == "PrunedBertForSequenceClassification"
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "adapter_model.safetensors").exists()
    reloaded = hp.load_pruned(tmp_path / "final")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_probe()).logits, trainer.model(**_probe()).logits)


def test_trainer_gradual_schedule_cuts_mid_training_and_keeps_training(tmp_path):
    model = TINY.model()
    trainer = PruningTrainer(
        model=model, args=_args(tmp_path, max_steps=20), train_dataset=_dataset(),
        pruning_config=hp.PruningConfig(flops_keep=0.5, importance="taylor", progress=False),
        schedule=PruningSchedule("gradual", start_step=2, end_step=10, frequency=4),
    )
    trainer.train()
    assert type(trainer.model).__name__ == "PrunedBertForSequenceClassification"
    opt_shapes = sorted(tuple(p.shape) for g in trainer.optimizer.param_groups for p in g["params"])
    model_shapes = sorted(tuple(p.shape) for p in trainer.model.parameters() if p.requires_grad)
    assert opt_shapes == model_shapes  # optimizer rebuilt on the cut tensors
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # linear decay continues through the cut
    losses = _losses(trainer)
    assert sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.parametrize("schedule", [None, PruningSchedule("gradual", start_step=2, end_step=8, frequency=3)],
                         ids=["one_shot", "gradual"])
@pytest.mark.parametrize("resume_at", [4, 10])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, schedule, resume_at):
    cfg = hp.PruningConfig(flops_keep=0.5, importance="fisher" if schedule is None else "taylor", progress=False)
    if schedule is None and resume_at == 10:
        pytest.skip("one-shot: one checkpoint after the cut is enough")

    def make(out):
        return PruningTrainer(
            model=TINY.model(), args=_args(tmp_path / out, max_steps=14, save_strategy="steps", save_steps=resume_at),
            train_dataset=_dataset(), pruning_config=cfg, schedule=schedule,
        )

    full = make("a")
    full.train()
    resumed = make("b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / f"checkpoint-{resume_at}"))
    a, b = _losses(full)[resume_at:], _losses(resumed)
    b = b[-len(a):]
    assert len(a) == 14 - resume_at
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-4)
    assert PrunePlanOf(resumed.model) == PrunePlanOf(full.model)


def PrunePlanOf(model):
    return hp.PrunePlan.of(model)


def test_bad_recovery_inputs_fail_before_training(tmp_path):
    cfg = hp.PruningConfig(flops_keep=0.5, progress=False)
    with pytest.raises(ValueError, match="end_step > start_step"):
        PruningSchedule("gradual", start_step=5, end_step=5)
    trainer = PruningTrainer(model=TINY.model(), args=_args(tmp_path, max_steps=6), train_dataset=_dataset(),
                             pruning_config=cfg, schedule=PruningSchedule("gradual", start_step=2, end_step=50))
    with pytest.raises(ValueError, match="ends at step 50 but training stops at max_steps=6"):
        trainer.train()
    from peft import LoraConfig

    trainer = PruningTrainer(model=TINY.model(), args=_args(tmp_path), train_dataset=_dataset(), pruning_config=cfg,
                             recovery="lora", lora_config=LoraConfig(target_modules=["no_such_linear"]))
    with pytest.raises(ValueError, match="LoRA found no modules"):
        trainer.train()
    with pytest.raises(ValueError, match="needs the cut before training"):
        PruningTrainer(model=TINY.model(), args=_args(tmp_path), pruning_config=cfg, recovery="lora",
                       schedule=PruningSchedule("gradual", start_step=1, end_step=4))
    pruned = hp.apply_plan_(TINY.model(), hp.PrunePlan.from_dict({**hp.PrunePlan.dense(TINY.model()).to_dict(),
                                                                  "heads": [[0], [1], [2]]}))
    with pytest.raises(ValueError, match="needs a teacher"):
        PruningTrainer(model=pruned, args=_args(tmp_path), pruning_config=cfg, distillation=DistillationConfig())
    with pytest.raises(ValueError, match="gradients cannot score at step 0"):
        PruningCallback(hp.PruningConfig(flops_keep=0.5), PruningSchedule())


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = hp.PruningConfig(flops_keep=0.5, progress=False)
    first = PruningTrainer(model=TINY.model(), args=_args(tmp_path / "a", max_steps=4, save_strategy="steps",
                                                           save_steps=4), train_dataset=_dataset(), pruning_config=cfg)
    first.train()
    other = PruningTrainer(model=BY_NAME["distilbert"].model(), args=_args(tmp_path / "b"), train_dataset=_dataset(),
                           pruning_config=cfg)
    with pytest.raises(hp.PlanMismatchError, match="another model"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-4"))


def test_mixed_precision_flag_passes_through(tmp_path):
    trainer = PruningTrainer(
        model=TINY.model(), args=_args(tmp_path, max_steps=4, bf16=True), train_dataset=_dataset(),
        pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False), distillation=DistillationConfig(),
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))
    assert type(trainer.model).__name__.startswith("Pruned")


def test_task_metric_evaluation_and_best_checkpoint_reload(tmp_path):
    import numpy as np

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = PruningTrainer(
        model=TINY.model(),
        args=_args(tmp_path, max_steps=16, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                   load_best_model_at_end=True, metric_for_best_model="accuracy", per_device_eval_batch_size=16),
        train_dataset=_dataset(), eval_dataset=_dataset(32, seed=1), compute_metrics=accuracy,
        pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False),
        callbacks=[T.EarlyStoppingCallback(early_stopping_patience=10)],
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 4
    best = trainer.state.best_model_checkpoint
    assert best is not None and trainer.state.best_metric == max(e["eval_accuracy"] for e in evals)
    reloaded = hp.load_pruned(best)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**_probe()).logits, reloaded(**_probe()).logits)


def _calibration(n=4, batch_size=8):
    ds = _dataset(n * batch_size, seed=5)
    return [{k: torch.tensor(ds[i * batch_size:(i + 1) * batch_size][k]) for k in ds.column_names} for i in range(n)]


def _retraining_free_config(**kw):
    return hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=8, tuning_samples=16,
                            selection_samples=16, progress=False, **kw)


def test_trainer_runs_retraining_free_then_recovery(tmp_path):
    """method='retraining_free' in PruningTrainer is the retraining-free cut (plan meta, folded weights), then
    training; with a zero learning rate the trained model is exactly hp.prune's."""
    calib = _calibration()
    reference, _ = hp.prune(TINY.model(), calib, _retraining_free_config())
    trainer = PruningTrainer(model=TINY.model(), args=_args(tmp_path, learning_rate=0.0, max_steps=2),
                             train_dataset=_dataset(), pruning_config=_retraining_free_config(),
                             calibration_dataloader=calib)
    trainer.train()
    assert "retraining_free" in trainer.plan.meta
    assert trainer.plan.meta["retraining_free"]["selection"]["chosen"]
    got, want = hp.PrunePlan.of(trainer.model), hp.PrunePlan.of(reference)
    assert (got.heads, got.neurons) == (want.heads, want.neurons)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**_probe()).logits, reference(**_probe()).logits)


@pytest.mark.parametrize("depth", [{}, {"layers_keep": 2}], ids=["width", "depth_and_width"])
def test_callback_applies_retraining_free_as_masks_over_folded_weights(tmp_path, depth):
    calib = _calibration()
    reference, plan = hp.prune(TINY.model(), calib, _retraining_free_config(**depth))
    assert len(plan.kept_layers) == (2 if depth else 3)
    model = TINY.model()
    cb = PruningCallback(_retraining_free_config(**depth), calibration_dataloader=calib)
    T.Trainer(model=model, args=_args(tmp_path, learning_rate=0.0, max_steps=2), train_dataset=_dataset(),
              callbacks=[cb]).train()
    assert "retraining_free" in cb.plan.meta and hp.count_params(model) == hp.count_params(TINY.model())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_probe()).logits, reference(**_probe()).logits)  # masked == cut
        cb.prune_model_(model)
        torch.testing.assert_close(model(**_probe()).logits, reference(**_probe()).logits)
    got, want = hp.PrunePlan.of(model), hp.PrunePlan.of(reference)
    assert (got.heads, got.neurons, got.layers) == (want.heads, want.neurons, want.layers) == (
        plan.heads, plan.neurons, plan.layers)


def test_retraining_free_refuses_what_it_cannot_honour(tmp_path):
    with pytest.raises(ValueError, match="one-shot cut"):
        PruningCallback(_retraining_free_config(), PruningSchedule("gradual", start_step=1, end_step=4),
                        calibration_dataloader=_calibration())
    with pytest.raises(ValueError, match="needs calibration data"):
        PruningCallback(_retraining_free_config())
    with pytest.raises(ValueError, match="one-shot cut"):
        PruningTrainer(model=TINY.model(), args=_args(tmp_path), train_dataset=_dataset(),
                       pruning_config=_retraining_free_config(),
                       schedule=PruningSchedule("iterative", start_step=1, end_step=4))


class _GateRecorder(PruningCallback):
    """Records the gate of every layer being removed at the start of each step."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gates = []

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        self.gates.append([float(g) for g in self.controller.masks.layers if g is not None])


def test_callback_fades_removed_layers_out_on_a_gradual_schedule_and_the_cut_matches(tmp_path):
    model = TINY.model()
    cfg = hp.PruningConfig(layers_keep=2, neurons_keep=0.5, progress=False)
    schedule = PruningSchedule("gradual", start_step=2, end_step=8, frequency=3)
    cb = _GateRecorder(cfg, schedule, calibration_dataloader=[{k: torch.tensor(v) for k, v in _dataset(8)[:8].items()}])
    T.Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[cb]).train()
    assert len(cb.plan.kept_layers) == 2
    faded = [g[0] for g in cb.gates if g]
    assert faded[0] == pytest.approx(schedule.fade(2)) and 0 < faded[1] < 1  # ramps down ...
    assert all(a >= b for a, b in zip(faded, faded[1:])) and faded[-1] == 0.0  # ... to skipped
    model.eval()
    with torch.no_grad():
        masked = model(**_probe()).logits
        cb.prune_model_(model)
        pruned = model(**_probe()).logits
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert len(model.bert.encoder.layer) == 2


def test_trainer_removes_layers_and_distils_hidden_states_of_the_layers_kept(tmp_path):
    model = TINY.model()
    trainer = PruningTrainer(
        model=model, args=_args(tmp_path, max_steps=8), train_dataset=_dataset(),
        pruning_config=hp.PruningConfig(layers_keep=2, flops_keep=0.5, progress=False),
        distillation=DistillationConfig(alpha=0.5, hidden_weight=0.1),
    )
    trainer.train()
    kept = trainer.plan.kept_layers
    assert len(trainer.model.bert.encoder.layer) == 2
    assert trainer._hidden_pairs(3) == [(0, 0)] + [(p + 1, i + 1) for p, i in enumerate(kept)]
    trainer.save_model(str(tmp_path / "final"))
    reloaded = hp.load_pruned(tmp_path / "final").eval()
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**_probe()).logits, trainer.model(**_probe()).logits)


def test_a_distillation_map_into_a_removed_layer_is_refused_before_training(tmp_path):
    model = TINY.model()
    with torch.no_grad():  # layer 2 does nothing: block influence removes it
        model.bert.encoder.layer[2].output.dense.weight.zero_()
        model.bert.encoder.layer[2].attention.output.dense.weight.zero_()
    trainer = PruningTrainer(
        model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset(),
        pruning_config=hp.PruningConfig(layers_keep=2, progress=False),
        distillation=DistillationConfig(alpha=0.5, hidden_weight=0.1, layer_map=[(3, 3), (1, 1)]),
    )
    with pytest.raises(ValueError, match=r"layer_map pairs \[\(3, 3\)\].*kept dense layers: \[0, 1\]"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_frozen_model_is_refused_before_training(tmp_path):
    model = TINY.model().requires_grad_(False)  # e.g. it served as teacher_model of an earlier PruningTrainer
    trainer = PruningTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(),
                             pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False))
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        trainer.train()
