"""Each loss class selected in YAML runs the demo GRPO stage through the CLI (3 steps, tiny model), and
the saved hyperparameters and the model card name it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pathvlm_lightning.cli import main
from pathvlm_lightning.commands.model_card import model_card
from pathvlm_lightning.grpo.losses import CISPOLoss, GSPOLoss, SAPOLoss
from tests.test_cli_configs import REPO, SMALL_DATA

LOSSES = {
    "GSPOLoss": (GSPOLoss, "{epsilon_low: 0.0003, epsilon_high: 0.0004, beta: 0.04}"),
    "CISPOLoss": (CISPOLoss, "{epsilon_high: 4.0, beta: 0.0}"),
    "SAPOLoss": (SAPOLoss, "{tau_pos: 1.0, tau_neg: 1.05, beta: 0.04}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_demo_grpo_fit_with_the_loss_chosen_in_yaml(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cls, init = LOSSES[name]
    cli = main([
        "fit", "--config", str(REPO / "configs/demo/grpo.yaml"),
        "--model.init_args.backbone.init_args.model=embedded-tiny",  # the SFT stage's export is not here
        f"--model.init_args.loss={{class_path: pathvlm_lightning.grpo.losses.{name}, init_args: {init}}}",
        "--model.init_args.skip_zero_advantage_steps=false",  # a random tiny model's rewards rarely differ
        *(["--model.init_args.reference=null"] if yaml.safe_load(init)["beta"] == 0 else []),  # beta 0: no reference
        "--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0", *SMALL_DATA,
    ])  # fmt: skip
    assert type(cli.model.loss) is cls
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    expected = yaml.safe_load(init)
    saved = cli.model.hparams["loss"]
    assert saved["class_path"] == f"pathvlm_lightning.grpo.losses.{name}"
    assert {k: saved["init_args"][k] for k in expected} == expected
    (hparams_file,) = (tmp_path / "runs/demo/grpo").rglob("hparams.yaml")
    assert yaml.safe_load(hparams_file.read_text())["loss"] == saved
    (config_file,) = (tmp_path / "runs/demo/grpo").rglob("config.yaml")
    config = yaml.safe_load(config_file.read_text())
    assert config["model"]["init_args"]["loss"]["class_path"] == f"pathvlm_lightning.grpo.losses.{name}"
    card = model_card("grpo", "", "embedded-tiny", config, None)
    assert f"| loss | {name} |" in card
    for key, value in expected.items():
        assert f"| {key} | {value} |" in card
