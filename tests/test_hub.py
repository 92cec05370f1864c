"""hf_prune.hub: model cards and pushing, against a local fake of the Hub HTTP API (no network)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
import yaml
from helpers import random_plan
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.checkpoint import CorruptCheckpointError
from hf_prune.hub import resolve_token

REPO = "someone/tiny-pruned"
REQUIRED = {"config.json", "model.safetensors", "prune_plan.json", "modeling_pruned.py", "shapes.py", "channels.py", "README.md"}


# ----------------------------------------------------------------------------------------------- fake Hub


class FakeHub:
    """What a push sends: requests ``(method, path, authorization)`` and committed files ``{path: bytes}``.

    Implements the calls HfApi.create_repo + upload_folder make: POST /api/repos/create,
    POST /api/validate-yaml, POST /api/models/{repo}/preupload/{rev} (every file "regular", so contents come
    base64-encoded inside the commit and no LFS/Xet transfer happens) and POST /api/models/{repo}/commit/{rev}
    (NDJSON). Anything else is answered 404 and listed in ``unhandled``.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.files: dict[str, bytes] = {}
        self.repos: set[str] = set()
        self.unhandled: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while size := int(self.rfile.readline().strip(), 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._body()
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                hub.unhandled.append(f"GET {self.path}")
                self._reply(404, {"error": "not implemented by the fake Hub"})

            def do_POST(self):
                body = self._body()
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, self.headers.get("Authorization")))
                base = f"http://{self.headers['Host']}"
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'someone'}/{req['name']}"
                    if repo in hub.repos:
                        return self._reply(
                            409, {"error": "You already created this model repo", "url": f"{base}/{repo}"}
                        )
                    hub.repos.add(repo)
                    return self._reply(200, {"url": f"{base}/{repo}"})
                if path == "/api/validate-yaml":
                    front = json.loads(body)["content"].split("\n---\n")[0].removeprefix("---\n")
                    yaml.safe_load(front)  # a broken front matter fails the push, as on the Hub
                    return self._reply(200, {"errors": [], "warnings": []})
                if m and m[1] not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if m and m[2] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes})
                if m and m[2] == "commit":
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] != "header":
                            hub.unhandled.append(f"commit item {item['key']}")
                    oid = "a" * 40
                    return self._reply(200, {"commitUrl": f"{base}/{m[1]}/commit/{oid}", "commitOid": oid})
                hub.unhandled.append(f"POST {path}")
                return self._reply(404, {"error": "not implemented by the fake Hub"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _no_stored_token(monkeypatch, tmp_path: Path) -> None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # huggingface_hub computed these from HF_HOME at import time
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # after huggingface_hub's import: push_pruned must re-read it
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest makes the test session offline
    _no_stored_token(monkeypatch, tmp_path)
    yield hub
    hub.close()


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory):
    """A tiny BERT classifier pruned by the public API (magnitude scores, half the FLOPs), saved."""
    tiny = BY_NAME["bert"]
    model, _ = hp.prune(tiny.model(), None, hp.PruningConfig(importance="magnitude", flops_keep=0.5))
    path = tmp_path_factory.mktemp("bert") / "ckpt"
    model.save_pretrained(path)
    return model, path


def _copy(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "tiny-pruned"))


def _logits(model, tiny):
    with torch.no_grad():
        return output_tensor(model(**inputs_only(tiny.batch())))


