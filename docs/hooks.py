"""mkdocs hook: the settings reference is rendered from the dataclasses the CLI and the recipes parse, so it cannot
drift from them. A page holds ``<!-- settings: NAME -->`` and gets the table of NAME's fields in its place."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any


def _groups() -> dict[str, list[type]]:
    from hf_prune import cli
    from hf_prune.cli.export import ExportArgs
    from hf_prune.config import PruningConfig
    from hf_prune.formats.settings import ExportOptions
    from hf_prune.recipes import clm, glue, image_classification

    def recipe(module: Any) -> list[type]:  # TrainingArguments is transformers' own (linked on the page)
        return [t for t in module.ARG_TYPES if t.__name__ != "TrainingArguments"]

    return {"pruning": [PruningConfig], "glue": recipe(glue), "clm": recipe(clm),
            "image": recipe(image_classification), "prune": [cli.PruneArgs], "export": [ExportArgs, ExportOptions]}


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Args:`` section of a dataclass's docstring (the long text; ``--help`` shows each field's short ``metadata["help"]``)."""
    docs: dict[str, str] = {}
    name = None
    in_args = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args or not stripped:
            continue
        m = re.match(r"^(\w+): (.*)$", stripped)
        if m and line.startswith(" " * 8) and not line.startswith(" " * 12):
            name = m.group(1)
            docs[name] = m.group(2)
        elif name:
            docs[name] += " " + stripped
    return docs



def _docs(cls: type) -> dict[str, str]:
    from hf_prune.config import PruningConfig

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's own text wins
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    if cls.__name__ == "PruneArguments":  # made from PruningConfig's fields: its docstring is PruningConfig's
        docs = {**field_docs(PruningConfig), **docs}
    return docs


def _type(cls: type, f: dataclasses.Field) -> str:
    try:
        hint = typing.get_type_hints(cls)[f.name]
    except Exception:  # noqa: BLE001 - an unresolvable annotation is shown as written
        hint = f.type
    text = getattr(hint, "__name__", None) or str(hint)
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{f.default_factory()!r}`"  # type: ignore[misc]
    return "required"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def settings_table(name: str) -> str:
    rows = ["| key / flag | type | default | what it does |", "|---|---|---|---|"]
    seen: set[str] = set()
    for cls in _groups()[name]:
        docs = _docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name.startswith("_"):
                continue
            seen.add(f.name)
            text = docs.get(f.name) or f.metadata.get("help", "")
            rows.append(f"| `{f.name}` | `{_cell(_type(cls, f))}` | {_cell(_default(f))} | {_cell(text)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return re.sub(r"<!-- settings: (\w+) -->", lambda m: settings_table(m.group(1)), markdown)
