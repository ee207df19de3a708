"""``infer`` and ``export``: a stage checkpoint answers like its exported folder, which plain
transformers loads; the model card is small, factual and free of secrets; bad input exits 2.

The stage is a real one: the tiny backbone with LoRA, SFT through the CLI for 40 steps on a single
question until it has memorised its demonstration (``<think>Pink stroma.</think><answer>A)
H&E</answer>``), so the answer printed can be checked word for word.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from pathvlm_lightning.backbone import load_processor
from pathvlm_lightning.cli import main as cli_main
from pathvlm_lightning.commands import dispatch, export, infer
from pathvlm_lightning.commands.checkpoint import load_stage_module
from pathvlm_lightning.commands.model_card import model_card, stage_metrics
from pathvlm_lightning.data.collate import PromptCollator
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.stage_config import read_stage_yaml

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Which stain is this?"
OPTIONS = {"A": "H&E", "B": "IHC"}
MEMORISED = "<think>Pink stroma.</think><answer>A) H&E</answer>"

STAGE_YAML = """\
# Stage "sft-tiny": the tiny backbone with LoRA memorises one question (test fixture).
# Run:  python -m pathvlm_lightning fit --config {root}/stage.yaml
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 40
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {root}/run
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, save_top_k: 0}}
model:
  class_path: pathvlm_lightning.modules.SFTModule
  init_args:
    backbone:
      class_path: pathvlm_lightning.backbone.Backbone
      init_args:
        model: embedded-tiny
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 0.01, weight_decay: 0.0}}
data:
  class_path: pathvlm_lightning.data.VQADataModule
  init_args:
    data_path: {root}/data/records.jsonl
    split_dir: {root}/splits
    split_sizes: {{train: 1, test: null}}
    train_split: train
    val_split: null
    batch_size: 1
