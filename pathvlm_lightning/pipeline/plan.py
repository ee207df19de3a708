"""A pipeline plan: which stages to train, from which stage each starts, and what to compare.

A plan is a small YAML file (``configs/demo/pipeline.yaml``, ``configs/pipeline.yaml``). Each stage
names the LightningCLI config that trains it (a stage overlay whose ``base:`` files the CLI reads
first); everything else the runner needs (where the stage exports its model, where its checkpoints
and TensorBoard logs go, which model it starts from) is read from that config as the CLI resolves it
(bases, ``${run_dir}``), so the plan cannot drift from the configs a user also runs by hand. ``needs``
names the stage whose export the config must start from; the plan refuses a config that starts elsewhere.
Overlays (``--config`` of the pipeline command, :mod:`pathvlm_lightning.pipeline.overlay`) apply after
every stage's own configs; what the runner reads is then the stage with its overlay.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pathvlm_lightning.pipeline.overlay import (
    Overlay,
    OverlayError,
    read_overlay,
    stage_overlay,
    unused_callback_updates,
)
from pathvlm_lightning.stage_config import (
    StageConfigError,
    callbacks,
    grpo_parts,
    init_args,
    part_nodes,
    read_stage_yaml,
    short_name,
    start_model,
)


class PlanError(ValueError):
    """A plan or a stage config that cannot be run as written."""


@dataclass(frozen=True)
class StageConfigInfo:
    """What the runner reads from a stage's LightningCLI config."""

    kind: str  # "sft" or "grpo"
    start_model: str  # model.init_args.backbone.init_args.model
    export_dir: str | None  # ExportCallback dirpath
    checkpoint_dir: str | None  # ModelCheckpoint dirpath
    tensorboard_dir: str | None  # TensorBoardLogger save_dir/name
    data_path: str | None  # data.init_args.data_path
    digest: str  # sha256 of the resolved config: a changed stage file, base or data file makes outputs stale


@dataclass(frozen=True)
class Stage:
    name: str
    config: str
    description: str = ""
    needs: str | None = None  # the stage whose export this one starts from
    train: bool = True  # False: evaluate the config's starting model as is (the "base" row)
    info: StageConfigInfo | None = None
    overlay: dict[str, Any] | None = None  # the plan's overlays as they apply to this stage (None: no overlay)

    def config_digest(self) -> str:
        """sha256 of the resolved config (the stage file with its bases, and the plan's overlay): a change
        makes its outputs stale."""
        assert self.info is not None
        return self.info.digest

    @property
    def evaluated_model(self) -> str:
        """The folder (or model name) evaluated for this stage."""
        assert self.info is not None
        if not self.train:
            return self.info.start_model
        assert self.info.export_dir is not None
        return self.info.export_dir


@dataclass(frozen=True)
class Plan:
    stages: dict[str, Stage]  # in run order
    out_dir: str
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    ood_overrides: list[str] = field(default_factory=list)  # CLI arguments that point a test run at the OOD set
    eval_overrides: list[str] = field(default_factory=list)  # CLI arguments added to every evaluation run
    overlays: list[Overlay] = field(default_factory=list)  # applied after every stage's own configs
    num_resamples: int = 10000
    seed: int = 0
    source: str = ""

    def select(self, names: list[str] | None) -> list[Stage]:
        """The chosen stages (all when ``names`` is empty) in plan order; unknown names are an error."""
        if not names:
            return list(self.stages.values())
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise PlanError(f"{self.source}: unknown stage(s) {unknown}; the plan has {list(self.stages)}")
        return [stage for name, stage in self.stages.items() if name in names]


def _resolved(path: str, overlay: dict[str, Any] | None) -> dict[str, Any]:
    """The stage config ``path`` as the CLI resolves it, with ``overlay`` (a config) applied after it."""
    if not Path(path).is_file():
        raise PlanError(f"stage config {path!r} does not exist")
    if not overlay:
        try:
            return read_stage_yaml(path)
        except StageConfigError as error:
            raise PlanError(str(error)) from None
    with tempfile.TemporaryDirectory() as folder:  # read as the runner passes it: a file after the stage's
        written = Path(folder) / "overlay.yaml"
        written.write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
        try:
            return read_stage_yaml(path, ["--config", str(written)])
        except StageConfigError as error:
            raise PlanError(f"{error} (with the plan's overlay applied)") from None


