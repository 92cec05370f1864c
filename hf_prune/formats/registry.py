"""Export formats as an extension point: one :class:`ExportFormat` per format, registered by name.

``hf-prune export --format NAME``, ``hp.export_model(..., format=NAME)`` and a recipe's ``export_formats`` all look
the format up here, so adding one (say, a TensorRT plan) is one :func:`register_export_format` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ExportFormat:
    """One way of writing a (pruned) model for a runtime other than PyTorch.

    Args:
        name: what ``--format`` and ``export_formats`` accept.
        runtime: the runtime that reads the result (said in help text and model cards).
        write: ``write(model, tokenizer, output, **options) -> Path``. Checks everything it can before writing,
            raises ``ValueError``/``FileExistsError`` with a one-line reason, and writes atomically.
        file_name: ``file_name(**options)``: the file it writes inside the output folder, or ``""`` when the output
            folder itself is what it writes.
        options: the option names ``write`` takes (anything else is refused, never ignored).
        beside: where a recipe's ``export_formats`` writes it inside a saved checkpoint folder (``""``: the folder
            itself, a file at its root; ``"onnx"``: that subfolder), or None when it is not written beside one.
        needs_tokenizer: the export carries the tokenizer, so a checkpoint without one is refused up front.
        accepts: ``accepts(config)`` raises ``ValueError`` with the reason when a model of this config cannot be
            exported (its family); a recipe calls it before its long work.
        speed: ``speed(dense_output, pruned_output, pruned_model) -> rows``: the two exports timed interleaved in
            the runtime, rows ``{metric, dense, pruned, speedup}`` (what a recipe's model card shows), or None.
    """

    name: str
    runtime: str
    write: Callable[..., Path]
    file_name: Callable[..., str]
    options: tuple[str, ...] = ()
    beside: str | None = None
    needs_tokenizer: bool = False
    speed: Callable[[Path, Path, nn.Module], list[dict[str, Any]]] | None = None
    accepts: Callable[[Any], None] | None = None


_REGISTRY: dict[str, ExportFormat] = {}


def register_export_format(fmt: ExportFormat, *, overwrite: bool = False) -> ExportFormat:
    """Register ``fmt`` under ``fmt.name`` (``overwrite`` replaces a format of that name)."""
    if fmt.name in _REGISTRY and not overwrite:
        raise ValueError(f"an export format named {fmt.name!r} is already registered; pass overwrite=True to "
                         "replace it")
    _REGISTRY[fmt.name] = fmt
    return fmt


def export_formats() -> list[str]:
    return sorted(_REGISTRY)


def get_export_format(name: str) -> ExportFormat:
    if name not in _REGISTRY:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(export_formats())}")
    return _REGISTRY[name]


def export_model(model: nn.Module, tokenizer: Any, output_dir: str | Path, format: str, **options: Any) -> Path:
    """Write ``model`` (and its tokenizer) in ``format`` inside ``output_dir``; returns the file or folder written.
    Options a format does not take are an error naming the ones it does."""
    fmt = get_export_format(format)
    unknown = sorted(k for k, v in options.items() if k not in fmt.options and v is not None)
    if unknown:
        raise ValueError(f"the {format} export takes no option {', '.join(unknown)}; it takes "
                         f"{', '.join(fmt.options) or 'none'}")
    options = {k: v for k, v in options.items() if k in fmt.options and v is not None}
    return fmt.write(model, tokenizer, Path(output_dir) / fmt.file_name(**options), **options)
