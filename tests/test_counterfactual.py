"""Counterfactual evaluation (issue 20, item 1): the variants' inputs, and a scripted model whose
answers under each variant are worked out by hand, run through the real datamodule and ``test``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.data import counterfactual
from pathvlm_lightning.data.collate import PromptCollator
from pathvlm_lightning.data.counterfactual import (
    COUNTERFACTUALS,
    CounterfactualCollator,
    counterfactual_ids,
    swap_partners,
)
from pathvlm_lightning.data.datamodule import VQADataModule
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.eval import counterfactual as eval_counterfactual
from pathvlm_lightning.eval.scoring import score_prediction
from pathvlm_lightning.modules.evaluation import GenerationEvaluation

COLOURS = {"red": (200, 50, 50), "green": (50, 200, 50), "blue": (50, 50, 200), "grey": (120, 120, 120)}
OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "grey"}


def test_doctests():
    import doctest

    assert doctest.testmod(counterfactual).failed == 0
    assert doctest.testmod(eval_counterfactual).failed == 0


@pytest.fixture(scope="module")
def processor():
    return Backbone("embedded-tiny", seed=0).processor


@pytest.fixture
def colour_set(tmp_path: Path) -> tuple[Path, list[VQARecord]]:
    return write_colour_set(tmp_path)


def write_colour_set(tmp_path: Path) -> tuple[Path, list[VQARecord]]:
    """Four one-colour tiles, each asked its colour; q<i> shows the i-th colour, the answer is its letter."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
        row = {"id": f"q{i}", "image": f"{name}.png", "question": "Which colour is the tile?", "options": OPTIONS,
               "answer": "ABCD"[i], "subset": "colour", "modality": "test"}
        rows.append(row)
        records.append(VQARecord(**{**row, "image": str(tmp_path / row["image"])}))
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "records.jsonl", records


def _seen_colours(prompt_inputs: dict, processor) -> list[str | None]:
    """The colour a 'model' sees in each record's image, read back from the processor's patches
    (un-normalised per channel); None when the prompt has no image."""
    if "pixel_values" not in prompt_inputs:
        return [None] * len(prompt_inputs["input_ids"])
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    seen, start = [], 0
    for t, h, w in prompt_inputs["image_grid_thw"].tolist():
        patches = prompt_inputs["pixel_values"][start : start + t * h * w]  # [P, 3 * T * 14 * 14]
        start += t * h * w
        rgb = (patches.reshape(len(patches), 3, -1).mean(dim=(0, 2)) * std + mean) * 255
        seen.append(min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb.tolist()))))
    return seen


class ScriptedReader(GenerationEvaluation, pl.LightningModule):
    """Answers the option whose text is the colour it sees; with no image, option A; for q2, always
    letter C whatever it sees (a shortcut: right in the original order, where C is blue)."""

    def __init__(self, processor) -> None:
        super().__init__()
        self.processor = processor
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self._init_evaluation(8, None)

    def answer_batch(self, batch: dict) -> list:
        out = []
        for record, colour in zip(batch["records"], _seen_colours(batch["prompt_inputs"], self.processor)):
            letter = "A" if colour is None else next(k for k, v in record.options.items() if v == colour)
            if record.id == "q2":
                letter = "C"
            out.append(score_prediction(record, f"<think>I see it.</think><answer>{letter}) {record.options[letter]}</answer>", 6))
        return out


def test_variant_inputs(colour_set, processor):
    _, records = colour_set
    batch = CounterfactualCollator(PromptCollator(processor), records, COUNTERFACTUALS, seed=0)(records)
    assert set(batch["counterfactuals"]) == set(COUNTERFACTUALS)
    plain = batch["prompt_inputs"]
    blank = batch["counterfactuals"]["blank"]["prompt_inputs"]
    no_image = batch["counterfactuals"]["no_image"]["prompt_inputs"]
    # blank: the same image tokens, each record's image one grey at its mean: (200+50+50)/3 = 100, ...
    assert torch.equal(blank["input_ids"], plain["input_ids"])
    assert _seen_colours(plain, processor) == ["red", "green", "blue", "grey"]
    assert _seen_colours(blank, processor) == ["grey"] * 4  # 100, 100, 100 and 120: all nearest to grey
    # no image: no pixels and no image tokens (16 patches merged 2x2 = 4 tokens + the 2 vision markers)
    assert "pixel_values" not in no_image
    assert plain["input_ids"].shape[1] - no_image["input_ids"].shape[1] == 6
    # swapped: another record's image, of another answer; shuffled: same texts, another order
    swapped = batch["counterfactuals"]["swapped"]["records"]
    partners = swap_partners(records, seed=0)
    assert [r.image for r in swapped] == [partners[r.id] for r in records]
    assert all(Path(r.image).stem != o.answer_text for r, o in zip(swapped, records))
    for original, moved in zip(records, batch["counterfactuals"]["shuffled"]["records"]):
        assert moved.answer_text == original.answer_text and moved.options != original.options
        assert sorted(moved.options.values()) == sorted(original.options.values())


