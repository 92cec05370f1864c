"""Sentence-transformers models: pruned through their encoder, scored on their embedding, saved and reloaded as
sentence-transformers folders, trained by SentenceTransformerTrainer with PruningCallback. Tiny random encoders
built offline (the MiniLM tokenizer, a 3-layer encoder), and the real all-MiniLM-L6-v2 once."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import sentence_transformers as st  # the dev extra installs it
import torch
import transformers as T
from helpers import plan_masks
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MSELoss
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, StaticEmbedding, Transformer
from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

import hf_prune as hp
from hf_prune.embeddings import SentenceEmbedder, encoder
from hf_prune.resources import embedded_model_path, sst2_sample

ENCODERS = {"bert": (BertConfig, BertModel), "mpnet": (MPNetConfig, MPNetModel)}


def _tiny_st(tmp_path_factory, pooling: str = "mean", normalize: bool = True, family: str = "bert"):
    """A random 3-layer encoder (4 heads, 48 neurons; BERT or MPNet) with MiniLM's tokenizer, mean pooling and
    normalisation."""
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config_cls, model_cls = ENCODERS[family]
    model_cls(config_cls(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=66)).save_pretrained(folder)
    tok.save_pretrained(folder)
    word = Transformer(str(folder), max_seq_length=32)
    modules = [word, Pooling(word.get_embedding_dimension(), pooling)] + ([Normalize()] if normalize else [])
    return SentenceTransformer(modules=modules, device="cpu")


@pytest.fixture(scope="module")
def sentences():
    texts, _ = sst2_sample()
    return list(texts[:96]), list(texts[96:112])


@pytest.fixture(scope="module", params=list(ENCODERS))
def tiny_st(tmp_path_factory, request):
    return _tiny_st(tmp_path_factory, family=request.param)


def _embed(model, texts) -> torch.Tensor:
    return model.encode(texts, convert_to_tensor=True, batch_size=8)


def test_pruned_sentence_transformer_equals_the_masked_one(tiny_st, sentences):
    calib, probe = sentences
    dense = copy.deepcopy(tiny_st)
    cfg = hp.PruningConfig(flops_keep=0.5, progress=False)  # Fisher of a random projection of the embedding
    pruned, plan = hp.prune(copy.deepcopy(tiny_st), calib, cfg)
    assert type(pruned).__name__ == "SentenceTransformer" and type(encoder(pruned)).__name__.startswith("Pruned")
    assert hp.PrunePlan.of(SentenceEmbedder(pruned)) == plan  # the view reads the encoder's plan
    assert hp.count_flops(encoder(pruned), 32)["total"] <= 0.5 * hp.count_flops(encoder(dense), 32)["total"]
    with torch.no_grad(), hp.mask_hooks(encoder(dense), plan_masks(plan)):
        masked = _embed(dense, probe)
    torch.testing.assert_close(_embed(pruned, probe), masked, atol=1e-5, rtol=1e-5)
    assert torch.linalg.vector_norm(_embed(pruned, probe), dim=-1).sub(1).abs().max() < 1e-5  # still normalised


def test_retraining_free_refits_on_the_embedding_and_the_cut_equals_the_masked_refit(tiny_st, sentences):
    calib, probe = sentences
    model = copy.deepcopy(tiny_st)
    batches = hp.sentence_batches(model, calib, batch_size=16)
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.5, progress=False, tuning_samples=64,
                           selection_samples=32)
    scored = SentenceEmbedder(model)
    plan, tuning = hp.methods.get_method("retraining_free").plan(scored, batches, cfg, hp.methods.MethodContext())
    selection = plan.meta["retraining_free"]["selection"]
    assert selection["divergence"][selection["chosen"]] <= selection["divergence"]["search"]  # on the embedding
    if tuning is not None:
        hp.fold_tuning_(scored, tuning)
    with torch.no_grad(), hp.mask_hooks(encoder(model), plan_masks(plan)):
        masked = _embed(model, probe)
    hp.apply_plan_(encoder(model), plan)
    torch.testing.assert_close(_embed(model, probe), masked, atol=1e-5, rtol=1e-5)
    # hp.prune runs the same steps on the same batches (tokenized ones pass through): the same plan
    _, again = hp.prune(copy.deepcopy(tiny_st), batches, cfg)
    assert (again.heads, again.neurons) == (plan.heads, plan.neurons)


def test_the_tuning_reconstructs_the_positions_the_pooling_reads(tmp_path_factory, sentences):
    """CLS pooling reads one token of the last layer; mean pooling every real token."""
    from hf_prune.retraining_free.layer_io import layer_inputs, read_positions

    calib, _ = sentences
    for pooling, only_first in (("cls", True), ("mean", False)):
        model = _tiny_st(tmp_path_factory, pooling=pooling)
        scored = SentenceEmbedder(model)
        batches = hp.sentence_batches(model, calib[:16], batch_size=16)
        layers = encoder(model).encoder.layer
        inputs = layer_inputs(scored, layers, batches)
        pos = read_positions(scored, layers[-1], batches, inputs)[0]
        mask = batches[0]["attention_mask"].bool()
        if only_first:
            assert pos is not None and pos[:, 0].all() and not pos[:, 1:].any()
        else:
            assert pos is None or torch.equal(pos, mask)


def test_saved_folder_reloads_as_sentence_transformer_with_and_without_hf_prune(tiny_st, sentences, tmp_path):
    calib, probe = sentences
    pruned, _ = hp.prune(copy.deepcopy(tiny_st), calib, hp.PruningConfig(flops_keep=0.5, progress=False))
    expected = _embed(pruned, probe)
    folder = hp.save_pruned(pruned, tmp_path / "st")
    files = {p.name for p in folder.iterdir()}
    assert {"modules.json", "modeling_pruned.py", "shapes.py", "channels.py", "prune_plan.json", "1_Pooling"} <= files
    reloaded = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(_embed(reloaded, probe), expected, atol=0, rtol=0)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_prune"] = None  # as on a machine without hf_prune
        import torch
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(folder)!r}, trust_remote_code=True, device="cpu")
        assert type(model[0].model).__name__.startswith("Pruned"), type(model[0].model)
        got = model.encode({probe!r}, convert_to_tensor=True, batch_size=8)
        torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=0, rtol=0)
        print("REMOTE-OK")
        """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert "REMOTE-OK" in r.stdout, r.stderr[-3000:]


