"""Extension points are registries: a new criterion, layer criterion, budget kind or architecture is one registration
call, with no edit of library files, and then works everywhere (config validation, plans, cuts)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers as T
from tiny import BY_NAME, inputs_only

import hf_prune as hp
from hf_prune.budget import BUDGETS, BudgetKind, register_budget
from hf_prune.criteria import CRITERIA, Criterion, register_criterion


@pytest.fixture
def toy_criterion():
    """Keep the units with the largest ids: easy to check, and nothing else ranks that way."""

    def by_position(model, seed):
        plan = hp.PrunePlan.of(model)
        return ([torch.tensor(h, dtype=torch.float) for h in plan.heads],
                [torch.tensor(n, dtype=torch.float) for n in plan.neurons])

    register_criterion(Criterion("by_position", "larger ids first", score=by_position))
    yield "by_position"
    CRITERIA.pop("by_position")


def test_a_registered_criterion_prunes(toy_criterion):
    model = BY_NAME["bert"].model()
    cfg = hp.PruningConfig(importance=toy_criterion, heads_keep=0.5, neurons_keep=0.5, allocation="uniform")
    _, plan = hp.prune(model, None, cfg)
    assert plan.heads == [[2, 3]] * 3 and plan.neurons == [list(range(24, 48))] * 3
    assert plan.meta["criterion"] == "by_position"
    with pytest.raises(ValueError, match="already registered"):
        register_criterion(CRITERIA[toy_criterion])


def test_a_registered_gradient_criterion_uses_the_mask_gradients():
    register_criterion(Criterion("max_grad", "largest per-sample |dL/dm|", reduce=lambda g: g.abs().amax(0)))
    try:
        model = BY_NAME["bert"].model()
        batches = [BY_NAME["bert"].batch(seed=s) for s in range(2)]
        scores = hp.compute_importance(model, batches, "max_grad", progress=False)
        assert scores.comparable and torch.isfinite(scores.heads).all() and (scores.heads > 0).any()
        fisher = hp.compute_importance(model, batches, "fisher", progress=False)
        assert scores.heads.argmax() != fisher.heads.argmin()  # a real score, not noise
    finally:
        CRITERIA.pop("max_grad")


def test_a_registered_budget_kind_is_allocated_by_build_plan():
    """A cap on attention+FFN parameters per layer, as a fraction of the dense layers' (not a built-in)."""
    def params_costs(cost, seq):
        return cost.head_params, cost.kv_params, cost.neuron_params

    def params_limit(value, model, cost, seq):
        return value * cost.total(hp.PrunePlan.dense(model).layer_sizes())["total"]

    register_budget(BudgetKind("layer_params_keep", "layer_params", "fraction", "one",
                               "fraction of the layers' parameters to keep", unit_costs=params_costs,
                               limit=params_limit))
    try:
        model = BY_NAME["llama"].model()
        cost = hp.CostModel.for_model(model)
        dense = cost.total(hp.PrunePlan.dense(model).layer_sizes())["total"]
        _, plan = hp.prune(model, None, hp.PruningConfig(importance="magnitude",
                                                         custom_budget={"layer_params_keep": 0.5}))
        assert plan.meta["budget"] == {"layer_params_keep": 0.5}
        kept = cost.total(plan.layer_sizes())["total"]
        assert 0.4 * dense < kept <= 0.5 * dense
        with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
            hp.PruningConfig(custom_budget={"layer_params_keep": 1.5})
        with pytest.raises(ValueError, match="exactly one budget"):
            hp.PruningConfig(flops_keep=0.5, custom_budget={"layer_params_keep": 0.5})
    finally:
        BUDGETS.pop("layer_params_keep")
    with pytest.raises(ValueError, match="unknown budget kinds"):
        hp.PruningConfig(custom_budget={"layer_params_keep": 0.5})


