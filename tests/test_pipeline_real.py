"""The pipeline runner end to end through the real CLI, on a 2-stage toy chain (SFT 2 steps -> GRPO 2
steps) on a small embedded set, each stage a small overlay of a shipped demo stage: every command it
builds must run, the report must come out of the saved predictions, and a second run must launch nothing."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from pathvlm_lightning.pipeline import PipelineRunner, load_plan
from pathvlm_lightning.pipeline.runner import subprocess_launcher
from pathvlm_lightning.pipeline.tables import write_pipeline_report
from pathvlm_lightning.stage_config import read_stage_yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "embedded_records": 28,
    "split_sizes": {"sft": 8, "rl": 8, "val": 4, "test": None},
    "batch_size": 2,
    "eval_batch_size": 8,
}


def _small_config(source: str, target: Path) -> None:
    """An overlay of the shipped stage ``source`` (its ``base:``) that trains 2 steps on a small set."""
    config = {
        "base": str(REPO / source),
        "trainer": {"max_steps": 2, "enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                    "log_every_n_steps": 1},
        "data": {"init_args": SMALL},
    }  # fmt: skip
    if read_stage_yaml(REPO / source)["model"]["init_args"].get("rollout"):  # GRPO: a smaller rollout
        config["model"] = {"init_args": {"rollout": {"init_args": {"num_generations": 2, "max_new_tokens": 8}}}}
    target.write_text(yaml.safe_dump(config, sort_keys=False))


def test_two_stage_chain_runs_reports_and_then_skips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    _small_config("configs/demo/sft.yaml", tmp_path / "configs/a.yaml")
    _small_config("configs/demo/grpo.yaml", tmp_path / "configs/b.yaml")
    plan = yaml.safe_load((REPO / "configs/demo/pipeline.yaml").read_text())
    plan["stages"] = {
        "a": {"config": "configs/a.yaml", "description": "SFT 2 steps"},
        "b": {"config": "configs/b.yaml", "needs": "a", "description": "GRPO 2 steps"},
    }
    plan.update(comparisons=[["b", "a"]], num_resamples=100)
    plan["ood_overrides"].append("--data.init_args.embedded_ood_per_modality=2")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))

    launched: list[list[str]] = []

    def launcher(args: list[str], log_file: Path) -> int:
        launched.append(args)
        return subprocess_launcher(args, log_file)

    runner = PipelineRunner(load_plan("plan.yaml"), launcher=launcher, echo=lambda _: None)
    runner.run()
    assert [a[0] for a in launched] == ["fit", "test", "test", "fit", "test", "test"]
    # The CLI's logging reaches each stage's log file: the project's INFO lines, not third-party ones.
    first_fit = (runner.out_dir / "a" / "fit.log").read_text()
    assert "INFO pathvlm_lightning.data.splits: wrote splits to" in first_fit
    assert "INFO pathvlm_lightning.data.splits: re-using splits" in (runner.out_dir / "b" / "fit.log").read_text()
    assert "INFO transformers" not in first_fit and "INFO lightning" not in first_fit
    assert (tmp_path / "runs/demo/grpo/export/config.json").is_file()

    report = write_pipeline_report(runner)
    test_items = {line["id"] for line in map(json.loads, open("runs/demo/report/a/predictions_test.jsonl"))}
    assert report["stages"]["a"]["count"] == report["stages"]["b"]["count"] == len(test_items) > 0
    assert set(report["ood"]["b"]["by_modality"]) == {"synthetic-CT", "synthetic-dermoscopy", "synthetic-fundus"}
    assert report["comparisons"][0]["num_items"] == len(test_items)
    with Image.open("runs/demo/report/accuracy.png") as image:
        assert image.size[0] > 0
    with Image.open("runs/demo/report/rewards.png") as image:  # from stage b's TensorBoard scalars
        assert image.size[0] > 0
    # the demo plan's counterfactual variants (test only) and the embedded set's chain faithfulness
    counterfactual = report["counterfactual"]["stages"]
    for stage in ("a", "b"):
        assert {"blank_accuracy", "swapped_accuracy", "no_image_accuracy", "image_reliance",
                "option_consistency"} <= set(counterfactual[stage])
        for name in ("blank", "swapped", "no_image", "shuffled"):
            variant = Path(f"runs/demo/report/{stage}/predictions_test.{name}.jsonl").read_text().splitlines()
            assert {json.loads(line)["id"] for line in variant} == test_items
        assert not Path(f"runs/demo/report/{stage}/predictions_ood.blank.jsonl").exists()
    assert {"image_reliance", "option_consistency"} <= set(report["counterfactual"]["comparisons"][0]["columns"])
    assert set(report["faithfulness"]["stages"]) == {"a", "b"}
    text = Path("runs/demo/report/report.md").read_text()
    assert "## Counterfactual inputs" in text and "## Chain faithfulness" in text
    with Image.open("runs/demo/report/counterfactual.png") as image:
        assert image.size[0] > 0

    launched.clear()
    PipelineRunner(load_plan("plan.yaml"), launcher=launcher, echo=lambda _: None).run()
    assert launched == []
