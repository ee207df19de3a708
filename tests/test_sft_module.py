"""SFTModule end to end on the tiny model: a 2-step fit, greedy test, and the exported folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForImageTextToText

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.callbacks import ExportCallback
from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.splits import read_split
from pathvlm_lightning.modules import SFTModule
from tests.fit_support import make_datamodule, parameters, tensorboard_events, trainer_kwargs


@dataclass
class FittedSFT:
    root: Path
    module: SFTModule
    datamodule: VQADataModule
    trainer: pl.Trainer
    before: dict[str, torch.Tensor]
    losses: list[float]
    test_metrics: dict[str, float]


class _LossRecorder(pl.Callback):
    """The loss each training step returned (what the optimizer stepped on)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> FittedSFT:
    """One 2-step SFT fit with TensorBoard and export, then ``test``: shared by the tests below."""
    root = tmp_path_factory.mktemp("sft")
    pl.seed_everything(0)
    module = SFTModule(
        Backbone("embedded-tiny", seed=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        eval_max_new_tokens=8,
    )
    before = parameters(module.backbone)
    datamodule = make_datamodule(root, module.backbone.processor, "sft", batch_size=4, eval_batch_size=8)
    recorder = _LossRecorder()
    trainer = pl.Trainer(
        **trainer_kwargs(
            root,
            max_steps=2,
            logger=TensorBoardLogger(save_dir=str(root), name="tb"),
            callbacks=[recorder, ExportCallback(str(root / "export"))],
        )
    )
    trainer.fit(module, datamodule=datamodule)
    (test_metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return FittedSFT(root, module, datamodule, trainer, before, recorder.losses, test_metrics)


def test_fit_trains_the_language_model_and_keeps_the_vision_tower(fitted: FittedSFT) -> None:
    after = parameters(fitted.module.backbone)
    changed = {name for name, p in after.items() if not torch.equal(p, fitted.before[name])}
    language = {n for n in after if n.startswith("model.model.language_model.")}
    visual = {n for n in after if n.startswith("model.model.visual.")}  # backbone.hf_model.model.visual
    assert fitted.trainer.global_step == 2
    assert language and language <= changed  # lr 1e-2 for 2 AdamW steps moves every LM weight
    assert visual and not visual & changed, sorted(visual & changed)[:3]
    assert len(fitted.losses) == 2 and all(math.isfinite(x) for x in fitted.losses)


def test_fit_writes_train_loss_to_tensorboard(fitted: FittedSFT) -> None:
    events = tensorboard_events(fitted.root / "tb")
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars
    logged = [e.value for e in events.Scalars("train/loss")]
    # log_every_n_steps=1: one value per step, the loss that step optimised
    assert logged == pytest.approx(fitted.losses, rel=1e-6)


def test_test_writes_one_prediction_per_record(fitted: FittedSFT) -> None:
    records = read_split(fitted.root / "splits", "test")
    path = Path(fitted.trainer.log_dir) / "predictions_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
    for row in rows:
        assert {"completion", "correct", "format_ok", "predicted_letter", "output_tokens"} <= row.keys()
        assert isinstance(row["correct"], bool) and isinstance(row["format_ok"], bool)
        assert 1 <= row["output_tokens"] <= 8  # eval_max_new_tokens
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    assert fitted.test_metrics["test/accuracy"] == pytest.approx(accuracy)
    assert fitted.test_metrics["test/count"] == len(records)
    for subset in {r.subset for r in records}:
        in_subset = [r for r in rows if r["subset"] == subset]
        expected = sum(r["correct"] for r in in_subset) / len(in_subset)
        assert fitted.test_metrics[f"test/accuracy_subset/{subset}"] == pytest.approx(expected)


def test_export_reloads_with_plain_transformers_and_same_logits(fitted: FittedSFT) -> None:
    reloaded = AutoModelForImageTextToText.from_pretrained(str(fitted.root / "export")).eval()
    module = fitted.module.eval()
    batch = next(iter(fitted.datamodule.train_dataloader()))
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    inputs = {k: batch[k] for k in keys}
    # what Qwen's processor returns beside the ids: 1 marks image slots (the 3-D rotary positions need it)
    token_types = (batch["input_ids"] == reloaded.config.image_token_id).long()  # [B, T]
    with torch.no_grad():
        expected = module.backbone(**inputs).logits  # [B, T, V]
        got = reloaded(**inputs, mm_token_type_ids=token_types).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the export is the trained model, not the initial one
    initial = fitted.before["model.model.language_model.embed_tokens.weight"]  # tied with lm_head
    assert not torch.equal(initial, reloaded.get_input_embeddings().weight.detach())
