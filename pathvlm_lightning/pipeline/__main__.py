"""``python -m pathvlm_lightning pipeline --plan configs/demo/pipeline.yaml [--config overlay.yaml] [--stages a,b] [--rerun b]``."""

from __future__ import annotations

import argparse
import sys

from pathvlm_lightning.pipeline.plan import PlanError, load_plan
from pathvlm_lightning.pipeline.runner import PipelineRunner, StageFailed
from pathvlm_lightning.pipeline.tables import write_pipeline_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pathvlm_lightning pipeline",
        description="Train, evaluate and compare the stages of a plan; finished steps are skipped.",
    )
    parser.add_argument("--plan", required=True, help="plan YAML, e.g. configs/demo/pipeline.yaml")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="an overlay applied after every stage's own configs (repeatable), e.g. configs/rehearsal_cpu.yaml; "
        "its callbacks and GRPO parts (rollout, rewards, reference) update the stages' of the same class, its "
        "backbone model is where stages "
        "without `needs` start (pipeline/overlay.py)",
    )
    parser.add_argument("--stages", default="", help="comma-separated stages to run (default: all)")
    parser.add_argument("--rerun", default="", help="comma-separated stages to delete and run from scratch")
    parser.add_argument("--no-ood", action="store_true", help="skip the out-of-domain evaluations")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables from saved predictions")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    args = parser.parse_args(argv)
    try:
        runner = PipelineRunner(load_plan(args.plan, args.config))
        if not args.report_only:
            runner.run(
                [s for s in args.stages.split(",") if s],
                rerun=[s for s in args.rerun.split(",") if s],
                evaluate_ood=not args.no_ood,
            )
        report = write_pipeline_report(runner, plots=not args.no_plots)
    except (PlanError, StageFailed, FileNotFoundError) as err:
        print(f"pipeline: {err}", file=sys.stderr)
        return 2
    from pathvlm_lightning.eval.report import report_markdown

    print(report_markdown(report))
    print(f"saved to {runner.out_dir}/report.md and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
