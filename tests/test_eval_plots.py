"""Figures from real TensorBoard event files and a real report, checked as PNGs read back with PIL."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from pathvlm_lightning.eval.plots import (
    DEFAULT_REWARD_TAGS,
    DPI,
    PANEL_INCHES,
    plot_reward_curves,
    plot_stage_accuracy,
    read_scalars,
)
from pathvlm_lightning.eval.report import StageEval, build_report
from tests.test_eval_report import ALPHA, BETA, BETA_OOD

PANEL_PIXELS = (int(PANEL_INCHES[0] * DPI), int(PANEL_INCHES[1] * DPI))  # (500, 400)


def _log(folder: Path, scalars: dict[str, list[tuple[int, float]]], wall_start: float = 1000.0) -> None:
    """Write ``{tag: [(step, value)]}`` into a fresh event file under ``folder``."""
    writer = SummaryWriter(log_dir=str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, global_step=step, walltime=wall_start + step)
    writer.close()


def _png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_default_tags_are_what_the_grpo_module_logs() -> None:
    # GRPOModule logs reward/<callback name> per reward and reward/total_mean; the accuracy and
    # format reward callbacks are named "accuracy" and "format".
    from pathvlm_lightning.callbacks.rewards import AccuracyReward, FormatReward

    assert DEFAULT_REWARD_TAGS == (
        "reward/total_mean",
        f"reward/{AccuracyReward.default_name}",
        f"reward/{FormatReward.default_name}",
    )


def test_read_scalars_reads_back_what_was_logged(tmp_path: Path) -> None:
    _log(tmp_path / "lightning_logs" / "version_0", {
        "reward/total_mean": [(0, 0.5), (1, 0.75), (2, 1.25)],
        "reward/accuracy": [(0, 0.25), (2, 0.5)],
        "loss": [(0, 3.0)],
    })
    scalars = read_scalars(tmp_path, ["reward/total_mean", "reward/accuracy", "reward/process"])
    assert scalars == {
        "reward/total_mean": [(0, 0.5), (1, 0.75), (2, 1.25)],
        "reward/accuracy": [(0, 0.25), (2, 0.5)],
        "reward/process": [],  # never logged
    }


def test_read_scalars_merges_files_latest_write_wins(tmp_path: Path) -> None:
    # version_0 ran to step 3; the resumed run (version_1) re-logged steps 2-3 and went on to 5.
    _log(tmp_path / "version_0", {"reward/accuracy": [(1, 0.25), (2, 0.5), (3, 0.5)]}, wall_start=1000.0)
    _log(tmp_path / "version_1", {"reward/accuracy": [(2, 0.75), (3, 0.75), (5, 1.0)]}, wall_start=2000.0)
    assert read_scalars(tmp_path, ["reward/accuracy"]) == {
        "reward/accuracy": [(1, 0.25), (2, 0.75), (3, 0.75), (5, 1.0)]
    }


def test_read_scalars_without_event_files_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "version_0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files.*empty"):
        read_scalars(tmp_path / "empty", ["reward/accuracy"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scalars(tmp_path / "absent", ["reward/accuracy"])


def test_plot_reward_curves_writes_one_panel_per_tag(tmp_path: Path) -> None:
    _log(tmp_path / "r1", {
        "reward/total_mean": [(0, 0.5), (1, 1.0)],
        "reward/accuracy": [(0, 0.25), (1, 0.5)],
        "reward/format": [(0, 0.25), (1, 0.5)],
    })
    _log(tmp_path / "gamma", {"reward/total_mean": [(0, 1.0), (1, 1.5)], "reward/accuracy": [(0, 0.5), (1, 0.75)]})
    out = plot_reward_curves({"R1": tmp_path / "r1", "Gamma": tmp_path / "gamma"}, tmp_path / "figs" / "rewards.png")
    assert out == tmp_path / "figs" / "rewards.png"
    assert _png_size(out) == (3 * PANEL_PIXELS[0], PANEL_PIXELS[1])  # (1500, 400)
    assert [p.name for p in out.parent.iterdir()] == ["rewards.png"]  # no partial file left behind


def test_plot_reward_curves_errors(tmp_path: Path) -> None:
    _log(tmp_path / "r1", {"reward/total_mean": [(0, 0.5)]})
    (tmp_path / "delta").mkdir()
    with pytest.raises(FileNotFoundError, match="stage 'Delta'.*no TensorBoard event files"):
        plot_reward_curves({"R1": tmp_path / "r1", "Delta": tmp_path / "delta"}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"none of the tags \['reward/kl'\]"):
        plot_reward_curves({"R1": tmp_path / "r1"}, tmp_path / "x.png", tags=["reward/kl"])
    assert not (tmp_path / "x.png").exists()


def test_plot_stage_accuracy_with_and_without_ood(tmp_path: Path) -> None:
    with_ood = build_report([StageEval("Alpha", ALPHA), StageEval("Beta", BETA, ood=BETA_OOD)], [], num_resamples=500)
    two_panels = plot_stage_accuracy(with_ood, tmp_path / "accuracy.png")
    assert _png_size(two_panels) == (2 * PANEL_PIXELS[0], PANEL_PIXELS[1])  # (1000, 400)

    test_only = build_report([StageEval("Alpha", ALPHA)], [], num_resamples=500)
    one_panel = plot_stage_accuracy(test_only, tmp_path / "accuracy_test_only.png")
    assert _png_size(one_panel) == PANEL_PIXELS
    with pytest.raises(ValueError, match="no stages"):
        plot_stage_accuracy({"stages": {}}, tmp_path / "none.png")
