"""VQADataModule without a Trainer: every input format yields batches with the right keys and shapes."""

from __future__ import annotations

import json

import datasets
import pytest

from pathvlm_lightning.data.datamodule import EpochSeededSampler, RecordDataset, VQADataModule
from pathvlm_lightning.data.splits import SplitMismatchError
from tests.test_data_support import pathmmu_rows, vlm_r1_rows, write_jsonl

SIZES = {"sft": 6, "val": 2, "test": None}  # 12 records -> 6 / 2 / 4


def _write(tmp_path, kind):
    """A 12-record dataset in format ``kind``; returns (data_path, record_style)."""
    if kind == "vlm_r1":
        return str(write_jsonl(tmp_path / "r1.jsonl", vlm_r1_rows(tmp_path, 12))), "vlm_r1"
    rows = pathmmu_rows(tmp_path, 12)
    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", rows)), "pathmmu"
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows))
        return str(tmp_path / "d.json"), "pathmmu"
    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        table.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet"), "pathmmu"
    table.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved"), "pathmmu"


def _module(tmp_path, processor, data_path, **kwargs):
    kwargs.setdefault("split_sizes", SIZES)
    kwargs.setdefault("batch_size", 2)
    return VQADataModule(data_path=data_path, split_dir=str(tmp_path / "splits"), processor=processor, **kwargs)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved", "vlm_r1"])
def test_each_format_gives_sft_and_prompt_batches(tmp_path, tiny_processor, kind):
    data_path, style = _write(tmp_path, kind)
    if kind == "saved":  # relative image paths of a saved folder start from that folder
        kwargs = {"image_root": str(tmp_path)}
    else:
        kwargs = {}
    dm = _module(tmp_path, tiny_processor, data_path, record_style=style, **kwargs)
    dm.prepare_data()
    assert dm.manifest.counts == {"sft": 6, "val": 2, "test": 4}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "records"} <= set(batch)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 2
    assert batch["pixel_values"].shape == (2 * 16, 1176)  # two 56x56 tiles, 16 patches each
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert len(batch["records"]) == 2 and batch["records"][0].options["C"] == "large"
    assert sum(len(b["records"]) for b in dm.val_dataloader()) == 2
    dm.setup("test")
    test_batches = list(dm.test_dataloader())
    assert [len(b["records"]) for b in test_batches] == [2, 2]
    assert set(test_batches[0]) == {"prompt_inputs", "records"}
    assert test_batches[0]["prompt_inputs"]["input_ids"].shape[0] == 2


def test_prompt_batches_for_grpo_and_eval_batch_size(tmp_path, tiny_processor):
    data_path, _ = _write(tmp_path, "jsonl")
    dm = _module(tmp_path, tiny_processor, data_path, batch_kind="prompt", eval_batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt_inputs", "records"} and len(batch["records"]) == 2
    assert len(next(iter(dm.val_dataloader()))["records"]) == 2  # the whole 2-record val split


def test_second_stage_reuses_the_split_and_other_seed_is_refused(tmp_path, tiny_processor):
    data_path, _ = _write(tmp_path, "jsonl")
    sft_stage = _module(tmp_path, tiny_processor, data_path)
    sft_stage.prepare_data()
    sft_stage.setup("test")
    rl_stage = _module(tmp_path, tiny_processor, data_path, train_split="val", batch_kind="prompt")
    rl_stage.prepare_data()
    rl_stage.setup("test")
    assert sft_stage.datasets["test"].records == rl_stage.datasets["test"].records
    with pytest.raises(SplitMismatchError, match="seed: 0 on disk, 1 asked"):
        _module(tmp_path, tiny_processor, data_path, seed=1).prepare_data()
    with pytest.raises(SplitMismatchError, match="seed: 0 on disk, 1 asked"):
        _module(tmp_path, tiny_processor, data_path, seed=1).setup("fit")


def test_setup_needs_processor_and_prepared_splits(tmp_path, tiny_processor):
    data_path, _ = _write(tmp_path, "jsonl")
    with pytest.raises(RuntimeError, match="processor is None"):
        _module(tmp_path, None, data_path).setup("fit")
    with pytest.raises(FileNotFoundError, match="call prepare_data"):
        _module(tmp_path, tiny_processor, data_path).setup("fit")


def test_no_val_split_means_no_validation_loop(tmp_path, tiny_processor):
    data_path, _ = _write(tmp_path, "jsonl")
    dm = _module(tmp_path, tiny_processor, data_path, split_sizes={"sft": 8, "test": None})
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="val_split 'val' is not one of the splits"):
        dm.setup("validate")