# ----------------------------------------------------------------------------------------------- push


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "create-commit"])
def test_push_uploads_a_checkpoint_that_loads(fake_hub, bert_ckpt, tmp_path, monkeypatch, xet):
    # With hf_xet installed upload_folder takes its pipelined path, otherwise create_commit: serve both.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", not xet)
    model, src = bert_ckpt
    ckpt = _copy(src, tmp_path)
    (ckpt / "checkpoint-5").mkdir()  # Trainer leftovers: must not be uploaded
    (ckpt / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (ckpt / "optimizer.pt").write_bytes(b"x")

    url = hp.push_pruned(ckpt, REPO, token="hf_fake", card_kwargs={"base_model": "prajjwal1/bert-tiny"})

    assert url == f"{fake_hub.url}/{REPO}/commit/{'a' * 40}"
    assert not fake_hub.unhandled
    assert {r[1] for r in fake_hub.requests} >= {"/api/repos/create", f"/api/models/{REPO}/commit/main"}
    assert all(auth == "Bearer hf_fake" for _, _, auth in fake_hub.requests)
    assert REQUIRED <= set(fake_hub.files)
    assert not any("optimizer" in p or p.startswith("checkpoint-") for p in fake_hub.files)
    for name in REQUIRED:  # the bytes that arrived are the local files: a real upload
        assert fake_hub.files[name] == (ckpt / name).read_bytes(), name
    assert "prajjwal1/bert-tiny" in fake_hub.files["README.md"].decode()

    # What arrived is a complete checkpoint that reloads to the same model.
    arrived = tmp_path / "arrived"
    for name, data in fake_hub.files.items():
        (arrived / name).parent.mkdir(parents=True, exist_ok=True)
        (arrived / name).write_bytes(data)
    loaded = hp.load_pruned(arrived, BY_NAME["bert"].auto_class)
    torch.testing.assert_close(_logits(loaded, BY_NAME["bert"]), _logits(model, BY_NAME["bert"]), atol=0, rtol=0)

    # A second push to the same repo (409 from create_repo) goes through; an existing card is kept.
    (ckpt / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    hp.push_pruned(ckpt, REPO, token="hf_fake")
    assert fake_hub.files["README.md"] == b"---\nlicense: mit\n---\n# mine\n"


def test_incomplete_checkpoint_is_refused_before_any_request(fake_hub, bert_ckpt, tmp_path):
    ckpt = _copy(bert_ckpt[1], tmp_path)
    (ckpt / "prune_plan.json").unlink()
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"missing prune_plan\.json, model\.safetensors"):
        hp.push_pruned(ckpt, REPO, token="hf_fake")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hp.push_pruned(tmp_path / "nowhere", REPO, token="hf_fake")
    plain = _copy(bert_ckpt[1], tmp_path / "plain")  # all files there, but not an hf_prune config
    (plain / "config.json").write_text(json.dumps(_without_hf_prune(plain / "config.json")))
    with pytest.raises(CorruptCheckpointError, match="no 'hf_prune' section"):
        hp.push_pruned(plain, REPO, token="hf_fake")
    assert fake_hub.requests == [] and not (ckpt / "README.md").exists()


def _without_hf_prune(config_file: Path) -> dict:
    cfg = json.loads(config_file.read_text())
    cfg.pop("hf_prune")
    return cfg


def test_check_can_push_fails_early_with_the_fix(fake_hub, bert_ckpt, monkeypatch):
    with pytest.raises(PermissionError, match="hf auth login") as e:
        hp.check_can_push(REPO)
    assert "HF_TOKEN" in str(e.value)
    with pytest.raises(PermissionError):  # push_pruned checks first, before writing or sending anything
        hp.push_pruned(bert_ckpt[1], REPO)
    for bad in (None, "", "bad repo", "a/b/c", "-dash/x"):
        with pytest.raises(ValueError, match="repo"):
            hp.check_can_push(bad, token="hf_fake")
    assert hp.check_can_push(REPO, token="hf_explicit") == "hf_explicit"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hp.check_can_push(REPO) == resolve_token() == "hf_from_env"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        hp.check_can_push(REPO)
    assert fake_hub.requests == []


# ----------------------------------------------------------------------------------------------- card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n")[0].removeprefix("---\n"))


@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_model_card_content(name, tmp_path):
    tiny = BY_NAME[name]
    model = tiny.model()
    plan = random_plan(model, seed=3)
    hp.apply_plan_(model, plan)
    model.save_pretrained(tmp_path / "ckpt")
    dense = tiny.model()
    metrics = {
        "dense": {"accuracy": 0.837, "f1": 0.9},
        "pruned": {"accuracy": 0.712},
        "recovered": {"accuracy": 0.8312},
    }
    speedup = {
        "device": "cpu, 2 threads",
        "seq_len": 128,
        "rows": [{"batch_size": 1, "dense_ms": 12.5, "pruned_ms": 7.25, "speedup": 1.72, "ideal": 2.1}],
    }
    path = hp.write_model_card(
        tmp_path / "ckpt",
        repo_id="someone/x",
        base_model="org/base",
        task="SST-2",
        dataset="nyu-mll/glue",
        metrics=metrics,
        speedup=speedup,
        recipe={"importance": "magnitude", "flops_keep": 0.5},
        extra_tags=["glue"],
    )
    text = path.read_text()
    assert path == tmp_path / "ckpt" / "README.md"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind

    meta = _front_matter(text)
    assert meta["base_model"] == "org/base" and meta["library_name"] == "transformers"
    assert meta["tags"][:4] == ["hf_prune", "pruned", "structured-pruning", "glue"]
    assert meta["datasets"] == ["nyu-mll/glue"]
    pipeline = {"bert": "text-classification", "llama": "text-generation", "vit": "image-classification"}[name]
    assert meta["pipeline_tag"] == pipeline
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == pipeline and result["dataset"]["type"] == "nyu-mll/glue"
    assert result["metrics"] == [{"type": "accuracy", "value": 0.8312, "name": "accuracy (recovered)"}]

    # per-layer table: one row per layer with the kept counts (KV heads only for grouped-query attention)
    gqa = plan.num_kv_heads != plan.num_heads
    for i, s in enumerate(plan.layer_sizes()):
        kv = f" {s['num_kv_heads']}/{plan.num_kv_heads} |" if gqa else ""
        assert (
            f"| {i} | {s['num_heads']}/{plan.num_heads} |{kv} {s['intermediate_size']}/{plan.intermediate_size} |"
            in text
        )
    assert ("KV heads" in text) == gqa
    # summary numbers agree with counting on the real models
    assert f"parameters kept {hp.count_params(model):,}/{hp.count_params(dense):,}" in text
    flops = hp.count_flops(model)["total"], hp.count_flops(dense)["total"]
    assert f"FLOPs kept at sequence length 128 {flops[0]:,}/{flops[1]:,}" in text
    kept = sum(len(h) for h in plan.heads)
    assert f"attention heads kept {kept}/{plan.num_heads * plan.num_layers} " in text
    for value in ("0.837", "0.712", "0.8312", "12.5", "7.25", "1.72", "cpu, 2 threads"):
        assert value in text
    auto = tiny.auto_class.__name__
    assert f'hf_prune.load_pruned("someone/x", {auto})' in text
    assert f'{auto}.from_pretrained("someone/x", trust_remote_code=True)' in text
    assert "flops_keep: 0.5" in text


def test_model_card_minimal_defaults(bert_ckpt, tmp_path):
    text = hp.model_card(bert_ckpt[1])
    meta = _front_matter(text)
    assert "base_model" not in meta and "model-index" not in meta
    assert f'load_pruned("{bert_ckpt[1].name}", AutoModelForSequenceClassification)' in text  # folder name
    assert "criterion: magnitude" in text  # provenance from prune_plan.json
    (tmp_path / "config.json").write_text(json.dumps(_without_hf_prune(bert_ckpt[1] / "config.json")))
    with pytest.raises(ValueError, match="not a checkpoint saved by hf_prune"):
        hp.model_card(tmp_path)


def test_card_names_the_embedded_models_hub_id_and_never_links_a_local_path(bert_ckpt, tmp_path):
    from hf_prune.resources import base_model_id, embedded_model_path

    assert base_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id(embedded_model_path()) == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert base_model_id(str(tmp_path)) is None  # a local folder is no Hub id
    with pytest.raises(ValueError, match="neither a local folder nor a valid Hub repo id"):
        base_model_id("not a/valid//id")
    meta = _front_matter(hp.model_card(bert_ckpt[1], base_model=base_model_id("minilm")))
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    text = hp.model_card(bert_ckpt[1], base_model=base_model_id(str(tmp_path)))
    assert "base_model" not in _front_matter(text) and "huggingface.co/" + str(tmp_path) not in text
    with pytest.raises(ValueError, match="base_model 'minilm!' is not a valid Hub repo id"):
        hp.model_card(bert_ckpt[1], base_model="minilm!")
    with pytest.raises(ValueError, match="repo_id 'a/b/c' is not a valid Hub repo id"):
        hp.model_card(bert_ckpt[1], repo_id="a/b/c")


def test_a_stock_export_with_removed_layers_is_pushed_and_its_card_says_so(fake_hub, tmp_path):
    tiny = BY_NAME["llama"]
    cfg = hp.PruningConfig(importance="magnitude", layers_keep=2, neurons_keep=0.5, allocation="uniform",
                           deployable=True, progress=False)
    dense = tiny.model()
    model, _ = hp.prune(tiny.model(), [tiny.batch()], cfg)
    folder = hp.save_pruned(model, tmp_path / "stock", deployable=True)
    hp.push_pruned(folder, REPO, token="hf_fake")
    assert {"config.json", "model.safetensors", "prune_plan.json", "README.md"} <= set(fake_hub.files)
    assert "modeling_pruned.py" not in fake_hub.files and "shapes.py" not in fake_hub.files
    card = fake_hub.files["README.md"].decode()
    assert "layers kept 2/3" in card and "stock architecture" in card and "trust_remote_code" not in card
    removed = [i for i in range(3) if i not in model.prune_plan.kept_layers]
    assert f"| {removed[0]} | removed | removed | removed |" in card  # the dense layer id, with its KV column
    # the dense side of each ratio is the whole dense model, not the plan's kept layers
    assert f"parameters kept {hp.count_params(model):,}/{hp.count_params(dense):,}" in card
    dense_flops = hp.count_flops(dense, 128)["total"]
    assert f"layer FLOPs kept at sequence length 128 {hp.count_flops(model, 128)['total']:,}/{dense_flops:,}" in card


def test_card_of_a_depth_pruned_checkpoint_counts_the_dense_layers(tmp_path):
    tiny = BY_NAME["bert"]
    model = tiny.model()
    dense_params = hp.count_params(model)
    hp.prune(model, [tiny.batch()], hp.PruningConfig(layers_keep=2, progress=False))
    model.save_pretrained(tmp_path / "ckpt")
    card = hp.model_card(tmp_path / "ckpt")
    kept = hp.count_params(model)
    assert "layers kept 2/3" in card and "attention heads kept 8/12" in card
    assert f"parameters kept {kept:,}/{dense_params:,}" in card


def test_the_card_says_how_to_run_the_serving_files_beside_the_checkpoint(bert_ckpt, tmp_path):
    folder = _copy(bert_ckpt[1], tmp_path)
    assert "Run it in" not in hp.model_card(folder)  # nothing exported: no section
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"x")
    (folder / "onnx" / "model_int8.onnx").write_bytes(b"x")
    text = hp.model_card(folder, repo_id="me/tiny")
    assert 'hf_hub_download("me/tiny", "onnx/model.onnx")' in text and "`onnx/model_int8.onnx`" in text
    (folder / "model-q8_0.gguf").write_bytes(b"x")
    text = hp.model_card(folder, repo_id="me/tiny")
    assert "llama-cli -m model-q8_0.gguf" in text and 'filename="model-q8_0.gguf"' in text
    assert "FROM ./model-q8_0.gguf" in text
    assert "vllm serve" not in text
    (folder / "vllm").mkdir()
    (folder / "vllm" / "config.json").write_text("{}")
    text = hp.model_card(folder, repo_id="me/tiny")
    assert 'huggingface-cli download me/tiny --include "vllm/*"' in text and "vllm serve ./vllm" in text
