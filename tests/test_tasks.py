"""GLUE task registry and loaders: real GLUE TSVs from ../shared, exports in csv/jsonl/parquet, bad inputs."""

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest

from hf_prune.recipes.tasks import GLUE_TASKS, TaskSpec, get_task, load_task_data, prepare_task_data, split_file_names

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"real GLUE files not found at {GLUE_DIR}")


# ------------------------------------------------------------------------------------------------------ registry
EXPECTED = {  # name: (text fields, label names, metrics, eval splits)
    "cola": (("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), ("validation",)),
    "sst2": (("sentence",), ("negative", "positive"), ("accuracy",), ("validation",)),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), ("validation",)),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), ("validation",)),
    "stsb": (("sentence1", "sentence2"), (), ("pearson", "spearmanr"), ("validation",)),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
             ("validation_matched", "validation_mismatched")),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), ("validation",)),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), ("validation",)),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), ("validation",)),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_registry_entry(name):
    spec = get_task(name)
    text, labels, metrics, evals = EXPECTED[name]
    assert (spec.text_fields, spec.label_names, spec.metric_names, spec.eval_splits) == (text, labels, metrics, evals)
    assert spec.is_regression == (name == "stsb")
    assert spec.num_labels == (1 if name == "stsb" else len(labels))
    assert spec.splits == ("train", *evals) and spec.hub_config == name
    assert spec.id2label == dict(enumerate(labels)) and spec.main_metric == metrics[0]


def test_registry_is_complete_and_frozen():
    assert set(GLUE_TASKS) == set(EXPECTED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("rte").label_names = ()
    assert get_task("SST-2") is get_task("sst2") and get_task("STS-B").name == "stsb"


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'squad'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"):
        get_task("squad")


def test_custom_spec():
    spec = TaskSpec.custom("reviews", "text", label_column="stars", num_labels=3, eval_splits=["test"])
    assert spec.text_fields == ("text",) and spec.label_names == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert spec.metric_names == ("accuracy",) and spec.splits == ("train", "test")
    reg = TaskSpec.custom("sim", ["a", "b"], is_regression=True)
    assert reg.num_labels == 1 and reg.metric_names == ("pearson", "spearmanr")
    with pytest.raises(ValueError, match="label_names or num_labels"):
        TaskSpec.custom("x", "text")
    with pytest.raises(ValueError, match="exactly two labels"):
        TaskSpec.custom("x", "text", num_labels=3, metric_names=["f1"])
    with pytest.raises(ValueError, match="unknown metrics"):
        TaskSpec.custom("x", "text", num_labels=2, metric_names=["bleu"])


# ------------------------------------------------------------------------------------------ real GLUE TSV files
REAL = [  # task, splits, rows per split, label counts per split (by label id)
    ("sst2", ("train", "validation"), (67_349, 872), ({0: 29_780, 1: 37_569}, {0: 428, 1: 444})),
    ("cola", ("train", "validation"), (8_551, 1_043), ({0: 2_528, 1: 6_023}, {0: 322, 1: 721})),
    ("mrpc", ("train", "validation"), (3_668, 408), ({0: 1_194, 1: 2_474}, {0: 129, 1: 279})),
    ("rte", ("train", "validation"), (2_490, 277), ({0: 1_249, 1: 1_241}, {0: 146, 1: 131})),
    ("qnli", ("validation",), (5_463,), ({0: 2_702, 1: 2_761},)),
]


@needs_glue
@pytest.mark.parametrize("task,splits,rows,label_counts", REAL, ids=[r[0] for r in REAL])
def test_real_glue_tsv(task, splits, rows, label_counts):
    data = load_task_data(task, GLUE_DIR, splits=splits if task == "qnli" else None)  # qnli: dev only offline
    spec = get_task(task)
    assert list(data) == list(splits)
    for split, n, counts in zip(splits, rows, label_counts):
        ds = data[split]
        assert ds.num_rows == n
        assert ds.column_names == [*spec.text_fields, "label", "idx"]
        assert ds.features["label"].names == list(spec.label_names)
        assert dict(Counter(ds["label"])) == counts
        assert list(ds["idx"][:3]) == [0, 1, 2]
        assert all(isinstance(t, str) and t for t in ds[spec.text_fields[-1]][:50])


@needs_glue
def test_real_rows_match_hf_glue():
    # quoting off: MRPC's second sentence keeps its leading quote mark; BOM stripped from the header
    mrpc = load_task_data("mrpc", GLUE_DIR / "mrpc", splits=["validation"])["validation"][0]
    assert mrpc["sentence2"].startswith('" The foodservice pie business') and mrpc["label"] == 1
    sst2 = load_task_data("sst2", GLUE_DIR, splits=["validation"])["validation"][0]
    assert sst2["sentence"].strip() == "it 's a charming and often affecting journey ." and sst2["label"] == 1
    cola = load_task_data("cola", GLUE_DIR, splits=["validation"])["validation"][0]
    assert cola == {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0}


@needs_glue
def test_real_stsb_regression():
    data = load_task_data("stsb", GLUE_DIR)
    assert (data["train"].num_rows, data["validation"].num_rows) == (5_749, 1_500)
    assert data["validation"].features["label"] == datasets.Value("float32")
    labels = data["validation"]["label"]
    assert min(labels) == 0.0 and max(labels) == 5.0 and data["validation"][0]["label"] == 5.0


@needs_glue
def test_glue_download_folder_names_and_subsampling(tmp_path):
    shutil.copytree(GLUE_DIR / "rte", tmp_path / "RTE")  # the official download names it RTE/
    full = load_task_data("rte", tmp_path)
    small = load_task_data("rte", tmp_path, max_train_samples=50, max_eval_samples=20, seed=1)
    again = load_task_data("rte", tmp_path, max_train_samples=50, max_eval_samples=20, seed=1)
    assert (small["train"].num_rows, small["validation"].num_rows) == (50, 20)
    assert list(small["train"]["idx"]) == list(again["train"]["idx"])  # deterministic
    assert list(small["train"]["idx"]) == sorted(small["train"]["idx"])  # file order kept
    head = load_task_data("rte", tmp_path, max_train_samples=5, seed=None)["train"]
    assert list(head["idx"]) == [0, 1, 2, 3, 4] and head[0] == full["train"][0]


# ------------------------------------------------------------------------------------------ synthetic files
def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]


