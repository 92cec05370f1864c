"""Sharing pruned checkpoints on the Hugging Face Hub: a push that checks everything it can before the first byte
goes out, with the model card (:mod:`hf_prune.card`) written from the checkpoint's own files."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token

from .card import CARD_FILE, check_repo_id, model_card, write_model_card
from .checkpoint import CorruptCheckpointError
from .export import is_stock_export
from .io import WEIGHTS_INDEX_FILE, weight_file_names
from .plan import PrunePlan
from .shapes import CONFIG_KEY, MODELING_FILE, PLAN_FILE, SHAPES_FILE

__all__ = ["CARD_FILE", "check_can_push", "check_repo_id", "missing_files", "model_card", "push_pruned",
           "resolve_token", "write_model_card"]

# Trainer leftovers that are not part of the model (resume state, intermediate checkpoints, our temp files).
_UPLOAD_IGNORE = ["checkpoint-*", "optimizer.*", "scheduler.pt", "rng_state*.pth", "*.tmp"]


# ----------------------------------------------------------------------------------------------- reading


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_FILE
    return [folder / name for name in weight_file_names(index if index.exists() else None)]


def _is_stock_folder(folder: Path) -> bool:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return is_stock_export(raw, PrunePlan.load(folder / PLAN_FILE))
    except (OSError, ValueError):
        return False


def _remote_code(folder: Path) -> list[str]:
    """The modeling file and the kernels it imports relatively (a checkpoint written before ``channels.py`` existed
    carries a modeling file that does not import it)."""
    modeling = folder / MODELING_FILE
    text = modeling.read_text(encoding="utf-8") if modeling.is_file() else ""
    imported = re.findall(r"^from \.(\w+) import", text, flags=re.MULTILINE)
    return [MODELING_FILE] + [f"{name}.py" for name in dict.fromkeys(imported)] if text else [MODELING_FILE, SHAPES_FILE]


def missing_files(checkpoint_dir: str | Path) -> list[str]:
    """Files a complete pruned checkpoint needs that ``checkpoint_dir`` lacks (empty list: complete); a stock export
    (:func:`hf_prune.save_stock`) needs no remote code (``modeling_pruned.py`` and the kernels it imports)."""
    folder = Path(checkpoint_dir)
    wanted = ["config.json", PLAN_FILE] + ([] if _is_stock_folder(folder) else _remote_code(folder))
    return [n for n in wanted if not (folder / n).is_file()] + [
        f.name for f in _weight_files(folder) if not f.is_file()
    ]


# ----------------------------------------------------------------------------------------------- push


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN`` / the stored login; PermissionError if none.

    Args:
        token: an explicit Hub token (wins over the environment and the stored login).
    """
    token = token or get_token()
    if not token:
        raise PermissionError(
            "pushing to the Hub needs a token with write access and none was found. Run `hf auth login`, or set "
            "HF_TOKEN=hf_... in the environment, or pass token=... (create one at "
            "https://huggingface.co/settings/tokens)."
        )
    return token


def check_can_push(repo_id: str | None, token: str | None = None) -> str:
    """Fail now, before any long job, if a push could not work; return the token. Makes no network call.

    Args:
        repo_id: target repo, ``"name"`` or ``"namespace/name"``.
        token: explicit Hub token; default: ``HF_TOKEN`` or the stored ``hf auth login`` token.
    """
    if not repo_id:
        raise ValueError("pushing needs a repo id: pass repo_id='your-username/model-name'")
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:  # the flag every huggingface_hub request checks
        raise RuntimeError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE to push")
    return resolve_token(token)


def push_pruned(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    card_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Upload a pruned checkpoint folder to the Hub (creating the repo if needed); return the commit URL.

    Writes README.md first when the folder has none or ``card_kwargs`` is given. Trainer resume files
    (``checkpoint-*`` folders, optimizer/scheduler/RNG state) are not uploaded.

    Args:
        checkpoint_dir: folder written by ``save_pretrained`` of a pruned model (or by ``save_stock``).
        repo_id: target repo, ``"namespace/name"``.
        token: Hub token; default: ``HF_TOKEN`` or the stored login.
        private: create the repo private (only applies when the repo does not exist yet).
        commit_message: default: ``"Upload pruned model (hf_prune)"``.
        card_kwargs: keyword arguments of :func:`model_card` (``base_model``, ``metrics``, ...).
    """
    folder = Path(checkpoint_dir)
    token = check_can_push(repo_id, token)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the directory given to save_pretrained")
    missing = missing_files(folder)
    if missing:
        raise CorruptCheckpointError(
            f"{folder} is not a complete pruned checkpoint: missing {', '.join(missing)}. Save the pruned model "
            "with model.save_pretrained(folder) (after hf_prune.prune / apply_plan_) and push that folder."
        )
    if CONFIG_KEY not in json.loads((folder / "config.json").read_text(encoding="utf-8")) and not \
            _is_stock_folder(folder):
        raise CorruptCheckpointError(f"{folder}/config.json has no '{CONFIG_KEY}' section: not saved by hf_prune")
    if card_kwargs is not None or not (folder / CARD_FILE).exists():
        write_model_card(folder, **{"repo_id": repo_id, **(card_kwargs or {})})
    # huggingface_hub reads HF_ENDPOINT once at import; read it again so a later setting is honoured.
    api = HfApi(endpoint=(os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None, token=token)
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(
        repo_id=repo.repo_id,  # namespace filled in by the Hub when repo_id had none
        folder_path=folder,
        commit_message=commit_message or "Upload pruned model (hf_prune)",
        ignore_patterns=list(_UPLOAD_IGNORE),
    )
    return info.commit_url
