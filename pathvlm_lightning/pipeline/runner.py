"""Run a plan's stages in order, skipping finished work, then evaluate and tabulate every stage.

Each stage has up to three steps, each a LightningCLI run in its own process (a fresh interpreter per
stage, as a user would run them by hand): ``fit`` (train and export), ``test`` (greedy evaluation on
the in-domain test split) and ``ood`` (the same on the out-of-domain set). A step is skipped when its
output exists and was made from the same stage config and the same upstream model; a ``fit`` that
was interrupted resumes from its newest complete checkpoint (resume.py). What was done is kept in
``<out_dir>/<stage>/state.json``; the tables are always rebuilt from the saved predictions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathvlm_lightning.pipeline.overlay import overlay_text
from pathvlm_lightning.pipeline.plan import Plan, PlanError, Stage
from pathvlm_lightning.pipeline.resume import newest_complete_checkpoint
from pathvlm_lightning.redact import run_to_log

log = logging.getLogger(__name__)

#: ``launcher(cli_args, log_file) -> exit code`` runs ``python -m pathvlm_lightning <cli_args>``.
Launcher = Callable[[list[str], Path], int]


class StageFailed(RuntimeError):
    """A stage's CLI run exited with an error; the message names its log file."""


def subprocess_launcher(args: list[str], log_file: Path) -> int:
    """Run the CLI in a child interpreter, its output going to ``log_file`` with API keys redacted."""
    return run_to_log([sys.executable, "-m", "pathvlm_lightning", *args], log_file)