def _mnli_rows(pairs: list[tuple[str, str, str]]) -> list[list[str]]:
    return [MNLI_HEADER] + [[str(i), "1", "1e", "fiction", "(", "(", "(", "(", p, h, g, g]
                            for i, (p, h, g) in enumerate(pairs)]


def test_mnli_tsv_layout(tmp_path):
    pairs = [("A man sleeps.", "A man is awake.", "contradiction"), ('He said "hi".', "He spoke.", "entailment")]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write_tsv(tmp_path / "MNLI" / name, _mnli_rows(pairs + [("x", "y", "neutral")]))
    data = load_task_data("mnli", tmp_path)
    assert list(data) == ["train", "validation_matched", "validation_mismatched"]
    assert list(data["validation_mismatched"]["label"]) == [2, 0, 1]
    assert data["train"][1] == {"premise": 'He said "hi".', "hypothesis": "He spoke.", "label": 0, "idx": 1}


def test_short_tsv_rows_are_skipped_like_hf_glue(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["good", "1"], ["broken"], ["bad", "0"]])
    with pytest.warns(UserWarning, match="skipped 1 rows"):
        ds = load_task_data("sst2", tmp_path, splits=["train"])["train"]
    assert list(ds["sentence"]) == ["good", "bad"] and list(ds["idx"]) == [0, 2]


def test_csv_jsonl_parquet_exports(tmp_path):
    rows = [{"sentence1": "NA", "sentence2": "b", "label": 0, "idx": 0},
            {"sentence1": 'say "yes"', "sentence2": "d", "label": 1, "idx": 1}]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "train.csv"), index=False)
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "test.parquet"))
    data = load_task_data("rte", tmp_path, splits=["train", "validation", "test"], cache_dir=str(tmp_path / "c"))
    for split in data:
        assert data[split].to_list() == rows, split  # "NA" stays text
        assert data[split].features["label"].names == ["entailment", "not_entailment"]