def test_a_budget_kind_with_its_own_search_is_one_registration_and_gets_the_depth_cut_first():
    seen = {}

    def first_heads(scores, model, config, layers, context):  # keeps the first ``value`` of each layer's heads
        seen.update(layers=layers, rows=scores.heads.shape[0], context=dict(context))
        plan = hp.PrunePlan.of(model)
        n = round(config.custom_budget["first_heads"] * plan.num_heads)
        kept = set(layers if layers is not None else range(plan.num_layers))
        return dataclasses.replace(plan, layers=layers, heads=[h[:n] if i in kept else [] for i, h in enumerate(plan.heads)],
                       neurons=[x if i in kept else [] for i, x in enumerate(plan.neurons)])

    register_budget(BudgetKind("first_heads", "first", "fraction", "one", "fraction of heads kept, first ones",
                               search=first_heads))
    try:
        tiny = BY_NAME["bert"]
        model, plan = hp.prune(tiny.model(), [tiny.batch()], hp.PruningConfig(custom_budget={"first_heads": 0.5},
                                                                            layers_keep=2, importance="magnitude"))
        assert seen["layers"] is not None and len(seen["layers"]) == 2 and seen["rows"] == 3
        assert plan.layers == seen["layers"] and plan.meta["budget"] == {"first_heads": 0.5, "layers_keep": 2}
        assert all(h == [0, 1] for i, h in enumerate(plan.heads) if i in plan.layers)
        assert len(model.bert.encoder.layer) == 2  # the cut follows the plan
    finally:
        BUDGETS.pop("first_heads")


def test_a_registered_adapter_prunes_a_new_family():
    from hf_prune.adapters import _REGISTRY, BERT

    class ToyConfig(T.BertConfig):
        model_type = "toy-bert"

    class ToyModel(T.BertModel):
        config_class = ToyConfig

    hp.register_adapter(dataclasses.replace(BERT, model_type="toy-bert"))
    try:
        model = ToyModel(ToyConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48)).eval()
        x = inputs_only(BY_NAME["bert"].batch())
        dense_flops = hp.count_flops(model, 16)["total"]
        _, plan = hp.prune(model, None, hp.PruningConfig(importance="magnitude", flops_keep=0.5, seq_len=16))
        assert 0.4 * dense_flops < hp.count_flops(model, 16)["total"] <= 0.5 * dense_flops
        with torch.no_grad():
            model(**x)
    finally:
        _REGISTRY.pop("toy-bert")


def test_a_registered_layer_criterion_chooses_the_layers_removed():
    """A statistic no built-in computes (the inverse of the output norm): the registered function decides which
    layers stay."""
    from hf_prune.depth import LAYER_CRITERIA

    def output_norm_inverse(x, y, mask):  # (B, T, D) -> (B,): small outputs = important, the reverse of usual
        return 1.0 / y.float().norm(dim=-1).mean(-1)

    hp.register_layer_criterion(hp.LayerCriterion("inverse_norm", "1 / |output|", stat=output_norm_inverse))
    try:
        tiny = BY_NAME["llama"]
        model = tiny.model()
        batches = [tiny.batch(seed=s) for s in range(2)]
        scores = hp.layer_importance(model, batches, "inverse_norm", progress=False)
        _, plan = hp.prune(model, batches, hp.PruningConfig(layers_keep=2, layer_importance="inverse_norm",
                                                            progress=False))
        assert plan.kept_layers == sorted(torch.argsort(scores, descending=True)[:2].tolist())
        with pytest.raises(ValueError, match="already registered"):
            hp.register_layer_criterion(LAYER_CRITERIA["inverse_norm"])
    finally:
        LAYER_CRITERIA.pop("inverse_norm")