def test_swapped_needs_another_answer(colour_set):
    _, records = colour_set
    same = [VQARecord(**{**r.__dict__, "answer": "A"}) for r in records]
    with pytest.raises(ValueError, match="record 'q0' has no other record with a different answer"):
        swap_partners(same, seed=0)


def test_scripted_model_scores_by_hand(colour_set, processor, tmp_path):
    records_path, _ = colour_set
    datamodule = VQADataModule(
        data_path=str(records_path), split_dir=str(tmp_path / "splits"), split_sizes={"test": None},
        train_split="test", val_split=None, test_split="test", eval_batch_size=3, processor=processor,
        counterfactuals=list(COUNTERFACTUALS),
    )
    module = ScriptedReader(processor)
    module.predictions_path = str(tmp_path / "out" / "predictions_test.jsonl")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    _check_by_hand(metrics, tmp_path / "out")


EXPECTED = {"blank": 0.5, "swapped": 0.25, "no_image": 0.5, "shuffled": 0.75}


def _check_by_hand(metrics: dict, out: Path) -> None:
    # original: all right (q2's shortcut C is blue). blank: every tile looks grey -> only q3 (grey) and
    # q2 (C) right. swapped: the other image has another colour -> only q2 right. no image: option A
    # (red) -> q0 and q2 right. shuffled: right by colour, but q2's C is no longer blue.
    assert metrics["test/accuracy"] == 1.0
    for name, accuracy in EXPECTED.items():
        assert metrics[f"test/{name}/accuracy"] == pytest.approx(accuracy)
        assert metrics[f"test/{name}/format_compliance"] == 1.0
        lines = (out / f"predictions_test.{name}.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == ["q0", "q1", "q2", "q3"]
    assert metrics["test/image_reliance"] == pytest.approx(1.0 - 0.25)
    assert metrics["test/option_consistency"] == pytest.approx(0.75)  # q2's chosen text changed
    assert (out / "predictions_test.jsonl").is_file()


#: Per variant, the questions the scripted reader answers right (worked out in ``_check_by_hand``).
RIGHT = {"blank": {"q2", "q3"}, "swapped": {"q2"}, "no_image": {"q0", "q2"}, "shuffled": {"q0", "q1", "q3"}}


def test_a_sample_of_items_is_asked_and_scored_alone(colour_set, processor, tmp_path):
    """``counterfactual_items=2``: every variant asks the same 2 seeded questions, the others are
    answered only in the original, and each column (accuracy included) is on those 2."""
    records_path, records = colour_set
    sampled = counterfactual_ids(records, 2, seed=5)
    assert len(sampled) == 2 and sampled == counterfactual_ids(records[::-1], 2, seed=5)
    batch = CounterfactualCollator(PromptCollator(processor), records, COUNTERFACTUALS, seed=5, items=2)(records)
    for name in COUNTERFACTUALS:
        assert [r.id for r in batch["counterfactuals"][name]["records"]] == sorted(sampled)
    unsampled = [r for r in records if r.id not in sampled]
    assert CounterfactualCollator(PromptCollator(processor), records, COUNTERFACTUALS, 5, 2)(unsampled)[
        "counterfactuals"] == {}
    datamodule = VQADataModule(
        data_path=str(records_path), split_dir=str(tmp_path / "splits"), split_sizes={"test": None},
        train_split="test", val_split=None, test_split="test", eval_batch_size=3, processor=processor,
        counterfactuals=list(COUNTERFACTUALS), counterfactual_seed=5, counterfactual_items=2,
    )
    module = ScriptedReader(processor)
    module.predictions_path = str(tmp_path / "out" / "predictions_test.jsonl")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    assert metrics["test/count"] == 4 and metrics["test/accuracy"] == 1.0  # the originals: all 4
    for name, right in RIGHT.items():
        assert metrics[f"test/{name}/accuracy"] == pytest.approx(len(right & sampled) / 2), name
        lines = (tmp_path / "out" / f"predictions_test.{name}.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(sampled)
    assert metrics["test/image_reliance"] == pytest.approx(1.0 - len(RIGHT["swapped"] & sampled) / 2)
    with pytest.raises(ValueError, match="counterfactual_items must be at least 1"):
        VQADataModule(data_path="x.jsonl", counterfactual_items=0)


@pytest.mark.slow
def test_two_processes_gather_every_variant(tmp_path):
    """Under DDP each rank answers half the questions (one a batch); the gathered scores are the same."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(repo / "tests" / "counterfactual_dist_worker.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    _check_by_hand(json.loads((tmp_path / "metrics.json").read_text()), tmp_path)


def test_unknown_counterfactual_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"counterfactuals must be distinct names among .*got \['grey'\]"):
        VQADataModule(data_path="x.jsonl", counterfactuals=["grey"])