def test_custom_task_with_named_columns(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"review": "great", "stars": "pos"}\n{"review": "awful", "stars": "neg"}\n')
    (tmp_path / "dev.jsonl").write_text('{"review": "fine", "stars": "pos"}\n')
    spec = TaskSpec.custom("reviews", "review", label_column="stars", label_names=["neg", "pos"])
    data = load_task_data(spec, tmp_path, cache_dir=str(tmp_path / "c"))
    assert data["train"].to_list() == [{"review": "great", "label": 1, "idx": 0},
                                       {"review": "awful", "label": 0, "idx": 1}]
    assert data["validation"].num_rows == 1
    # an in-memory DatasetDict goes through the same checks
    raw = {"train": datasets.Dataset.from_dict({"review": ["no", "ok"], "stars": [0, 1]}).select([1])}
    assert prepare_task_data(spec, raw, splits=["train"])["train"].to_list() == [{"review": "ok", "label": 1, "idx": 0}]


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_split_names_expected_files(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["good", "1"]])
    with pytest.raises(FileNotFoundError, match=r"split 'validation'.*dev\.tsv, validation\.tsv, dev\.csv"):
        load_task_data("sst2", tmp_path)
    assert split_file_names("validation_matched")[:2] == ["dev_matched.tsv", "validation_matched.tsv"]


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_task_data("sst2", tmp_path / "nowhere")


def test_missing_column_names_it_and_lists_found(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(ValueError, match=r"missing column 'sentence'.*columns found: \['text', 'label'\]"):
        load_task_data("sst2", tmp_path, splits=["train"], cache_dir=str(tmp_path / "c"))
    bad_header = tmp_path / "h" / "dev_matched.tsv"
    _write_tsv(bad_header, [MNLI_HEADER[:-1], ["0"] * 11])  # no gold_label column
    with pytest.raises(ValueError, match=r"missing column 'gold_label'.*columns found: \['index'"):
        load_task_data("mnli", bad_header.parent, splits=["validation_matched"])


def test_label_outside_task_label_set(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["good", "1"], ["odd", "2"]])
    with pytest.raises(ValueError, match=r"label '2' is not a label of task 'sst2'.*\['negative', 'positive'\]"):
        load_task_data("sst2", tmp_path, splits=["train"])
    _write_tsv(tmp_path / "r" / "train.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "neutral"]])
    with pytest.raises(ValueError, match="label 'neutral' is not a label of task 'rte'"):
        load_task_data("rte", tmp_path / "r", splits=["train"])


def test_regression_task_given_string_labels(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": "high"}\n')
    with pytest.raises(ValueError, match="regression task 'stsb' needs numeric labels, got 'high'"):
        load_task_data("stsb", tmp_path, splits=["train"], cache_dir=str(tmp_path / "c"))


def test_prepare_missing_split():
    raw = {"train": datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]})}
    with pytest.raises(ValueError, match=r"no split \['validation'\]; splits found: \['train'\]"):
        prepare_task_data("sst2", raw)


def test_hub_offline_error_says_pass_data_dir(tmp_path):
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest) so the Hub is not contacted")
    with pytest.raises(RuntimeError, match=r"nyu-mll/glue.*Pass data_dir="):
        load_task_data("rte", cache_dir=str(tmp_path))  # empty cache: fails at once offline
    with pytest.raises(ValueError, match="has no hub_path"):
        load_task_data(TaskSpec.custom("x", "text", num_labels=2))


def test_hub_path_normalises_glue_shaped_data(monkeypatch):
    # what load_dataset("nyu-mll/glue", "rte") returns: ClassLabel labels and an unlabeled (-1) test split
    label = datasets.ClassLabel(names=["entailment", "not_entailment"])
    feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                               "label": label, "idx": datasets.Value("int32")})

    def split(labels):
        n = len(labels)
        return datasets.Dataset.from_dict({"sentence1": ["p"] * n, "sentence2": ["h"] * n, "label": labels,
                                           "idx": list(range(n))}, features=feats)

    calls = []

    def fake_load(path, config, cache_dir=None):
        calls.append((path, config))
        return datasets.DatasetDict(train=split([0, 1, 1]), validation=split([1]), test=split([-1, -1]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_task_data("rte", max_train_samples=2)
    assert calls == [("nyu-mll/glue", "rte")] and list(data) == ["train", "validation"]
    assert data["train"].num_rows == 2 and data["train"].features == feats
    with pytest.raises(ValueError, match="label -1 is not a label of task 'rte'"):
        load_task_data("rte", splits=["test"])