@pytest.fixture
def toy_method():
    """Keep each layer's first heads and neurons (``heads_keep``/``neurons_keep`` of them), and 'refit' by scaling
    the kept FFN down projections by 2: both easy to see, and no built-in does either."""
    from hf_prune.methods import MethodContext, PruningMethod, register_method, unregister_method

    folds = []

    def plan(model, batches, config, context: MethodContext):
        current = hp.PrunePlan.of(model)
        heads = [h[: round(config.heads_keep * len(h))] for h in current.heads]
        neurons = [n[: int(config.neurons_keep * len(n))] for n in current.neurons]
        return dataclasses.replace(current, heads=heads, neurons=neurons, meta={"criterion": "first"}), 2.0

    def fold(model, factor):
        adapter = hp.get_adapter(model)
        with torch.no_grad():
            for layer in hp.adapters.layers_of(model):
                hp.modeling_pruned.get_module(layer, adapter.down).weight.mul_(factor)
        folds.append(factor)

    register_method(PruningMethod("first_units", plan=plan, fold=fold, summary="the first units of each layer"))
    yield "first_units", folds
    unregister_method("first_units")


def test_a_registered_method_runs_through_prune_the_callback_and_the_trainer(toy_method, tmp_path):
    from hf_prune.callbacks import PruningCallback
    from hf_prune.trainer import PruningTrainer

    name, folds = toy_method
    cfg = hp.PruningConfig(method=name, heads_keep=0.5, neurons_keep=0.5, progress=False)
    tiny = BY_NAME["bert"]
    dense = tiny.model()
    model, plan = hp.prune(tiny.model(), None, cfg)
    assert plan.heads == [[0, 1]] * 3 and plan.neurons == [list(range(24))] * 3 and folds == [2.0]
    down = "bert.encoder.layer.0.output.dense.weight"
    torch.testing.assert_close(model.state_dict()[down], 2 * dense.state_dict()[down][:, :24])
    with pytest.raises(ValueError, match="mask_tuning only apply to method='retraining_free'"):
        hp.PruningConfig(method=name, heads_keep=0.5, mask_tuning=False)

    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": i % 2} for i in range(16)]
    args = T.TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4,
                               report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    callback = PruningCallback(cfg)
    T.Trainer(model=tiny.model(), args=args, train_dataset=rows, callbacks=[callback]).train()
    assert callback.plan.heads == plan.heads and callback.plan.neurons == plan.neurons and len(folds) == 2
    trainer = PruningTrainer(model=tiny.model(), args=args, train_dataset=rows, pruning_config=cfg)
    trainer.train()
    assert hp.PrunePlan.of(trainer.model).physical_sizes() == hp.PrunePlan.of(model).physical_sizes()
    assert len(folds) == 3


@pytest.fixture
def toy_unit_kind():
    """A classifier's output classes as a unit kind (a model that only ever needs some of its classes): one
    registration, then plans, cuts, masks, costs, saves and reloads handle it."""
    from hf_prune.unit_kinds import UnitKind, register_unit_kind, unregister_unit_kind

    def cut(model, positions):
        head = model.classifier
        hp.modeling_pruned.slice_linear_(head, torch.tensor(positions), 0)
        model.num_labels = head.out_features  # what the loss reshapes the logits by

    def resize(model, count):
        cut(model, list(range(count)))

    def mask(model, read):
        def hook(_module, _args, out):
            m = read()
            return None if m is None else out * m.to(out.dtype)  # (B, C) * (C,)

        return [model.classifier.register_forward_hook(hook)]

    register_unit_kind(UnitKind("classes", "output classes of a classifier", size=lambda config: config.num_labels,
                                count=lambda model: model.classifier.out_features, cut=cut, resize=resize, mask=mask,
                                unit_params=lambda model, hidden: hidden + 1))
    yield "classes"
    unregister_unit_kind("classes")


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**inputs_only(batch)).logits


