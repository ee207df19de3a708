"""Precision settings: every one a shipped config uses or the README names runs a 2-step demo fit (SFT
and GRPO) through the CLI, whatever the batch carries; an optimizer that updates half-precision
weights is warned about with the share it cannot move.

The fits: Lightning's precision plugins walk every batch (``convert_input``: ``bf16-true`` casts
its float tensors, pixel values included, to bfloat16) and move it (``batch_to_device``); the batch
carries its records as :class:`BatchRecords`, which both pass through. Before, ``bf16-true``
crashed at the first batch on the frozen ``VQARecord``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

from pathvlm_lightning.backbone.precision import HALF_SPACING, stuck_weights
from pathvlm_lightning.cli import main
from pathvlm_lightning.data.collate import PromptCollator, SFTCollator
from pathvlm_lightning.data.records import BatchRecords
from pathvlm_lightning.modules import SFTModule
from tests.test_cli_configs import SMALL_DATA
from tests.test_data_support import make_image, record

REPO = Path(__file__).resolve().parents[1]
PRECISION = re.compile(r"\b(?:64|32|16|bf16)-(?:true|mixed)\b")
#: (trainer.precision, backbone dtype) of the fits below: each precision with float32 weights, and
#: bf16-true over bfloat16 weights (the paper configs' former setting).
CASES = [("32-true", "float32"), ("bf16-mixed", "float32"), ("bf16-true", "float32"), ("bf16-true", "bfloat16")]


def _shipped_precisions() -> set[str]:
    """``trainer.precision`` of every shipped YAML (configs/, configs/strategies/, configs/demo/)."""
    found = set()
    for path in REPO.glob("configs/**/*.yaml"):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        if "precision" in trainer:
            found.add(str(trainer["precision"]))
    return found


def test_every_shipped_and_documented_precision_runs_below() -> None:
    shipped = _shipped_precisions()
    documented = set(PRECISION.findall((REPO / "README.md").read_text()))
    assert "bf16-mixed" in shipped and "bf16-true" in documented  # the scan finds them
    assert shipped | documented <= {precision for precision, _ in CASES}


def test_precision_plugins_cast_a_batch_and_pass_its_records_through(tiny_processor, tmp_path: Path) -> None:
    records = [record("r1", str(make_image(tmp_path / "a.png"))), record("r2", str(make_image(tmp_path / "b.png", 9)))]
    sft, prompt = SFTCollator(tiny_processor)(records), PromptCollator(tiny_processor)(records)
    plugins = ((HalfPrecision("bf16-true"), torch.bfloat16), (MixedPrecision("bf16-mixed", "cpu"), torch.float32))
    for plugin, pixels in plugins:  # bf16-true: pixels in the compute dtype; bf16-mixed: autocast casts them
        for batch, tensors in ((sft, lambda b: b), (prompt, lambda b: b["prompt_inputs"])):
            converted = move_data_to_device(plugin.convert_input(batch), torch.device("cpu"))
            assert converted["records"] is batch["records"] and list(converted["records"]) == records
            assert tensors(converted)["pixel_values"].dtype == pixels
            assert tensors(converted)["input_ids"].dtype == torch.long  # integer tensors are never cast
    assert sft["records"][1:] == BatchRecords(records[1:]) and sft["records"][0] is records[0]


def _small_grpo(tmp_path: Path) -> Path:
    """An overlay of the demo GRPO stage with a smaller rollout (G=4, 16 new tokens) and a reward
    that varies between random completions, so that both steps train instead of being skipped."""
    path = tmp_path / "small_grpo.yaml"
    overlay = {"model": {"init_args": {
        "rollout": {"init_args": {"num_generations": 4, "max_new_tokens": 16}},
        "rewards+": [{"class_path": "tests.fit_support.LengthReward"}],
        "eval_max_new_tokens": 16,
    }}}  # fmt: skip
    path.write_text(yaml.safe_dump(overlay))
    return path


def _fit(stage: str, precision: str, dtype: str, tmp_path: Path):
    overlay = ["--config", str(_small_grpo(tmp_path))] if stage == "grpo" else []
    return main([
        "fit", "--config", str(REPO / f"configs/demo/{stage}.yaml"), *overlay, f"--run_dir={tmp_path / 'run'}",
        "--model.init_args.backbone.init_args.model=embedded-tiny",
        f"--model.init_args.backbone.init_args.dtype={dtype}", f"--trainer.precision={precision}",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=1",
        f"--data.init_args.split_dir={tmp_path / 'splits'}", *SMALL_DATA,
    ])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
@pytest.mark.parametrize(("precision", "dtype"), CASES)
def test_a_demo_fit_runs_two_steps_under(stage: str, precision: str, dtype: str, tmp_path: Path) -> None:
    cli = _fit(stage, precision, dtype, tmp_path)
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))  # logged only by a step that trained
    half = precision == "bf16-true" or dtype == "bfloat16"  # bf16-true casts the module itself
    trainable = {p.dtype for p in cli.model.parameters() if p.requires_grad}
    assert trainable == {torch.bfloat16 if half else torch.float32}
    assert (tmp_path / "run/export/config.json").is_file()


# ---------------------------------------------------------------- the half-precision warning
def test_stuck_weights_counts_what_an_update_of_lr_cannot_move() -> None:
    # bf16: stuck where |w| * 2**-9 > lr. At lr 2**-12 that is |w| > 2**-3 = 0.125:
    # 0.5, -0.25 and 0.2 are stuck; 0.125 (equal), 0.1, 0.0 and -0.01 are not: 3 of 7.
    bf16 = torch.tensor([0.5, -0.25, 0.2, 0.125, 0.1, 0.0, -0.01], dtype=torch.bfloat16)
    # fp16: |w| * 2**-11 > 2**-12 means |w| > 0.5: only -1.0 and 0.75 of 4.
    fp16 = torch.tensor([-1.0, 0.75, 0.5, 0.25], dtype=torch.float16)
    found = {f.dtype: f for f in stuck_weights([bf16, fp16, torch.ones(5)], lr=2.0**-12)}
    assert set(found) == {torch.bfloat16, torch.float16}  # float32 weights lose nothing
    assert (found[torch.bfloat16].stuck, found[torch.bfloat16].total) == (3, 7)
    assert (found[torch.float16].stuck, found[torch.float16].total) == (2, 4)
    # A lower bound: an update of lr, either way, rounds back on every weight counted as stuck.
    for weights in (bf16, fp16):
        stuck = weights.abs().float() * HALF_SPACING[weights.dtype] > 2.0**-12
        for update in (2.0**-12, -(2.0**-12)):
            assert torch.equal((weights.float() + update).to(weights.dtype)[stuck], weights[stuck])
    assert HALF_SPACING == {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


def _configure(backbone, lr: float) -> None:
    module = SFTModule(backbone, optimizer=lambda params: torch.optim.AdamW(params, lr=lr))
    module.configure_optimizers()


def test_updating_bf16_weights_warns_once_with_the_share_that_cannot_move(tiny_backbone, caplog) -> None:
    backbone = tiny_backbone(dtype="bfloat16")
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    with torch.no_grad():  # weights set by hand: per tensor, the first half 1.0, the rest 0.0
        for p in trainable:
            p.zero_()
            p.view(-1)[: p.numel() // 2] = 1.0
    total = sum(p.numel() for p in trainable)
    ones = sum(p.numel() // 2 for p in trainable)
    # 1.0 * 2**-9 = 1.95e-3 > lr 1e-3: every 1.0 is stuck; 0.0 * 2**-9 = 0 is not
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning"):
        _configure(backbone, lr=1e-3)
    (record,) = [r for r in caplog.records if "bfloat16" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"{total:,} trainable weights are stored in bfloat16" in message
    assert f"at least {100 * ones / total:.1f} % of them ({ones:,})" in message and "at lr 0.001" in message
    # at lr 1e-2, above 1.0 * 2**-9, nothing is stuck: "at least 0.0 %"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning"):
        _configure(backbone, lr=1e-2)
    assert "at least 0.0 % of them (0)" in caplog.text


def test_float32_weights_and_float32_lora_adapters_do_not_warn(tiny_backbone, caplog) -> None:
    from pathvlm_lightning.backbone.lora import LoraOptions

    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning"):
        _configure(tiny_backbone(), lr=1e-6)
        lora = tiny_backbone(dtype="bfloat16", lora=LoraOptions(r=4))  # frozen bf16 base, float32 adapters
        assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
        _configure(lora, lr=1e-6)
    assert "trainable weights are stored in" not in caplog.text
