"""Turn a finished (or partly finished) pipeline into its report: tables, JSON and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pathvlm_lightning.data.counterfactual import COUNTERFACTUALS
from pathvlm_lightning.eval.counterfactual import variant_path
from pathvlm_lightning.eval.report import StageEval, build_report, load_predictions, write_report
from pathvlm_lightning.pipeline.runner import PipelineRunner


def collect(runner: PipelineRunner) -> list[StageEval]:
    """Every stage of the plan that has test predictions, in plan order (others are left out)."""
    evals = []
    for stage in runner.plan.stages.values():
        test = runner.predictions_path(stage, "test")
        if not test.is_file():
            continue
        ood = runner.predictions_path(stage, "ood")
        evals.append(
            StageEval(
                name=stage.name,
                test=load_predictions(test),
                ood=load_predictions(ood) if ood.is_file() else None,
                note=stage.description,
                variants={
                    name: load_predictions(variant_path(test, name))
                    for name in COUNTERFACTUALS
                    if variant_path(test, name).is_file()
                },
            )
        )
    return evals


def write_pipeline_report(runner: PipelineRunner, plots: bool = True) -> dict[str, Any]:
    """Build and save ``report.md``/``report.json`` (+ PNG plots) under the plan's out_dir; returns the report."""
    plan = runner.plan
    evals = collect(runner)
    if not evals:
        raise FileNotFoundError(f"no stage of {plan.source} has test predictions under {plan.out_dir} yet")
    report = build_report(evals, plan.comparisons, num_resamples=plan.num_resamples, seed=plan.seed)
    report["timings_seconds"] = runner.timings()
    out = Path(plan.out_dir)
    write_report(report, out)
    if plots:
        from pathvlm_lightning.eval.plots import plot_reward_curves, plot_stage_accuracy

        plot_stage_accuracy(report, out / "accuracy.png")
        if report.get("counterfactual"):
            from pathvlm_lightning.eval.plots import plot_counterfactuals

            plot_counterfactuals(report, out / "counterfactual.png")
        tb_dirs = {
            s.name: s.info.tensorboard_dir
            for s in plan.stages.values()
            if s.train and s.info and s.info.kind == "grpo" and s.info.tensorboard_dir and Path(s.info.tensorboard_dir).is_dir()
        }
        if tb_dirs:
            plot_reward_curves(tb_dirs, out / "rewards.png")
    return report

