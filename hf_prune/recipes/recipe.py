"""The skeleton every recipe runs, and what it produces.

:class:`Recipe.run` is check → data → dense model → calibration → per budget (prune → recover → measure → save →
card → push) → reports. A recipe (``glue.py``, ``image_classification.py``) fills the hooks: ``check``,
``load_data``, ``dense_model``, ``calibration``, and optionally ``evaluate``, ``card``, ``latency_inputs``.
Everything that can be wrong is checked before the first long step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, TrainingArguments

from .. import report
from ..distributed import barrier
from ..export import save_pruned
from ..formats.settings import check_exportable, export_beside
from ..hub import check_can_push, check_repo_id, push_pruned, write_model_card
from ..model_kinds import scored_view
from ..plan import PrunePlan
from ..resources import base_model_id
from .arguments import args_dict
from .common import (
    evaluate,
    is_main_process,
    measure_latency,
    model_stats,
    prune_and_recover,
    quiet_cpu_,
    quiet_expected_warnings,
)


@dataclass
class RecipeResults:
    """Everything one recipe run measured; ``results.json`` is :meth:`to_dict`.

    Args:
        recipe: the recipe's name.
        task: what the model was pruned for (a GLUE task, an image dataset).
        model: the model that was pruned.
        main_metric: the metric the tables and plots show.
        bench_seq_len: the sequence length latency was measured at.
        args: every effective argument (tokens left out).
        dense: the dense model's metrics, params and layer FLOPs.
        runs: one entry per budget (plan sizes, metrics pruned/recovered, latency, checkpoint).
        table: the rows of ``results.md``.
        environment: versions, machine, date.
    """

    recipe: str
    task: str
    model: str
    main_metric: str
    bench_seq_len: int
    args: dict[str, Any]
    dense: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=report.environment)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recipe:
    """One recipe run. Subclasses set :attr:`name` and fill the hooks; :meth:`run` is the same for all.

    After :meth:`load_data`, ``train`` (the recovery training set), ``evals`` (``{split: dataset}``),
    ``collator``, ``processing_class``, ``compute_metrics`` and ``main_metric`` are set.
    """

    name = ""

    def __init__(self, model_args: Any, data_args: Any, prune_args: Any, recovery_args: Any, dense_args: Any,
                 bench_args: Any, serve_args: Any, training_args: TrainingArguments) -> None:
        self.model_args, self.data_args, self.prune_args = model_args, data_args, prune_args
        self.recovery_args, self.dense_args, self.bench_args = recovery_args, dense_args, bench_args
        self.serve_args = serve_args
        self.training_args = training_args
        self.main_process = is_main_process(training_args)
        self.out = Path(training_args.output_dir)
        self.train: Any = None
        self.evals: dict[str, Any] = {}
        self.collator: Any = None
        self.processing_class: Any = None
        self.compute_metrics: Any = None
        self.main_metric = ""
        self.extra_args: tuple[Any, ...] = ()  # a recipe's own argument groups, recorded in results.json

    def log(self, message: str) -> None:
        if self.main_process:
            print(message)

    # ------------------------------------------------------------------------------------------- hooks
    def check(self) -> None:
        """Task-specific checks, before any data is read (the budgets are checked right after)."""

    def load_data(self) -> None:
        raise NotImplementedError

    def dense_model(self) -> nn.Module:
        """The dense model to prune: fine-tuned here (and cached), or already fine-tuned."""
        raise NotImplementedError

    def calibration(self) -> list[Mapping[str, Any]]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.training_args, self.evals, self.compute_metrics, self.collator,
                        self.processing_class)

    @property
    def task_name(self) -> str:
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        return str(self.model_args.model_name_or_path)

    @property
    def latency_seq_len(self) -> int:
        return self.bench_args.bench_seq_len

    def latency_inputs(self, model: nn.Module, batch_size: int) -> Mapping[str, Any] | None:
        """Inputs to time at ``batch_size`` (default: random tokens at ``latency_seq_len``)."""
        return None

    def card(self) -> dict[str, Any]:
        """Model-card fields besides the measured ones (``task``, ``dataset``)."""
        return {}

    # -------------------------------------------------------------------------------------------- flow
    def run(self) -> dict[str, Any]:
        quiet_expected_warnings()
        quiet_cpu_(self.training_args)
        args = self.training_args
        budgets = self.prune_args.budgets()
        self.check()
        for b in budgets:
            self.prune_args.pruning_config(b, seed=args.seed)
        if args.push_to_hub:
            check_can_push(args.hub_model_id, args.hub_token)
        if args.hub_model_id:
            check_repo_id(args.hub_model_id, "hub_model_id")
        self.base_model = base_model_id(self.model_args.model_name_or_path)
        self.load_data()
        self._check_exports()
        dense = self.dense_model().eval()
        dense_metrics = self.evaluate(dense)
        self.log(f"dense: {dense_metrics}")
        results = RecipeResults(
            self.name, self.task_name, self.model_name, self.main_metric, self.latency_seq_len,
            args_dict(self.model_args, self.data_args, *self.extra_args, self.prune_args, self.recovery_args,
                      self.dense_args, self.bench_args, self.serve_args, args),
            {"metrics": dense_metrics, **model_stats(dense, self.prune_args.seq_len)},
        )
        calibration = self.calibration()
        for budget in budgets:
            results.runs.append(self._run_budget(dense, budget, calibration, results, several=len(budgets) > 1))
            barrier()
        if self.main_process:
            text, results.table = write_reports(self.out, results)
            print(f"\n{text}\n\nwrote {self.out / 'results.json'}, {self.out / 'results.md'} and plots; checkpoints: "
                  + ", ".join(r["checkpoint"] for r in results.runs))
        return results.to_dict()

    def _check_exports(self) -> None:
        """``export_formats`` that cannot take this model's family are refused now, not after the training."""
        path = getattr(self, "path", None)  # None: a model built from its config (ViT from scratch)
        if self.serve_args.export_formats and path:
            remote = bool(getattr(self.model_args, "trust_remote_code", False))
            check_exportable(AutoConfig.from_pretrained(path, trust_remote_code=remote), self.serve_args)

    def _run_budget(self, dense: nn.Module, budget: Mapping[str, Any], calibration: list, results: RecipeResults,
                    several: bool) -> dict[str, Any]:
        """Prune → recover → measure → save (+ card, heatmap, push) for one budget; the main process writes."""
        args, seq = self.training_args, self.prune_args.seq_len
        trainer_kwargs = {"data_collator": self.collator, "processing_class": self.processing_class,
                          "eval_dataset": next(iter(self.evals.values())), "compute_metrics": self.compute_metrics}
        res = prune_and_recover(
            dense, budget, prune_args=self.prune_args, recovery_args=self.recovery_args, training_args=args,
            calibration=calibration, train_dataset=self.train, evaluate_fn=self.evaluate,
            trainer_kwargs=trainer_kwargs, log=self.log,
        )
        run = {"name": res.name, "budget": res.budget, "prune_seconds": res.prune_seconds,
               "recovery_seconds": res.recovery_seconds, "metrics_pruned": res.metrics_pruned,
               "metrics_recovered": res.metrics_recovered, **model_stats(res.model, seq),
               "checkpoint": str(self.out / res.name)}
        if not self.main_process:
            return run
        model, folder = res.model.eval(), self.out / res.name
        if self.bench_args.bench_latency:
            run["latency"] = measure_latency(dense, model, self.bench_args, self.latency_seq_len,
                                             inputs_fn=self.latency_inputs, flops_seq_len=seq)
        save_pruned(model, folder, deployable=self.prune_args.deployable)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        # with bench_latency, each export is timed against the dense model's in its runtime, for the card
        exports, run["runtime_speed"] = export_beside(model, self.processing_class, folder, self.serve_args,
                                                      dense=dense if self.bench_args.bench_latency else None)
        run["exports"] = [str(p) for p in exports]
        report.plot_layer_heatmap(res.plan, PrunePlan.dense(scored_view(dense)), self.out / f"layers_{res.name}.png",
                                  title=f"{self.task_name} {res.name}: kept heads and FFN neurons")
        metrics = {"dense": results.dense["metrics"], "pruned": res.metrics_pruned}
        if res.metrics_recovered is not None:
            metrics["recovered"] = res.metrics_recovered
        device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
        speedup = {"device": device, "threads": torch.get_num_threads(), "seq_len": self.latency_seq_len,
                   "rows": run.get("latency", [])}
        write_model_card(folder, repo_id=args.hub_model_id, metrics=metrics, speedup=speedup,
                         runtime_speed=run["runtime_speed"], recipe=results.args,
                         seq_len=seq, base_model=self.base_model, **self.card())
        if args.push_to_hub:
            repo = args.hub_model_id if not several else f"{args.hub_model_id}-{res.name}"
            run["pushed"] = push_pruned(folder, repo, token=args.hub_token, private=args.hub_private_repo)
            self.log(f"[{res.name}] pushed to {run['pushed']}")
        return run