def test_skip_keeps_a_report(tmp_path, tiny_processor):
    rows = pathmmu_rows(tmp_path, 13)
    rows[5]["answer"] = "E"
    dm = _module(tmp_path, tiny_processor, str(write_jsonl(tmp_path / "d.jsonl", rows)), on_invalid="skip")
    dm.prepare_data()
    assert dict(dm.validation_report.skipped) == {"answer_not_in_options": 1}
    assert dm.manifest.counts == {"sft": 6, "val": 2, "test": 4}


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="train_split 'rl' is not one of the splits"):
        VQADataModule(data_path="x.jsonl", split_sizes={"sft": 2, "test": None}, train_split="rl")
    with pytest.raises(ValueError, match="batch_kind"):
        VQADataModule(batch_kind="chat")
    with pytest.raises(ValueError, match=r"unknown fields \['qustion'\]"):
        VQADataModule(field_map={"qustion": "q"})


def test_epoch_seeded_sampler_is_reproducible_per_epoch():
    dataset = RecordDataset(list(range(20)))
    sampler = EpochSeededSampler(dataset, seed=7)
    epoch0 = list(sampler)
    assert list(EpochSeededSampler(dataset, seed=7)) == epoch0  # a fresh (resumed) run sees the same order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(20)) and epoch1 != epoch0
    resumed = EpochSeededSampler(dataset, seed=7)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1


def test_embedded_default_generates_and_splits(tmp_path, tiny_processor):
    dm = VQADataModule(
        split_dir=str(tmp_path / "splits"),
        split_sizes={"sft": 10, "test": None},
        embedded_records=16,
        processor=tiny_processor,
        batch_size=2,
    )
    dm.prepare_data()
    assert sum(dm.manifest.counts.values()) == 16 and dm.manifest.counts["sft"] == 10
    assert dm.manifest.source.startswith(str(tmp_path / "splits" / "embedded"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["records"][0].extra["spec"]


def test_lightning_moves_batches_with_records_and_sets_the_epoch(tmp_path, tiny_processor):
    """A 2-epoch fit of a stub module: batches (records included) reach the step, the sampler is re-seeded."""
    import torch
    from lightning.pytorch import LightningModule, Trainer

    class Stub(LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append([r.id for r in batch["records"]])
            return (self.weight * batch["labels"].ne(-100).sum()).sum()

        def validation_step(self, batch, batch_idx):
            self.seen.append(["validation"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data_path, _ = _write(tmp_path, "jsonl")
    dm = _module(tmp_path, tiny_processor, data_path, split_sizes={"sft": 4, "test": None})
    stub = Stub()
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stub, datamodule=dm)
    assert len(stub.seen) == 4  # 2 epochs x 2 batches, no validation loop (no val split)
    epoch0, epoch1 = sum(stub.seen[:2], []), sum(stub.seen[2:], [])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_built_from_yaml_like_lightning_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(VQADataModule, "data")
    config = parser.parse_string(
        "data:\n"
        "  data_path: /data/omni.jsonl\n"
        "  field_map: {answer: gt_answer, options: [option_A, option_B, option_C, option_D]}\n"
        "  split_sizes: {sft: 30, rl: 10, test: null}\n"
        "  val_split: null\n"
    )
    dm = parser.instantiate_classes(config).data
    assert dm.split_sizes == {"sft": 30, "rl": 10, "test": None}
    assert dm.hparams.field_map["options"] == ["option_A", "option_B", "option_C", "option_D"]
    assert not dm.has_val
