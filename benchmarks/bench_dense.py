"""How good do the dense models get (issue 16's "realistic baselines"): fine-tune the embedded MiniLM on each task
with several recipes ``seed:lr:epochs_factor[:batch]`` (the same specs as ``--dense`` of ``bench_robustness.py`` and
``bench_compare.py``, cached in the same folders, so a recipe found here is reused there as it is) and report the
dev metrics beside the issue's converged-baseline levels (``LEVELS``).

    .venv/bin/python benchmarks/bench_dense.py --tasks mrpc stsb \\
        --dense 0:2e-5:1.667:16 0:5e-5:1.667:16 0:1e-4:1.667:16 0:1e-4:3.333:32

Epochs are the task's usual count (SST-2 1, the small tasks 3; ``PROTOCOL_EPOCHS``) times the factor. Writes
``benchmarks/results/dense_sweep.json`` / ``.md`` (``--out_name`` another stem).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import transformers as T
from common import (
    HERE,
    MAIN_METRIC,
    PROTOCOL_EPOCHS,
    TASKS,
    dev_batches,
    epochs_to_steps,
    evaluate,
    finetune,
    parse_dense,
)

from hf_prune import report
from hf_prune.resources import embedded_model_path

#: the issue's levels of a "normal fine-tune" of MiniLM, metric -> least value (points)
LEVELS = {"sst2": {"accuracy": 89.0}, "mrpc": {"accuracy": 84.0, "f1": 88.0}, "stsb": {"spearmanr": 86.0}}


@dataclass
class DenseArguments:
    """Arguments of ``bench_dense.py``.

    Args:
        tasks: GLUE tasks (``sst2``, ``mrpc``, ``stsb``, ``cola``, ``rte``).
        dense: fine-tuning recipes ``seed:lr:epochs_factor[:batch]`` (batch 32 unless given).
        out_name: stem of the result files under ``benchmarks/results/``.
    """

    tasks: list[str] = field(default_factory=lambda: ["mrpc", "stsb"])
    dense: list[str] = field(default_factory=lambda: ["0:5e-5:1", "0:1e-4:1", "0:5e-5:1.667:16"])
    out_name: str = "dense_sweep"

    def __post_init__(self) -> None:  # bad input fails here, before any fine-tune
        for spec in self.dense:
            parse_dense(spec)
        unknown = sorted(set(self.tasks) - set(PROTOCOL_EPOCHS))
        if unknown:
            raise SystemExit(f"unknown --tasks {unknown}: choose from {', '.join(PROTOCOL_EPOCHS)}")


def run_task(name: str, args: DenseArguments, tok: Any) -> list[dict[str, Any]]:
    task = TASKS[name]
    dev, labels = dev_batches(task, tok)
    rows = []
    for spec in args.dense:
        seed, lr, factor, batch = parse_dense(spec)
        epochs = PROTOCOL_EPOCHS[name] * factor
        steps = epochs_to_steps(task, epochs, batch)
        path = finetune(task, tok, steps, batch, lr, seed)
        model = T.AutoModelForSequenceClassification.from_pretrained(path).eval()
        metrics = evaluate(model, task, dev, labels)
        log = path / "finetune.json"  # absent for folders fine-tuned before it was written
        seconds = json.loads(log.read_text())["seconds"] if log.exists() else None
        levels = LEVELS.get(name, {})
        row = {"task": name, "dense": spec, "seed": seed, "lr": lr, "epochs": epochs, "batch": batch, "steps": steps,
               "metric": MAIN_METRIC[name], "value": metrics[MAIN_METRIC[name]], "metrics": metrics,
               "finetune_s": seconds, "meets_levels": all(metrics[k] >= v for k, v in levels.items()) if levels
               else None}
        print(f"[{name}] {spec}: {steps} steps, " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, recipe without its seed): the main metric's mean, min and max over the seeds run."""
    out = []

    def recipe(r: dict[str, Any]) -> tuple:
        return r["task"], r["lr"], r["epochs"], r["batch"]

    for key in dict.fromkeys(recipe(r) for r in rows):
        group = [r for r in rows if recipe(r) == key]
        values = [r["value"] for r in group]
        extra = {k: statistics.fmean(r["metrics"][k] for r in group) for k in LEVELS.get(key[0], {})}
        out.append({"task": key[0], "lr": key[1], "epochs": key[2], "batch": key[3], "seeds": len(group),
                    "metric": group[0]["metric"], "mean": statistics.fmean(values), "min": min(values),
                    "max": max(values), "levels": ", ".join(f"{k} {v:.2f} (>= {LEVELS[key[0]][k]:g})"
                                                            for k, v in extra.items())})
    return out


def write(rows: list[dict[str, Any]], args: DenseArguments) -> None:
    summary = summarise(rows)
    lines = ["# Dense fine-tuning recipes of the embedded MiniLM\n",
             "> Written by `benchmarks/bench_dense.py`; do not edit by hand.\n",
             f"- command: `.venv/bin/python benchmarks/bench_dense.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {report.environment()}\n",
             ("- dev metrics in points; `levels`: the issue's converged-baseline levels of a normal MiniLM fine-tune, "
              "with this recipe's mean\n"),
             "## Per recipe (mean, min, max over seeds)\n",
             report.markdown_table(summary, ["task", "lr", "epochs", "batch", "seeds", "metric", "mean", "min", "max",
                                             "levels"],
                                   formats={"lr": "g", "epochs": ".2f", "mean": ".2f", "min": ".2f", "max": ".2f"}),
             "\n## Every fine-tune\n",
             report.markdown_table([{**r, **r["metrics"]} for r in rows],
                                   ["task", "dense", "steps", *dict.fromkeys(k for r in rows for k in r["metrics"]),
                                    "finetune_s", "meets_levels"],
                                   formats={k: ".2f" for r in rows for k in r["metrics"]} | {"finetune_s": ".0f"},
                                   headers={"dense": "recipe (seed:lr:epochs factor[:batch])",
                                            "finetune_s": "fine-tune s", "meets_levels": "meets levels"})]
    out = HERE / "results"
    report.write_json(out / f"{args.out_name}.json", {"args": asdict(args), "environment": report.environment(),
                                                      "levels": LEVELS, "summary": summary, "rows": rows})
    report.write_text(out / f"{args.out_name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    (args,) = T.HfArgumentParser(DenseArguments).parse_args_into_dataclasses()
    tok = T.AutoTokenizer.from_pretrained(embedded_model_path())
    write([row for name in args.tasks for row in run_task(name, args, tok)], args)


if __name__ == "__main__":
    main()
