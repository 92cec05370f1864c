"""What every ``hf-prune`` command shares: the user-error type and strict flag parsing."""

from __future__ import annotations

from typing import Any

from ..recipes.common import check_flags


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, without a traceback."""


def parse(parser: Any, argv: list[str]) -> Any:
    """``parser``'s dataclasses from ``argv``; a mistyped flag is an error naming the closest valid ones."""
    check_flags(parser, argv)
    return parser.parse_args_into_dataclasses(argv)