# ------------------------------------------------------------------------------------------------ reports


def write_reports(output_dir: str | Path, results: RecipeResults) -> tuple[str, list[dict[str, Any]]]:
    """``results.json``, ``results.md`` and the PNG plots of a recipe run; returns the markdown table and its rows
    (``results`` is not changed: the caller stores the rows)."""
    out = Path(output_dir)
    dense, main_metric = results.dense, results.main_metric
    rows = [{"model": "dense", "budget": "-", main_metric: dense["metrics"].get(main_metric),
             "params": dense["params"], "params kept": 1.0, "FLOPs kept": 1.0}]
    for run in results.runs:
        lat = {r["batch_size"]: r for r in run.get("latency", [])}
        common = {"budget": run["name"], "params": run["params"], "params kept": run["params"] / dense["params"],
                  "FLOPs kept": run["layer_flops"] / dense["layer_flops"]}
        for bs, r in lat.items():
            common[f"b{bs} ms"] = r["pruned_ms"]
            common[f"b{bs} speedup"] = r["speedup"]
        rows.append({"model": "pruned", main_metric: run["metrics_pruned"].get(main_metric), **common})
        if run.get("metrics_recovered") is not None:
            rows.append({"model": "recovered", main_metric: run["metrics_recovered"].get(main_metric), **common,
                         "prune s": run["prune_seconds"], "recovery s": run["recovery_seconds"]})
    for bs in sorted({r["batch_size"] for run in results.runs for r in run.get("latency", [])}):
        first = next(r for run in results.runs for r in run.get("latency", []) if r["batch_size"] == bs)
        rows[0][f"b{bs} ms"] = first["dense_ms"]
        rows[0][f"b{bs} speedup"] = 1.0
    formats = {main_metric: ".4f", "params kept": ".1%", "FLOPs kept": ".1%", "prune s": ".1f", "recovery s": ".0f"}
    formats.update({k: ".1f" if k.endswith("ms") else ".2f" for row in rows for k in row if k.startswith("b")
                    and k != "budget"})
    table = report.markdown_table(rows, formats=formats)
    report.write_json(out / "results.json", {**results.to_dict(), "table": rows})
    env = results.environment
    head = (f"# {results.recipe} recipe: {results.task} on {results.model}\n\n"
            f"Measured {env['date']} on {env['machine']} ({env['torch_threads']} torch threads). Latency: median "
            f"forward time at seq {results.bench_seq_len}, dense and pruned interleaved.\n\n")
    report.write_text(out / "results.md", head + table + "\n")
    runs = results.runs
    if len(runs) > 1:
        series = {"pruned": [(r["layer_flops"] / dense["layer_flops"], r["metrics_pruned"][main_metric]) for r in runs]}
        if all(r.get("metrics_recovered") for r in runs):
            series["recovered"] = [(r["layer_flops"] / dense["layer_flops"], r["metrics_recovered"][main_metric])
                                   for r in runs]
        report.plot_metric_vs_flops(series, out / "metric_vs_flops.png", metric=main_metric,
                                    dense=dense["metrics"].get(main_metric))
    return table, rows
