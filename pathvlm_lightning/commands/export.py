"""``python -m pathvlm_lightning export``: a stage checkpoint -> a folder plain transformers loads.

    python -m pathvlm_lightning export --config configs/sft.yaml --checkpoint runs/sft/checkpoints/last.ckpt \\
        --out runs/sft/release [--report runs/report/report.json] [--stage sft]

The model is rebuilt from the stage config and given the checkpoint's weights
(:mod:`pathvlm_lightning.commands.checkpoint`), then written by the backbone's own export (LoRA
merged into a copy, safetensors, processor), the same code ``ExportCallback`` runs at the end of a
fit. ``README.md`` beside the weights is the model card of :mod:`pathvlm_lightning.commands.model_card`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pathvlm_lightning.commands.model_card import config_description, model_card, stage_metrics
from pathvlm_lightning.stage_config import read_stage_yaml, start_model


def export_stage(
    config: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    stage: str | None = None,
    description: str | None = None,
    report: dict[str, Any] | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write the stage's model and its ``README.md`` to ``out``; returns ``out``.

    ``stage`` defaults to the config file's stem, ``description`` to the config's header comment;
    ``report`` is a pipeline ``report.json`` (its row for ``stage`` goes into the card).
    """
    from pathvlm_lightning.commands.checkpoint import load_stage_module

    stage = stage or Path(config).stem
    stage_config = read_stage_yaml(config)
    module = load_stage_module(config, checkpoint, base_model=base_model, dtype=dtype)
    target = module.backbone.export(Path(out))
    card = model_card(
        stage=stage,
        description=description if description is not None else config_description(config),
        base_model=base_model or start_model(stage_config) or "embedded-tiny",
        config=stage_config,
        metrics=stage_metrics(report, stage) if report is not None else None,
    )
    (target / "README.md").write_text(card, encoding="utf-8")
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pathvlm_lightning export",
        description="Export a stage's Lightning checkpoint as a transformers folder with a model card.",
    )
    parser.add_argument("--config", required=True, help="the stage YAML the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint (.ckpt) of that stage")
    parser.add_argument("--out", required=True, help="folder to write (created; existing files are replaced)")
    parser.add_argument("--report", help="pipeline report.json; the stage's metrics go into the model card")
    parser.add_argument("--stage", help="stage name for the card and the report lookup (default: config file name)")
    parser.add_argument("--description", help="one paragraph for the card (default: the config's header comment)")
    parser.add_argument("--base-model", help="replaces the config's backbone.model (architecture and processor)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="replaces the backbone's dtype")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("config", "checkpoint", "report"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            parser.error(f"--{flag}: {value!r} does not exist")
    report = None
    if args.report is not None:
        try:
            report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            parser.error(f"--report: {args.report} is not valid JSON ({error.msg} at line {error.lineno})")
        if not isinstance(report, dict):
            parser.error(f"--report: {args.report} holds a JSON {type(report).__name__}, not the report object")
    try:
        out = export_stage(
            args.config,
            args.checkpoint,
            args.out,
            stage=args.stage,
            description=args.description,
            report=report,
            base_model=args.base_model,
            dtype=args.dtype,
        )
    except (OSError, ValueError) as error:  # a checkpoint that does not fit, a base model that is not there
        print(f"error: {error}", file=sys.stderr)
        return 2
    stage = args.stage or Path(args.config).stem
    if report is not None and stage_metrics(report, stage) is None:
        print(f"note: {args.report} has no stage {stage!r}; the model card lists no metrics", file=sys.stderr)
    print(f"exported stage {stage!r} to {out} (model card: {out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