def test_a_uniform_cut_saves_as_a_plain_sentence_transformer(tiny_st, sentences, tmp_path):
    calib, probe = sentences
    # BERT's stock config derives the head size from the head count: FFN width and depth are what it can express
    cfg = hp.PruningConfig(neurons_keep=0.5, layers_keep=2, allocation="uniform", deployable=True, progress=False)
    pruned, _ = hp.prune(copy.deepcopy(tiny_st), calib, cfg)
    folder = hp.save_pruned(pruned, tmp_path / "stock", deployable=True)
    assert not (folder / "modeling_pruned.py").exists()
    reloaded = SentenceTransformer(str(folder), device="cpu")  # no remote code
    assert not type(reloaded[0].model).__name__.startswith("Pruned") and reloaded[0].model.config.num_hidden_layers == 2
    torch.testing.assert_close(_embed(reloaded, probe), _embed(pruned, probe), atol=1e-6, rtol=1e-6)
    assert type(encoder(pruned)).__name__.startswith("Pruned")  # the model itself is left as it was


def test_bad_input_is_refused_before_any_work(tiny_st, sentences, tmp_path, tmp_path_factory):
    calib, _ = sentences
    cfg = hp.PruningConfig(flops_keep=0.5, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        hp.prune(copy.deepcopy(tiny_st), calib[:5], cfg)
    with pytest.raises(ValueError, match="0 non-empty sentences"):
        hp.prune(copy.deepcopy(tiny_st), ["", "  "], cfg)
    with pytest.raises(TypeError, match="list of strings"):
        hp.prune(copy.deepcopy(tiny_st), "one sentence", cfg)
    static = SentenceTransformer(modules=[StaticEmbedding(AutoTokenizer.from_pretrained(
        embedded_model_path()), embedding_dim=8)], device="cpu")
    with pytest.raises(TypeError, match="not a transformers model"):
        hp.prune(static, calib, cfg)
    max_pooled = _tiny_st(tmp_path_factory, pooling="max")
    with pytest.raises(ValueError, match="pools with 'max'.*mask_tuning=False"):
        hp.prune(max_pooled, calib, hp.PruningConfig(method="retraining_free", flops_keep=0.5, progress=False))
    pruned, _ = hp.prune(copy.deepcopy(tiny_st), calib, cfg)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hp.save_sentence_transformer(pruned, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def _distillation_dataset(teacher, texts):
    import datasets

    return datasets.Dataset.from_dict({"sentence": texts, "label": teacher.encode(texts).tolist()})


@pytest.mark.parametrize("schedule", [hp.PruningSchedule("one_shot", start_step=2),
                                      hp.PruningSchedule("gradual", start_step=1, end_step=5, frequency=2)],
                         ids=["one_shot", "gradual"])
def test_sentence_transformer_trainer_with_the_callback_trains_the_masked_model_and_the_cut_equals_it(
        tiny_st, sentences, tmp_path, schedule):
    calib, probe = sentences
    teacher = copy.deepcopy(tiny_st)
    student = copy.deepcopy(tiny_st)
    callback = hp.PruningCallback(hp.PruningConfig(flops_keep=0.5, progress=False), schedule)
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=16, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = st.SentenceTransformerTrainer(model=student, args=args,
                                            train_dataset=_distillation_dataset(teacher, calib),
                                            loss=MSELoss(student), callbacks=[callback])
    trainer.train()
    assert callback.plan is not None and callback.stats["prune/flops_kept"] <= 0.5
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    masked = _embed(student, probe)  # masked weights are zero: the hooks are gone, the outputs are the masked ones
    callback.prune_model_(student)
    assert type(encoder(student)).__name__.startswith("Pruned")
    torch.testing.assert_close(_embed(student, probe), masked, atol=1e-5, rtol=1e-5)


def _token_rows(model, texts):
    import datasets

    features = model.preprocess(texts)
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features]
    return datasets.Dataset.from_dict({k: [row[row_mask.bool()].tolist() for row, row_mask in
                                           zip(features[k], features["attention_mask"])] for k in keep})


def test_pruning_trainer_distils_the_embedding_and_saves_a_sentence_transformer_folder(tiny_st, sentences, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    calib, probe = sentences
    teacher = copy.deepcopy(tiny_st)
    student = copy.deepcopy(tiny_st)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=16,
                             learning_rate=2e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True)
    trainer = hp.PruningTrainer(student, args, pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False),
                                distillation=hp.DistillationConfig(alpha=1.0), teacher_model=teacher,
                                train_dataset=_token_rows(student, calib),
                                data_collator=DataCollatorWithPadding(student.tokenizer))
    assert trainer.outer_model is student
    trainer.train()
    assert type(encoder(student)).__name__.startswith("Pruned")  # the user's model object was cut and trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])  # the embedding distance to the teacher shrinks
    trainer.save_model(str(tmp_path / "final"))
    reloaded = SentenceTransformer(str(tmp_path / "final"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(_embed(reloaded, probe), _embed(student, probe), atol=0, rtol=0)


def test_lora_recovery_of_a_sentence_transformer_merges_into_the_pruned_encoder(tiny_st, sentences, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    calib, probe = sentences
    student = copy.deepcopy(tiny_st)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=16,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True)
    trainer = hp.PruningTrainer(student, args, pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False),
                                distillation=hp.DistillationConfig(alpha=1.0), teacher_model=copy.deepcopy(tiny_st),
                                recovery="lora", train_dataset=_token_rows(student, calib),
                                data_collator=DataCollatorWithPadding(student.tokenizer))
    pruned_before = None

    class Snapshot(T.TrainerCallback):
        def on_train_begin(self, *a, **k):
            nonlocal pruned_before
            pruned_before = _embed(student, probe)  # after the cut, before any LoRA step

    trainer.add_callback(Snapshot())
    trainer.train()
    enc = encoder(student)
    assert type(enc).__name__.startswith("Pruned") and not any("lora" in n for n, _ in enc.named_parameters())
    assert not torch.allclose(_embed(student, probe), pruned_before)  # the merged adapters changed the weights
    trainer.save_model(str(tmp_path / "final"))
    reloaded = SentenceTransformer(str(tmp_path / "final"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(_embed(reloaded, probe), _embed(student, probe), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformer(embedded_model_path(), device="cpu")


def test_real_minilm_retraining_free_keeps_the_embedding_and_reloads(minilm, tmp_path):
    texts, _ = sst2_sample()
    calib, probe = list(texts[:128]), list(texts[200:264])
    dense = _embed(minilm, probe)
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.5, progress=False, tuning_samples=96,
                           selection_samples=32)
    pruned, plan = hp.prune(copy.deepcopy(minilm), calib, cfg)
    cut = _embed(pruned, probe)
    random_cut, _ = hp.prune(copy.deepcopy(minilm), None, hp.PruningConfig(importance="random", flops_keep=0.5))
    cos = torch.nn.functional.cosine_similarity(cut, dense).mean()
    cos_random = torch.nn.functional.cosine_similarity(_embed(random_cut, probe), dense).mean()
    assert cos > cos_random + 0.05, (float(cos), float(cos_random))  # chosen on the embedding, not at random
    folder = hp.save_pruned(pruned, tmp_path / "minilm-50")
    reloaded = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(_embed(reloaded, probe), cut, atol=0, rtol=0)


class _Fixed:
    """Stands for a model: ``encode`` returns the vector given for each sentence."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, sentences, **kwargs):
        return torch.tensor([self.vectors[s] for s in sentences], dtype=torch.float)


def test_sts_and_retrieval_metrics_on_known_answers():
    from hf_prune.embeddings.evaluation import RetrievalSet, StsPairs, retrieval_scores, sts_spearman

    v = {"a": [1, 0], "b": [0.9, 0.1], "c": [0, 1], "d": [0.6, 0.8], "q1": [1, 0], "q2": [0, 1]}
    model = _Fixed(v)
    pairs = StsPairs(["a", "a", "a"], ["b", "d", "c"], [5.0, 2.0, 0.0])  # cosine order = score order
    assert sts_spearman(model, pairs) == pytest.approx(100.0)
    assert sts_spearman(model, StsPairs(["a", "a", "a"], ["b", "d", "c"], [0.0, 2.0, 5.0])) == pytest.approx(-100.0)
    # q1's answer "d" ranks 3rd among a, b, d, c (cosines 1, 0.99, 0.6, 0); q2's answer "c" ranks first
    data = RetrievalSet(["q1", "q2"], ["a", "b", "d", "c"], [2, 3])
    scores = retrieval_scores(model, data, k=2)
    assert scores == {"mrr@2": pytest.approx(50.0), "recall@2": pytest.approx(50.0)}
    assert retrieval_scores(model, data, k=10) == {"mrr@10": pytest.approx((1 / 3 + 1) / 2 * 100),
                                                   "recall@10": pytest.approx(100.0)}