def test_a_registered_unit_kind_is_cut_masked_costed_saved_and_reloaded(toy_unit_kind, tmp_path):
    from hf_prune.costs import count_params, plan_params
    from hf_prune.masks import LayerMasks, mask_hooks

    tiny = BY_NAME["bert"]
    dense, batch = tiny.model(), tiny.batch()
    plan = dataclasses.replace(hp.PrunePlan.dense(dense), heads=[[0, 1]] * 3,
                               units={toy_unit_kind: {"size": 3, "kept": [2, 0]}})
    assert plan.units == {"classes": {"size": 3, "kept": [0, 2]}} and "classes 2/3" in plan.summary()
    assert hp.PrunePlan.from_dict(json.loads(plan.to_json())) == plan
    assert "units" not in hp.PrunePlan.dense(dense).to_dict()  # plans without registered kinds are spelled as before
    with pytest.raises(hp.PlanMismatchError, match="in \\[0, 3\\)"):
        dataclasses.replace(plan, units={toy_unit_kind: {"size": 3, "kept": [3]}})
    with pytest.raises(hp.PlanMismatchError, match="not registered"):
        dataclasses.replace(plan, units={"labels": {"size": 3, "kept": [0]}})

    masks = LayerMasks(3)
    masks.units[toy_unit_kind] = torch.tensor([1.0, 0.0, 1.0])
    with mask_hooks(dense, masks):
        masked = _logits(dense, batch)
    assert (masked[:, 1] == 0).all()
    expected = plan_params(plan, dense)
    cut = hp.apply_plan_(tiny.model(), dataclasses.replace(plan, heads=[[0, 1, 2, 3]] * 3))
    torch.testing.assert_close(_logits(cut, batch), _logits(dense, batch)[:, [0, 2]])
    cut = hp.apply_plan_(tiny.model(), plan)
    assert count_params(cut) == expected
    # one class is its classifier row and bias
    assert expected == plan_params(dataclasses.replace(plan, units={}), dense) - (dense.config.hidden_size + 1)
    assert plan_params(hp.PrunePlan.dense(dense), cut) == count_params(dense)  # costs read what the model has

    cut.save_pretrained(tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["hf_prune"]["units"] == {"classes": 2}
    loaded = hp.load_pruned(tmp_path / "cut")
    torch.testing.assert_close(_logits(loaded, batch), _logits(cut, batch))
    replayed = hp.apply_plan_(tiny.model(), hp.load_plan(str(tmp_path / "cut")))
    torch.testing.assert_close(_logits(replayed, batch), _logits(cut, batch))
    further = hp.apply_plan_(cut, dataclasses.replace(plan, units={toy_unit_kind: {"size": 3, "kept": [2]}}))
    torch.testing.assert_close(_logits(further, batch), _logits(replayed, batch)[:, [1]])
    with pytest.raises(hp.PlanMismatchError, match="already removed"):
        hp.apply_plan_(further, plan)
    with pytest.raises(ValueError, match="cut unit kinds \\['classes'\\].*load_pruned"):
        T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut", trust_remote_code=True)
    with pytest.raises(ValueError, match="unit kinds \\['classes'\\].*ONNX"):
        hp.save_stock(loaded, tmp_path / "stock")
    assert not (tmp_path / "stock").exists()


def test_a_registered_unit_kind_runs_through_a_method_and_the_callback(toy_unit_kind, tmp_path):
    from hf_prune.callbacks import PruningCallback
    from hf_prune.methods import PruningMethod, register_method, unregister_method

    def plan(model, batches, config, context):  # drop the last class, keep every head and neuron
        return dataclasses.replace(hp.PrunePlan.of(model), units={toy_unit_kind: {"size": 3, "kept": [0, 1]}}), None

    register_method(PruningMethod("drop_last_class", plan=plan, summary="the last output class"))
    try:
        cfg = hp.PruningConfig(method="drop_last_class", heads_keep=1.0, progress=False)
        tiny = BY_NAME["bert"]
        model, kept = hp.prune(tiny.model(), None, cfg)
        assert model.classifier.out_features == 2 and kept.units[toy_unit_kind]["kept"] == [0, 1]
        torch.testing.assert_close(_logits(model, tiny.batch()), _logits(tiny.model(), tiny.batch())[:, :2])

        rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": i % 2} for i in range(8)]
        args = T.TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4,
                                   report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        callback = PruningCallback(cfg)
        trained = tiny.model()
        T.Trainer(model=trained, args=args, train_dataset=rows, callbacks=[callback]).train()
        assert callback.plan.units == kept.units
        assert callback.controller.masks.units[toy_unit_kind].tolist() == [1.0, 1.0, 0.0]
    finally:
        unregister_method("drop_last_class")
