"""``data_path: embedded_ood``: the synthetic out-of-domain set as a test-only split."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.synthetic import OOD_MODALITIES
from pathvlm_lightning.modules import SFTModule
from tests.fit_support import MemoryLogger, trainer_kwargs

PER_MODALITY = 4


def ood_datamodule(split_dir: Path, processor, seed: int = 0, **kwargs) -> VQADataModule:
    """The documented setting: one test split, used as the (unused) train split, no validation."""
    return VQADataModule(
        data_path="embedded_ood",
        split_dir=str(split_dir),
        train_split="test",
        val_split=None,
        seed=seed,
        processor=processor,
        embedded_ood_per_modality=PER_MODALITY,
        eval_batch_size=5,
        **kwargs,
    )


def served(datamodule: VQADataModule) -> list:
    datamodule.prepare_data()
    datamodule.setup("test")
    return [record for batch in datamodule.test_dataloader() for record in batch["records"]]


def test_test_split_serves_every_modality_with_fixed_option_order(tmp_path, tiny_processor):
    datamodule = ood_datamodule(tmp_path / "splits", tiny_processor)
    assert datamodule.split_sizes == {"test": None}  # the default for embedded_ood
    records = served(datamodule)
    assert len(records) == 3 * PER_MODALITY
    assert sorted({r.modality for r in records}) == sorted(OOD_MODALITIES)
    for modality, (question, _) in OOD_MODALITIES.items():
        mine = sorted((r for r in records if r.modality == modality), key=lambda r: r.id)
        assert {r.subset for r in mine} == {question.name}
        # fixed order: option k is class k; item i draws class i % 4, so the answers run A, B, C, D
        assert all(r.options == dict(zip("ABCD", question.classes)) for r in mine)
        assert [r.answer for r in mine] == ["A", "B", "C", "D"]
    assert all(Path(r.image).is_file() for r in records)
    # generated under <split_dir>/embedded_ood, split file written next to the manifest
    assert all(Path(r.image).is_relative_to((tmp_path / "splits" / "embedded_ood").resolve()) for r in records)
    lines = (tmp_path / "splits" / "test.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(r.id for r in records)


def test_generation_is_cached_and_deterministic_in_seed(tmp_path, tiny_processor):
    first = served(ood_datamodule(tmp_path / "a", tiny_processor))
    records_file = next((tmp_path / "a" / "embedded_ood").glob("*/records.jsonl"))
    stamp = records_file.stat().st_mtime_ns
    again = served(ood_datamodule(tmp_path / "a", tiny_processor))  # same folder: re-used, not rewritten
    assert records_file.stat().st_mtime_ns == stamp and again == first

    elsewhere = served(ood_datamodule(tmp_path / "b", tiny_processor))
    assert [(r.id, r.question, r.options, r.answer) for r in elsewhere] == [
        (r.id, r.question, r.options, r.answer) for r in first
    ]
    assert [Path(r.image).read_bytes() for r in elsewhere] == [Path(r.image).read_bytes() for r in first]

    other_seed = served(ood_datamodule(tmp_path / "c", tiny_processor, seed=1))
    assert [r.id for r in sorted(other_seed, key=lambda r: r.id)] == [r.id for r in sorted(first, key=lambda r: r.id)]
    pixels = {r.id: Path(r.image).read_bytes() for r in first}
    assert sum(Path(r.image).read_bytes() != pixels[r.id] for r in other_seed) == len(first)


def test_training_split_names_must_exist(tmp_path, tiny_processor):
    with pytest.raises(ValueError, match=r"train_split 'sft' is not one of the splits \['test'\]"):
        VQADataModule(data_path="embedded_ood", split_dir=str(tmp_path), processor=tiny_processor)
    with pytest.raises(ValueError, match="embedded_ood_per_modality must be at least 1, got 0"):
        VQADataModule(data_path="embedded_ood", split_dir=str(tmp_path), train_split="test",
                      embedded_ood_per_modality=0)  # fmt: skip


def test_trainer_test_reports_accuracy_per_modality(tmp_path, tiny_processor, tiny_backbone):
    module = SFTModule(tiny_backbone(), eval_max_new_tokens=4, predictions_path=str(tmp_path / "ood.jsonl"))
    datamodule = ood_datamodule(tmp_path / "splits", module.backbone.processor)
    logger = MemoryLogger()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger))
    torch.manual_seed(0)
    trainer.test(module, datamodule=datamodule)
    predictions = [json.loads(line) for line in (tmp_path / "ood.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 * PER_MODALITY
    assert {p["modality"] for p in predictions} == set(OOD_MODALITIES)
    logged = logger.keys()
    assert {f"test/accuracy_modality/{m}" for m in OOD_MODALITIES} <= logged
    assert logger.series("test/count")[-1][1] == 3 * PER_MODALITY
