"""Atomic file writes with the permissions an ordinary write would get (the one writer every module uses)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

#: What save_pretrained writes the weights as: one file, or shards listed in an index.
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def weight_file_names(index_file: str | Path | None) -> list[str]:
    """The safetensors files of a checkpoint: the shards its index lists, or the single weights file when there
    is no index (``index_file`` None)."""
    if index_file is None:
        return [WEIGHTS_FILE]
    with open(index_file, encoding="utf-8") as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """What ``open()``/``mkdir()`` would give under the current umask (0644 / 0755 under umask 022)."""
    return (0o777 if directory else 0o666) & ~_umask()


def chmod_like_new_(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything inside) the permissions of a freshly created file/folder.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders on purpose; once their contents are
    complete and moved into place they should be as readable as a stock ``save_pretrained`` folder, or a
    colleague on a shared server cannot open the checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        os.chmod(path, default_mode(directory=True))
        for p in path.rglob("*"):
            os.chmod(p, default_mode(directory=p.is_dir()))
    else:
        os.chmod(path, default_mode())


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temp file in the same folder, then ``os.replace``), with the
    usual permissions, creating parent folders. No reader ever sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of folder ``path`` to write into; on success it replaces ``path`` (readers
    see the old folder or the new one, never half of one), on error it is removed. An existing non-empty ``path``
    without ``overwrite`` is refused before anything is written."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists: pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield stage
        chmod_like_new_(stage)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{stage.name}")
            path.rename(old)
        os.replace(stage, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
