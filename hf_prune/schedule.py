"""When to prune during training, and how much at each pruning event."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .budget import BUDGETS, set_budget
from .config import PruningConfig


@dataclass
class PruningSchedule:
    """Pruning events during training.

    Args:
        kind: ``one_shot`` (the whole budget at ``start_step``), ``gradual`` (Zhu & Gupta 2017: the kept
            fraction follows a cubic from 1 at ``start_step`` to the final budget at ``end_step``, updated every
            ``frequency`` steps) or ``iterative`` (``rounds`` equal-ratio cuts from ``start_step`` to ``end_step``).
        start_step: optimizer step of the first event (0 = before training starts).
        end_step: step of the last event (gradual and iterative).
        frequency: steps between gradual updates.
        rounds: number of iterative cuts.
    """

    kind: Literal["one_shot", "gradual", "iterative"] = "one_shot"
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 10
    rounds: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("one_shot", "gradual", "iterative"):
            raise ValueError(f"schedule kind must be one_shot, gradual or iterative, not {self.kind!r}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.kind == "one_shot":
            return
        if self.end_step is None or self.end_step <= self.start_step:
            raise ValueError(
                f"a {self.kind} schedule needs end_step > start_step (got start_step={self.start_step}, "
                f"end_step={self.end_step})"
            )
        if self.frequency < 1 or self.rounds < 1:
            raise ValueError("frequency and rounds must be >= 1")

    @property
    def last_step(self) -> int:
        return self.start_step if self.kind == "one_shot" else int(self.end_step)  # type: ignore[arg-type]

    def check_fits(self, max_steps: int) -> None:
        """Refuse a schedule that would not finish within training."""
        if self.last_step > max_steps:
            raise ValueError(
                f"the pruning schedule ends at step {self.last_step} but training stops at max_steps={max_steps}; "
                "lower end_step (or start_step) or train longer"
            )

    def events(self) -> list[int]:
        """Optimizer steps at which masks are updated, in order (the last one reaches the final budget)."""
        if self.kind == "one_shot":
            return [self.start_step]
        end = int(self.end_step)  # type: ignore[arg-type]
        if self.kind == "gradual":
            return sorted(set(range(self.start_step, end, self.frequency)) | {end})
        if self.rounds == 1:
            return [end]
        span = end - self.start_step
        return sorted({self.start_step + round(k * span / (self.rounds - 1)) for k in range(self.rounds)})

    def progress(self, step: int) -> float:
        """How far the budget has moved toward its final value at event ``step``, in [0, 1]."""
        events = self.events()
        if self.kind == "one_shot" or step >= events[-1]:
            return 1.0
        if self.kind == "iterative":
            return (events.index(step) + 1) / len(events)
        p = (step - self.start_step) / (events[-1] - self.start_step)
        return 1.0 - (1.0 - p) ** 3

    def fade(self, step: int) -> float:
        """Gate of a layer being removed at optimizer step ``step``: gradual schedules fade it from 1 at
        ``start_step`` to 0 at ``end_step`` along the same cubic as the budget; other kinds skip it at once."""
        if self.kind != "gradual" or step >= self.last_step:
            return 0.0
        p = max(0.0, (step - self.start_step) / (self.last_step - self.start_step))
        return (1.0 - p) ** 3

    def budget_at(self, config: PruningConfig, step: int, dense_params: int,
                  dense_layers: int | None = None) -> PruningConfig:
        """``config`` with its budget moved ``progress(step)`` of the way from "keep all" to its final value.

        Gradual schedules interpolate the kept fraction linearly in the cubic progress; iterative schedules
        keep the same ratio at every round (geometric). The depth budget: a gradual schedule removes its final
        layers from the first event (they fade out, see :meth:`fade`); an iterative one removes them round by
        round (a count moves from ``dense_layers``).
        """
        s = self.progress(step)
        geometric = self.kind == "iterative"

        def move(final: float, start: float = 1.0) -> float:
            return start * (final / start) ** s if geometric else start + (final - start) * s

        changes: dict[str, Any] = {}
        custom = dict(config.custom_budget or {})
        for name, value in set_budget(config).items():
            if BUDGETS[name].scheduled_from == "layers":
                if self.kind == "gradual":
                    continue
                if value > 1:  # a count: as a fraction, so that a count of 1 is never read as "all"
                    if dense_layers is None:
                        raise ValueError(f"{name}={value} is a layer count: budget_at needs dense_layers")
                    value = value / dense_layers
                value = min(1.0, move(value))
            elif BUDGETS[name].scheduled_from == "one":
                if value > 1 and s < 1:  # a count (hidden_keep=512): moved from "keep all" (1.0) it reads as one
                    raise ValueError(f"{name}={value} is a count, and a schedule moves fractions: give {name} as a "
                                     "fraction")
                value = value if value > 1 else min(1.0, move(value))
            else:  # a count that starts at the dense model's
                value = int(move(value, float(dense_params)))
            if name in custom:
                custom[name] = value
            else:
                changes[name] = value
        if custom:
            changes["custom_budget"] = custom
        return dataclasses.replace(config, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