def _stage_info(path: str, config: dict[str, Any]) -> StageConfigInfo:
    """Kind, start model and output folders of the resolved stage config ``config`` (read from ``path``)."""
    class_path = str(config["model"].get("class_path", "")) if isinstance(config["model"], Mapping) else ""
    kinds = {"GRPOModule": "grpo", "SFTModule": "sft"}
    if short_name(class_path) not in kinds:
        raise PlanError(f"{path}: model.class_path {class_path!r} is neither SFTModule nor GRPOModule")
    model = start_model(config)
    if not model:
        raise PlanError(f"{path}: model.init_args.backbone.init_args.model is not set")
    dirpaths = {short_name(c.get("class_path", "")): init_args(c).get("dirpath") for c in callbacks(config)}
    logger = (config.get("trainer") or {}).get("logger")
    tensorboard_dir = None
    if isinstance(logger, Mapping) and short_name(logger.get("class_path", "")) == "TensorBoardLogger":
        args = init_args(logger)
        if args.get("save_dir"):
            tensorboard_dir = str(Path(args["save_dir"]) / str(args.get("name") or "lightning_logs"))
    return StageConfigInfo(
        kinds[short_name(class_path)],
        model,
        dirpaths.get("ExportCallback"),
        dirpaths.get("ModelCheckpoint"),
        tensorboard_dir,
        init_args(config.get("data")).get("data_path"),
        hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
    )


def load_plan(path: str | Path, overlays: list[str] | tuple[str, ...] = ()) -> Plan:
    """Read and check a plan file: stage names, configs, ``needs`` wiring, comparisons; ``overlays`` are
    config files applied after every stage's own (see :mod:`pathvlm_lightning.pipeline.overlay`)."""
    source = str(path)
    if not Path(path).is_file():
        raise PlanError(f"plan file {source!r} does not exist")
    try:
        read = [read_overlay(o) for o in overlays]
    except OverlayError as error:
        raise PlanError(str(error)) from None
    raw: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(raw) - {"out_dir", "stages", "comparisons", "ood_overrides", "eval_overrides", "num_resamples", "seed"})
    if unknown:
        raise PlanError(f"{source}: unknown key(s) {unknown}")
    if not isinstance(raw.get("stages"), Mapping) or not raw["stages"]:
        raise PlanError(f"{source}: 'stages' must map stage names to {{config, needs, description}}")
    stages: dict[str, Stage] = {}
    written: dict[str, Stage] = {}  # each stage as its own config says, for the `needs` check
    stage_callbacks = []
    for name, spec in raw["stages"].items():
        if not isinstance(spec, Mapping) or "config" not in spec:
            raise PlanError(f"{source}: stage {name!r} needs a 'config'")
        extra = sorted(set(spec) - {"config", "description", "needs", "train"})
        if extra:
            raise PlanError(f"{source}: stage {name!r} has unknown key(s) {extra}")
        needs = spec.get("needs")
        if needs is not None and needs not in stages:
            raise PlanError(
                f"{source}: stage {name!r} needs {needs!r}, which is not defined before it (stages run in file order)"
            )
        own = _resolved(spec["config"], None)
        info = _stage_info(spec["config"], own)
        stage = Stage(
            name=str(name),
            config=str(spec["config"]),
            description=str(spec.get("description", "")),
            needs=needs,
            train=bool(spec.get("train", True)),
            info=info,
        )
        if stage.train and not info.export_dir:
            raise PlanError(f"{source}: stage {name!r}: {stage.config} has no ExportCallback, so no model to evaluate")
        if needs is not None:
            upstream = written[needs]
            if Path(info.start_model) != Path(upstream.evaluated_model):
                raise PlanError(
                    f"{source}: stage {name!r} needs {needs!r}, but {stage.config} starts from {info.start_model!r}, "
                    f"not from {needs}'s model {upstream.evaluated_model!r}"
                )
        written[stage.name] = stage
        if read:
            stage_callbacks.append([*callbacks(own), *part_nodes(own)])
            start = stages[needs].evaluated_model if needs is not None else None
            overlay = stage_overlay(read, callbacks(own), start, grpo_parts(own))
            stage = replace(stage, info=_stage_info(stage.config, _resolved(stage.config, overlay)), overlay=overlay)
        stages[stage.name] = stage
    unused = unused_callback_updates(read, stage_callbacks)
    if unused:
        raise PlanError(f"{source}: the overlay updates callbacks that no stage has: {unused}")
    comparisons = []
    for pair in raw.get("comparisons") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise PlanError(f"{source}: each comparison is a pair [a, b], got {pair!r}")
        missing = [s for s in pair if s not in stages]
        if missing:
            raise PlanError(f"{source}: comparison {list(pair)} names unknown stage(s) {missing}")
        comparisons.append((str(pair[0]), str(pair[1])))
    return Plan(
        stages=stages,
        out_dir=str(raw.get("out_dir", "runs/pipeline")),
        comparisons=comparisons,
        ood_overrides=[str(a) for a in raw.get("ood_overrides") or []],
        eval_overrides=[str(a) for a in raw.get("eval_overrides") or []],
        num_resamples=int(raw.get("num_resamples", 10000)),
        seed=int(raw.get("seed", 0)),
        source=source,
        overlays=read,
    )
