"""The pipeline runner's order, skip, resume and staleness rules on a 2-stage toy chain.

The launcher is replaced by one that writes what the real CLI would (an export folder, a checkpoint,
a predictions file) and records each command, so the runner's own logic is what is tested here;
``test_pipeline_real.py`` runs the same chain through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pathvlm_lightning.eval.scoring import Prediction
from pathvlm_lightning.pipeline import PipelineRunner, PlanError, StageFailed, load_plan
from pathvlm_lightning.eval.counterfactual import variant_path
from pathvlm_lightning.pipeline.tables import write_pipeline_report


def _config(tmp: Path, name: str, module: str, start: str) -> Path:
    config = {
        "trainer": {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp / name), "name": "tb"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp / name / "ckpt")}},
                {"class_path": "pathvlm_lightning.callbacks.ExportCallback", "init_args": {"dirpath": str(tmp / name / "export")}},
            ],
        },
        "model": {
            "class_path": f"pathvlm_lightning.modules.{module}",
            "init_args": {"backbone": {"class_path": "pathvlm_lightning.backbone.Backbone", "init_args": {"model": start}}},
        },
        "data": {"class_path": "pathvlm_lightning.data.VQADataModule", "init_args": {"data_path": "embedded"}},
    }
    if module == "GRPOModule":  # its parts: a stage config names them under model.init_args
        config["model"]["init_args"] |= {
            "rollout": {"class_path": "pathvlm_lightning.callbacks.RolloutCallback"},
            "rewards": [{"class_path": "pathvlm_lightning.callbacks.FormatReward"}],
            "reference": {"class_path": "pathvlm_lightning.callbacks.ReferenceModelCallback"},
        }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _plan(tmp: Path, ood: bool = True, b_start: str | None = None) -> Path:
    a = _config(tmp, "a", "SFTModule", "embedded-tiny")
    b = _config(tmp, "b", "GRPOModule", b_start or str(tmp / "a" / "export"))
    plan = {
        "out_dir": str(tmp / "report"),
        "num_resamples": 200,
        "stages": {"a": {"config": str(a), "description": "sft"}, "b": {"config": str(b), "needs": "a"}},
        "comparisons": [["b", "a"]],
        "ood_overrides": ["--data.init_args.data_path=embedded_ood"] if ood else [],
    }
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _prediction(i: int, correct: bool, modality: str = "H&E") -> dict:
    return Prediction(
        id=f"q{i}", image="x.png", subset="grade", modality=modality, question="?", options={"A": "x", "B": "y"},
        answer="A", completion="<think>t</think><answer>A) x</answer>", predicted_letter="A", correct=correct,
        format_ok=True, output_tokens=10,
    ).to_json()


class FakeCLI:
    """Writes what ``python -m pathvlm_lightning fit/test`` would; ``fail_fit`` simulates a crash mid-fit."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail_fit: str | None = None

    def __call__(self, args: list[str], log_file: Path) -> int:
        self.calls.append(args)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
        callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"]["dirpath"] for c in config["trainer"]["callbacks"]}
        stage = Path(callbacks["ExportCallback"]).parent.name
        if args[0] == "fit":
            ckpt = Path(callbacks["ModelCheckpoint"])
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save({"global_step": 1}, ckpt / "last.ckpt")
            if self.fail_fit == stage:
                self.fail_fit = None
                log_file.write_text("Traceback: killed\n")
                return 1
            export = Path(callbacks["ExportCallback"])
            export.mkdir(parents=True, exist_ok=True)
            (export / "config.json").write_text("{}")
            return 0
        target = Path(args[args.index("--model.init_args.predictions_path") + 1])
        ood = any("embedded_ood" in a for a in args)
        right = {"a": 2, "b": 3}.get(stage, 0)
        lines = [_prediction(i, i < right, "CT" if ood else "H&E") for i in range(4)]
        target.write_text("".join(json.dumps(line) + "\n" for line in lines))
        if any(a.startswith("--data.init_args.counterfactuals=[blank") for a in args) and not ood:
            for name, right_under in COUNTERFACTUAL_RIGHT[stage].items():
                variant = [_prediction(i, i < right_under) for i in range(4)]
                if name == "shuffled":  # the options swapped: a consistent answer names the other letter
                    for row in variant:
                        row["options"] = {"A": "y", "B": "x"}
                        row["predicted_letter"] = "B" if row["id"] in CONSISTENT[stage] else "A"
                variant_path(target, name).write_text("".join(json.dumps(line) + "\n" for line in variant))
        return 0