@dataclass
class StageState:
    """What has been done for a stage (``<out_dir>/<stage>/state.json``)."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> StageState:
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def step(self, name: str) -> dict[str, Any] | None:
        return self.data.get("steps", {}).get(name)

    def set_step(self, name: str, record: dict[str, Any] | None) -> None:
        steps = self.data.setdefault("steps", {})
        if record is None:
            steps.pop(name, None)
        else:
            steps[name] = record


class PipelineRunner:
    """Runs ``plan``; ``launcher`` is swappable so the skip/resume logic can be tested without training."""

    def __init__(self, plan: Plan, launcher: Launcher = subprocess_launcher, echo: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.launcher = launcher
        self.echo = echo
        self.out_dir = Path(plan.out_dir)

    # ---- paths ----------------------------------------------------------------------------------
    def stage_dir(self, stage: Stage) -> Path:
        return self.out_dir / stage.name

    def predictions_path(self, stage: Stage, split: str) -> Path:
        return self.stage_dir(stage) / f"predictions_{split}.jsonl"

    def state(self, stage: Stage) -> StageState:
        return StageState.load(self.stage_dir(stage) / "state.json")

    def config_args(self, stage: Stage) -> list[str]:
        """``--config`` arguments of every CLI run of ``stage``: its config, then, with plan overlays
        (:mod:`pathvlm_lightning.pipeline.overlay`), ``<out_dir>/<stage>/overlay.yaml``: the overlays as
        they apply to this stage, written here."""
        args = ["--config", stage.config]
        if stage.overlay:
            path = self.stage_dir(stage) / "overlay.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(overlay_text(stage.overlay, self.plan.overlays, stage.config), encoding="utf-8")
            args += ["--config", str(path)]
        return args

    # ---- running --------------------------------------------------------------------------------
    def run(self, names: list[str] | None = None, rerun: list[str] | None = None, evaluate_ood: bool = True) -> None:
        """Run the chosen stages (default: all) in plan order; ``rerun`` stages start from scratch."""
        selected = self.plan.select(names)
        for name in rerun or []:
            self.reset(self.plan.select([name])[0])
        for stage in selected:
            self._check_upstream(stage, selected)
            if stage.train:
                self._fit(stage)
            self._evaluate(stage, "test", [])
            if evaluate_ood and self.plan.ood_overrides:
                self._evaluate(stage, "ood", self.plan.ood_overrides)

    def reset(self, stage: Stage) -> None:
        """Delete what the stage wrote (state, predictions, its checkpoints and export)."""
        assert stage.info is not None
        for folder in (self.stage_dir(stage), stage.info.checkpoint_dir, stage.info.export_dir if stage.train else None):
            if folder and Path(folder).exists():
                shutil.rmtree(folder)
        self.echo(f"[{stage.name}] reset: outputs removed, it will run from scratch")

    def _check_upstream(self, stage: Stage, selected: list[Stage]) -> None:
        if stage.needs is None:
            return
        upstream = self.plan.stages[stage.needs]
        if upstream not in selected and not Path(upstream.evaluated_model).exists():
            raise PlanError(
                f"stage {stage.name!r} starts from {upstream.name!r}'s model {upstream.evaluated_model!r}, which does "
                f"not exist yet: run {upstream.name!r} first (or select it too)"
            )

    def _model_identity(self, stage: Stage) -> str:
        """Changes whenever the stage's model is retrained (or, untrained, its config changes)."""
        if not stage.train:
            return f"config:{stage.config_digest()}"
        fit = self.state(stage).step("fit") or {}
        return f"fit:{fit.get('finished_at', 'adopted')}:{stage.config_digest()}"

    def _fit(self, stage: Stage) -> None:
        assert stage.info is not None and stage.info.export_dir is not None
        state = self.state(stage)
        export = Path(stage.info.export_dir)
        upstream_id = self._model_identity(self.plan.stages[stage.needs]) if stage.needs else None
        done = state.step("fit")
        digest = stage.config_digest()
        if done is not None and (export / "config.json").is_file():
            if done.get("config_sha256") != digest:
                raise PlanError(
                    f"stage {stage.name!r}: {stage.config} changed since its model was trained; "
                    f"pass --rerun {stage.name} to train it again (the check covers the files it names as base)"
                )
            if done.get("upstream") != upstream_id:
                raise PlanError(
                    f"stage {stage.name!r} was trained from an older {stage.needs!r} model; "
                    f"pass --rerun {stage.name} to train it from the current one"
                )
            self.echo(f"[{stage.name}] fit: done before, skipped ({export})")
            return
        if done is None and (export / "config.json").is_file():
            # An export made by running the same config by hand (e.g. examples/demo.sh): a finished fit
            # (ExportCallback writes only then, and refuses to overwrite it), so adopt it.
            self.echo(f"[{stage.name}] fit: adopting the existing export {export} (made outside the runner)")
            state.set_step("fit", {"config_sha256": digest, "upstream": upstream_id, "adopted": True, "finished_at": "adopted"})
            state.save()
            return
        args = ["fit", *self.config_args(stage)]
        last = self._last_checkpoint(stage)
        if last is not None:
            args += ["--ckpt_path", str(last)]
            self.echo(f"[{stage.name}] fit: resuming from {last}")
        else:
            self.echo(f"[{stage.name}] fit: {stage.config}")
        seconds = self._launch(stage, "fit", args)
        if not (export / "config.json").is_file():
            raise StageFailed(f"stage {stage.name!r}: fit finished but wrote no export at {export}")
        state = self.state(stage)
        state.data = {
            "steps": {
                "fit": {
                    "config_sha256": digest,
                    "upstream": upstream_id,
                    "seconds": round(seconds, 1),
                    "resumed_from": str(last) if last else None,
                    "overlays": [overlay.path for overlay in self.plan.overlays],
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 10**9:09d}",
                }
            }
        }
        state.save()  # evaluations of an earlier model are dropped with the old state

    def _last_checkpoint(self, stage: Stage) -> Path | None:
        """The newest complete checkpoint (file or sharded folder) of the stage's checkpoint folder."""
        if not (stage.info and stage.info.checkpoint_dir):
            return None
        choice = newest_complete_checkpoint(stage.info.checkpoint_dir)
        for path, why in choice.skipped:
            self.echo(f"[{stage.name}] fit: not resuming from {path}: {why}")
        if choice.path is not None:
            self.echo(f"[{stage.name}] fit: newest complete checkpoint {choice.path} (global step {choice.step})")
        return choice.path

    def _evaluate(self, stage: Stage, split: str, overrides: list[str]) -> None:
        state = self.state(stage)
        target = self.predictions_path(stage, split)
        model_id = self._model_identity(stage)
        done = state.step(split)
        if done is not None and target.is_file() and done.get("model") == model_id:
            self.echo(f"[{stage.name}] {split}: done before, skipped ({target})")
            return
        model = stage.evaluated_model
        if not Path(model).exists() and stage.train:
            raise PlanError(f"stage {stage.name!r}: model {model!r} to evaluate does not exist; run its fit first")
        args = [
            "test",
            *self.config_args(stage),
            "--model.init_args.backbone.init_args.model",
            model,
            "--model.init_args.predictions_path",
            str(target),
            "--trainer.logger",
            "false",
            *self.plan.eval_overrides,
            *overrides,
        ]
        for stale in (target, *target.parent.glob(f"{target.stem}.*{target.suffix}")):  # + counterfactual variants
            stale.unlink(missing_ok=True)
        self.echo(f"[{stage.name}] {split}: evaluating {model}")
        seconds = self._launch(stage, split, args)
        if not target.is_file():
            raise StageFailed(f"stage {stage.name!r}: {split} evaluation wrote no predictions at {target}")
        state = self.state(stage)
        state.set_step(split, {"model": model_id, "seconds": round(seconds, 1)})
        state.save()

    def _launch(self, stage: Stage, step: str, args: list[str]) -> float:
        log_file = self.stage_dir(stage) / f"{step}.log"
        start = time.perf_counter()
        code = self.launcher(args, log_file)
        seconds = time.perf_counter() - start
        if code != 0:
            tail = ""
            if log_file.is_file():
                tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
            raise StageFailed(
                f"stage {stage.name!r} step {step!r} failed (exit {code}) after {seconds:.0f} s; "
                f"command: python -m pathvlm_lightning {' '.join(args)}; log: {log_file}\n{tail}"
            )
        self.echo(f"[{stage.name}] {step}: {seconds:.0f} s")
        return seconds

    # ---- timings --------------------------------------------------------------------------------
    def timings(self) -> dict[str, dict[str, float]]:
        """Seconds per stage and step, as recorded in the stage states."""
        out: dict[str, dict[str, float]] = {}
        for stage in self.plan.stages.values():
            steps = self.state(stage).data.get("steps", {})
            out[stage.name] = {name: rec["seconds"] for name, rec in steps.items() if "seconds" in rec}
        return out