"""


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Config, last checkpoint and training image of the memorising SFT stage."""
    root = tmp_path_factory.mktemp("stage")
    (root / "data").mkdir()
    rows = []
    for i, colour in enumerate([(230, 150, 190), (120, 140, 220)]):
        Image.new("RGB", (56, 56), colour).save(root / "data" / f"tile{i}.png")
        rows.append(dict(id=f"r{i}", image=f"tile{i}.png", question=QUESTION, options=OPTIONS, answer="A",
                         explanation="Pink stroma."))  # fmt: skip
    (root / "data" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = root / "stage.yaml"
    config.write_text(STAGE_YAML.format(root=root))
    fit = cli_main(["fit", "--config", str(config)])
    assert fit.trainer.global_step == 40
    (train,) = [json.loads(line) for line in (root / "splits" / "train.jsonl").read_text().splitlines()]
    checkpoint = root / "checkpoints" / "last.ckpt"
    return SimpleNamespace(root=root, config=config, checkpoint=checkpoint, image=train["image"])


def _question_args(image: str) -> list[str]:
    return ["--image", image, "--question", QUESTION, "--options", "A) H&E", "B) IHC"]


def _checkpoint_args(stage: SimpleNamespace) -> list[str]:
    return ["--checkpoint", str(stage.checkpoint), "--config", str(stage.config)]


def test_infer_from_checkpoint_prints_reasoning_and_answer(stage, capsys):
    code = infer.main([*_checkpoint_args(stage), *_question_args(stage.image)])
    assert code == 0
    assert capsys.readouterr().out == "Reasoning: Pink stroma.\nAnswer: A) H&E\n"


REPORT = {
    "settings": {"num_resamples": 100, "level": 0.95, "seed": 0},
    "stages": {
        "sft-tiny": {"count": 12, "accuracy": 0.75, "ci_low": 0.5, "ci_high": 0.9166, "format_compliance": 1.0,
                     "avg_output_tokens": 13.0, "accuracy_by_subset": {}, "accuracy_by_modality": {}, "note": ""},
    },  # fmt: skip
    "ood": {
        "sft-tiny": {
            "by_modality": {"synthetic-CT": {"count": 3, "accuracy": 1 / 3}},
            "mean_accuracy": 1 / 3,
            "count": 3,
        }
    },
}


def test_export_loads_in_transformers_and_answers_like_the_checkpoint(stage, tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    out = tmp_path / "export"
    argv = ["--config", str(stage.config), "--checkpoint", str(stage.checkpoint), "--out", str(out)]
    assert export.main([*argv, "--report", str(tmp_path / "report.json"), "--stage", "sft-tiny"]) == 0
    assert f"exported stage 'sft-tiny' to {out}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}

    hf_model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in name for name in hf_model.state_dict())  # merged, not adapters
    processor = load_processor(out)
    record = VQARecord(id="q", image=stage.image, question=QUESTION, options=OPTIONS, answer="A")
    inputs = PromptCollator(processor)([record])["prompt_inputs"]
    # Same weights: the checkpoint's module and the exported folder agree on the prompt's logits ...
    module = load_stage_module(stage.config, stage.checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(**inputs).logits, module.backbone(**inputs).logits, atol=1e-4, rtol=1e-4)
        end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = hf_model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=end, pad_token_id=end)
    # ... and plain transformers' greedy completion is the one infer prints from the checkpoint.
    completion = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert completion == MEMORISED
    assert infer.main(["--model", str(out), "--json", *_question_args(stage.image)]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert infer.main([*_checkpoint_args(stage), "--json", *_question_args(stage.image)]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert from_export == from_checkpoint
    assert (from_export["completion"], from_export["letter"], from_export["text"]) == (MEMORISED, "A", "H&E")
    assert (from_export["reasoning"], from_export["format_ok"]) == ("Pink stroma.", True)
    assert from_export["truncated"] is False

    card = (out / "README.md").read_text()
    assert card.startswith("# sft-tiny\n\nStage \"sft-tiny\": the tiny backbone with LoRA memorises one question")
    assert "| test | 12 | 75.0 | [50.0, 91.7] | 100.0 | 13.0 |" in card
    assert "| synthetic-CT | 3 | 33.3 |" in card
    assert "- Base model: `embedded-tiny`" in card and "| LoRA | r=8, alpha=16 |" in card and "| lr | 0.01 |" in card
    assert "split sizes: train 1, test rest" in card and "trained on split: `train`" in card


def test_the_readme_infer_example_runs_as_written(tmp_path, capsys, monkeypatch):
    """The README's first ``infer`` command, word for word but for the export folder (the demo's
    is made by examples/demo.sh): its image ships with the repository, and it answers."""
    from pathvlm_lightning.backbone import Backbone

    readme = (REPO / "README.md").read_text()
    start = readme.index("python -m pathvlm_lightning infer --model ")
    lines = []
    for line in readme[start:].splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(lines))
    assert words[:4] == ["python", "-m", "pathvlm_lightning", "infer"] and words[words.index("--image") + 1] == (
        "examples/tile.png"
    )
    folder = words[words.index("--model") + 1]
    assert folder == "runs/demo/grpo/export"
    Backbone(model="embedded-tiny").export(tmp_path / folder)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)  # the relative paths as written
    assert dispatch(words[3:] + ["--json", "--max-new-tokens", "4"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["output_tokens"] == 4 and answer["truncated"] is True


def test_model_card_of_a_grpo_stage_lists_its_settings_and_no_secrets():
    config = read_stage_yaml(REPO / "configs" / "demo" / "grpo_process.yaml")  # resolved: its base's parts too
    config["model"]["init_args"]["rewards"].append(
        {
            "class_path": "pathvlm_lightning.callbacks.ProcessReward",
            "init_args": {
                "weight": 0.5,
                "judge": {"model": "gpt-4o", "api_key": "sk-LEAK-123", "api_key_env": "MY_KEY"},
            },
        }
    )
    config["model"]["init_args"]["token"] = "hf_LEAK_456"
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.0001
    metrics = stage_metrics(REPORT, "grpo_process")
    card = model_card("grpo_process", "Stage 3.", "runs/demo/grpo/export", config, metrics)
    for leaked in ("sk-LEAK-123", "hf_LEAK_456", "MY_KEY", "api_key"):
        assert leaked not in card
    for row in ("| module | GRPOModule |", "| lr | 0.0001 |", "| loss | GRPOLoss |", "| aggregation | grpo |", "| beta | 0.04 |",
                "| num_generations | 8 |", "| max_new_tokens | 64 |"):  # fmt: skip
        assert row in card
    assert "| rewards | FormatReward (weight 1.0), AccuracyReward (weight 1.0), RubricProcessReward (weight 1.0), ProcessReward (weight 0.5) |" in card
    assert "| reference | frozen start |" in card
    assert "No evaluation report was given for this stage." in card  # the report has no such stage
    assert len(card.splitlines()) < 50


def test_sampling_is_seeded_and_greedy_is_the_default(tmp_path, capsys):
    image = tmp_path / "tile.png"
    Image.new("RGB", (56, 56), (200, 120, 160)).save(image)

    def completion(*extra: str) -> str:
        assert infer.main(["--model", "embedded-tiny", "--json", "--max-new-tokens", "12", *extra,
                           *_question_args(str(image))]) == 0  # fmt: skip
        return json.loads(capsys.readouterr().out)["completion"]

    assert completion() == completion()
    sampled = completion("--sample", "--seed", "3")
    assert completion("--sample", "--seed", "3") == sampled
    assert any(completion("--sample", "--seed", str(seed)) != sampled for seed in (4, 5))


# Each case changes a good command line {"--model": ..., "--image": ..., ..., "--options": [...]}.
BAD_INPUT = [
    ("missing image", {"--image": "{tmp}/absent.png"}, "--image: image file '{tmp}/absent.png' does not exist"),
    ("one option", {"--options": ["A) H&E"]}, "--options: give at least 2 options, got 1"),
    ("bad option line", {"--options": ["A) H&E", "B IHC"]}, "--options: option line 'B IHC' is not of the form"),
    ("letters out of order", {"--options": ["B) H&E", "A) IHC"]}, "--options: options must be lettered A, B in order"),
    ("letter twice", {"--options": ["A) H&E", "A) IHC"]}, "--options: option A appears twice"),
    ("empty option", {"--options": ["A) H&E", "B) "]}, "--options: option(s) ['B'] have no text"),
    ("temperature, greedy", {"--temperature": "0.7"}, "--temperature only apply with --sample"),
    ("no model", {"--model": None}, "give either --model DIR or --checkpoint X.ckpt --config stage.yaml"),
    ("checkpoint alone", {"--model": None, "--checkpoint": "{tmp}/tile.png"}, "--checkpoint needs --config"),
]


@pytest.mark.parametrize("change, message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_infer_rejects_bad_input_with_status_2(tmp_path, capsys, change, message):
    Image.new("RGB", (56, 56), (200, 120, 160)).save(tmp_path / "tile.png")
    good = {"--model": "embedded-tiny", "--image": "{tmp}/tile.png", "--question": QUESTION,
            "--options": ["A) H&E", "B) IHC"]}  # fmt: skip
    argv: list[str] = []
    for flag, value in {**good, **change}.items():
        values = value if isinstance(value, list) else [] if value is None else [value]
        argv += [flag, *(v.format(tmp=tmp_path) for v in values)] if values else []
    with pytest.raises(SystemExit) as exit_info:
        infer.main(argv)  # fails in the argument checks, before any model is built
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_python_dash_m_dispatches_commands_and_leaves_the_rest_to_lightning(tmp_path):
    assert dispatch(["fit", "--config", "x.yaml"]) is None and dispatch([]) is None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pathvlm_lightning"]
    infer_run = subprocess.run(
        [*command, "infer", "--model", "embedded-tiny", *_question_args(str(tmp_path / "no.png"))],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert infer_run.returncode == 2
    assert "does not exist" in infer_run.stderr and "usage: python -m pathvlm_lightning infer" in infer_run.stderr
    export_run = subprocess.run(
        [*command, "export", "--config", "absent.yaml", "--checkpoint", "x.ckpt", "--out", "o"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert export_run.returncode == 2 and "--config: 'absent.yaml' does not exist" in export_run.stderr