# Items right under each counterfactual (the first n of q0..q3), and the items whose shuffled answer keeps its text.
COUNTERFACTUAL_RIGHT = {
    "a": {"blank": 1, "swapped": 1, "no_image": 1, "shuffled": 2},
    "b": {"blank": 1, "swapped": 0, "no_image": 1, "shuffled": 2},
}
CONSISTENT = {"a": {"q0", "q1"}, "b": {"q0", "q1", "q2"}}


def _steps(calls: list[list[str]]) -> list[tuple[str, str]]:
    out = []
    for args in calls:
        stage = Path(args[args.index("--config") + 1]).stem
        kind = "ood" if any("embedded_ood" in a for a in args) else args[0]
        out.append((stage, kind))
    return out


def test_runs_in_order_then_skips_everything(tmp_path):
    cli = FakeCLI()
    runner = PipelineRunner(load_plan(_plan(tmp_path)), launcher=cli, echo=lambda _: None)
    runner.run()
    assert _steps(cli.calls) == [("a", "fit"), ("a", "test"), ("a", "ood"), ("b", "fit"), ("b", "test"), ("b", "ood")]
    test_call = cli.calls[1]
    assert test_call[test_call.index("--model.init_args.backbone.init_args.model") + 1] == str(tmp_path / "a" / "export")
    cli.calls.clear()
    runner.run()
    assert cli.calls == []  # every step's output exists and is current


def test_interrupted_fit_resumes_from_last_checkpoint(tmp_path):
    cli = FakeCLI()
    cli.fail_fit = "b"
    runner = PipelineRunner(load_plan(_plan(tmp_path, ood=False)), launcher=cli, echo=lambda _: None)
    with pytest.raises(StageFailed, match=r"stage 'b' step 'fit' failed \(exit 1\).*fit\.log"):
        runner.run()
    cli.calls.clear()
    runner.run()
    assert _steps(cli.calls) == [("b", "fit"), ("b", "test")]  # a is not touched again
    assert cli.calls[0][-2:] == ["--ckpt_path", str(tmp_path / "b" / "ckpt" / "last.ckpt")]
    state = json.loads((tmp_path / "report" / "b" / "state.json").read_text())
    assert state["steps"]["fit"]["resumed_from"].endswith("last.ckpt") and "test" in state["steps"]


def test_changed_config_and_stale_upstream_are_refused_until_rerun(tmp_path):
    cli = FakeCLI()
    plan_path = _plan(tmp_path, ood=False)
    PipelineRunner(load_plan(plan_path), launcher=cli, echo=lambda _: None).run()
    (tmp_path / "a.yaml").write_text((tmp_path / "a.yaml").read_text() + "seed_everything: 1\n")
    runner = PipelineRunner(load_plan(plan_path), launcher=cli, echo=lambda _: None)
    with pytest.raises(PlanError, match="a.yaml changed since its model was trained; pass --rerun a"):
        runner.run()
    cli.calls.clear()
    with pytest.raises(PlanError, match="'b' was trained from an older 'a' model; pass --rerun b"):
        runner.run(rerun=["a"])
    assert _steps(cli.calls) == [("a", "fit"), ("a", "test")]
    cli.calls.clear()
    runner.run(rerun=["b"])
    assert _steps(cli.calls) == [("b", "fit"), ("b", "test")]


def test_test_step_reruns_when_its_predictions_are_gone(tmp_path):
    cli = FakeCLI()
    runner = PipelineRunner(load_plan(_plan(tmp_path, ood=False)), launcher=cli, echo=lambda _: None)
    runner.run()
    (tmp_path / "report" / "a" / "predictions_test.jsonl").unlink()
    cli.calls.clear()
    runner.run()
    assert _steps(cli.calls) == [("a", "test")]


def test_an_export_made_by_hand_is_adopted_not_retrained(tmp_path):
    (tmp_path / "a" / "export").mkdir(parents=True)
    (tmp_path / "a" / "export" / "config.json").write_text("{}")
    cli = FakeCLI()
    runner = PipelineRunner(load_plan(_plan(tmp_path, ood=False)), launcher=cli, echo=lambda _: None)
    runner.run(["a"])
    assert _steps(cli.calls) == [("a", "test")]
    assert json.loads((tmp_path / "report" / "a" / "state.json").read_text())["steps"]["fit"]["adopted"] is True


def test_selecting_a_stage_whose_upstream_is_missing_is_an_error(tmp_path):
    runner = PipelineRunner(load_plan(_plan(tmp_path, ood=False)), launcher=FakeCLI(), echo=lambda _: None)
    with pytest.raises(PlanError, match="run 'a' first"):
        runner.run(["b"])
    with pytest.raises(PlanError, match=r"unknown stage\(s\) \['c'\]"):
        runner.run(["c"])


def test_plan_refuses_a_config_that_does_not_start_from_its_upstream(tmp_path):
    with pytest.raises(PlanError, match="needs 'a', but .*b.yaml starts from 'elsewhere'"):
        load_plan(_plan(tmp_path, b_start="elsewhere"))


def test_report_tables_come_from_the_saved_predictions(tmp_path):
    cli = FakeCLI()
    runner = PipelineRunner(load_plan(_plan(tmp_path)), launcher=cli, echo=lambda _: None)
    runner.run()
    report = write_pipeline_report(runner, plots=False)
    assert report["stages"]["a"]["accuracy"] == 0.5 and report["stages"]["b"]["accuracy"] == 0.75
    (comparison,) = report["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["diff"]) == ("b", "a", 0.25)
    assert comparison["a_only"] == 1 and comparison["b_only"] == 0
    assert report["ood"]["b"]["by_modality"]["CT"]["accuracy"] == 0.75
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| b |" in text and "Wall time" in text
    assert json.loads((tmp_path / "report" / "report.json").read_text())["stages"]["a"]["count"] == 4


@pytest.mark.parametrize("plan", ["configs/pipeline.yaml", "configs/demo/pipeline.yaml"])
def test_shipped_plans_load_with_every_stage_wired_to_its_upstream(plan, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    loaded = load_plan(plan)
    assert list(loaded.stages) == ["base", "alpha", "beta", "r1", "gamma", "delta", "epsilon"]
    assert [s.info.kind for s in loaded.stages.values()] == ["sft", "sft", "grpo", "grpo", "sft", "sft", "grpo"]
    assert ("beta", "alpha") in loaded.comparisons and ("beta", "gamma") in loaded.comparisons
    assert f"python -m pathvlm_lightning pipeline --plan {plan}" in Path(plan).read_text()


def test_report_has_the_counterfactual_columns_ci_and_png(tmp_path):
    plan = yaml.safe_load(_plan(tmp_path).read_text())
    plan["eval_overrides"] = ["--data.init_args.counterfactuals=[blank,swapped,no_image,shuffled]"]
    plan["ood_overrides"].append("--data.init_args.counterfactuals=[]")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    runner = PipelineRunner(load_plan(tmp_path / "plan.yaml"), launcher=FakeCLI(), echo=lambda _: None)
    runner.run()
    report = write_pipeline_report(runner, plots=True)
    rows = report["counterfactual"]["stages"]
    # a: right on q0, q1 (0.5); swapped right on q0 -> reliance 0.5 - 0.25. b: right on q0-q2 (0.75), never
    # with a swapped image -> 0.75. Option consistency: the shuffled answer names the original text on
    # q0, q1 (a) and q0-q2 (b).
    assert (rows["a"]["accuracy"], rows["a"]["swapped_accuracy"], rows["a"]["image_reliance"]) == (0.5, 0.25, 0.25)
    assert (rows["b"]["accuracy"], rows["b"]["swapped_accuracy"], rows["b"]["image_reliance"]) == (0.75, 0.0, 0.75)
    assert (rows["a"]["option_consistency"], rows["b"]["option_consistency"]) == (0.5, 0.75)
    assert rows["b"]["blank_accuracy"] == rows["b"]["no_image_accuracy"] == 0.25
    assert rows["b"]["ci"]["image_reliance"][0] <= 0.75 <= rows["b"]["ci"]["image_reliance"][1]
    (comparison,) = report["counterfactual"]["comparisons"]
    columns = comparison["columns"]
    assert (comparison["a"], comparison["b"]) == ("b", "a")
    assert columns["image_reliance"]["diff"] == pytest.approx(0.5)  # per item: b [1,1,1,0] - a [0,1,0,0]
    assert columns["swapped_accuracy"]["diff"] == pytest.approx(-0.25)
    assert columns["option_consistency"]["diff"] == pytest.approx(0.25)
    assert all(c["ci_low"] <= c["diff"] <= c["ci_high"] and c["num_items"] == 4 for c in columns.values())
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Counterfactual inputs" in text and "| b vs a | +25.0 [" in text  # accuracy b - a
    assert "image reliance %" in text
    png = tmp_path / "report" / "counterfactual.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the OOD run got no variants; a re-evaluation removes the stale variant files first
    assert not (tmp_path / "report" / "a" / "predictions_ood.blank.jsonl").exists()
    stale = tmp_path / "report" / "a" / "predictions_test.blank.jsonl"
    assert stale.is_file()
    plan["eval_overrides"] = []
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    (tmp_path / "report" / "a" / "predictions_test.jsonl").unlink()
    PipelineRunner(load_plan(tmp_path / "plan.yaml"), launcher=FakeCLI(), echo=lambda _: None).run(["a"])
    assert (tmp_path / "report" / "a" / "predictions_test.jsonl").is_file() and not stale.exists()
