"""Every shipped YAML parses through the CLI with the command its header gives; the demo configs
also build model and data, and run a 2-step SFT -> GRPO pipeline in-process."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from pathvlm_lightning.callbacks import ReferenceModelCallback
from pathvlm_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in REPO.glob("configs/**/*.yaml") if p.name != "pipeline.yaml")  # plans: test_pipeline_runner
DEMO_CONFIGS = [p for p in CONFIGS if p.parent.name == "demo"]
# `python -m pathvlm_lightning fit ...`, `torchrun ... -m pathvlm_lightning fit ...` or `pathvlm fit ...`
COMMAND = re.compile(r"(?:-m pathvlm_lightning|\bpathvlm) (fit|validate|test|predict)\b([^\n`]*)")
# The demo on a small embedded set: 28 records generated in well under a second instead of 6,000.
SMALL_DATA = [
    "--data.init_args.embedded_records=28",
    "--data.init_args.split_sizes={sft: 8, rl: 8, val: 4, test: null}",
    "--data.init_args.batch_size=2",
    "--data.init_args.eval_batch_size=2",
]


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def header_commands(path: Path) -> list[list[str]]:
    """The CLI commands in the YAML's leading comment block that name this file, as argument lists
    (lines continued with a backslash are joined)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = "\n".join(header).replace("\\\n", " ")
    commands = [[sub, *shlex.split(rest)] for sub, rest in COMMAND.findall(text)]
    return [c for c in commands if _relative(path) in c]


def print_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """What ``--print_config`` prints for ``args``, parsed: parsing only, nothing instantiated."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_configs_to_check() -> None:
    assert {_relative(p) for p in DEMO_CONFIGS} >= {"configs/demo/sft.yaml", "configs/demo/grpo.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_starts_with_the_command_that_runs_it(path: Path) -> None:
    assert path.read_text().startswith("#"), f"{_relative(path)} must start with a comment giving its command"
    assert header_commands(path), f"{_relative(path)}: no `python -m pathvlm_lightning <cmd> --config {_relative(path)}`"


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_parses_with_its_documented_commands(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing only: paper-scale configs name checkpoints and GPUs this machine does not have."""
    monkeypatch.chdir(REPO)  # the commands are written from the repository root
    own = yaml.safe_load(path.read_text())
    for command in header_commands(path):
        printed = print_config(command, capsys)
        for section in ("model", "data"):
            if section in own:  # a strategy snippet has neither and takes them from the base config
                assert printed[section]["class_path"] == own[section]["class_path"]
        overridden = {arg.split("=")[0].removeprefix("--trainer.") for arg in command if arg.startswith("--trainer.")}
        for key, value in own.get("trainer", {}).items():
            if not isinstance(value, (dict, list)) and key not in overridden:
                assert printed["trainer"][key] == value, (key, command)


def test_print_config_fills_in_the_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    printed = print_config(["fit", "--config", "configs/demo/grpo.yaml", "--model.init_args.beta=0.0"], capsys)
    init = printed["model"]["init_args"]
    assert init["beta"] == 0.0  # the command line wins over the YAML's 0.04
    assert init["epsilon_low"] == 0.2 and init["num_iterations"] == 1  # GRPOModule's defaults, not in the YAML
    assert init["backbone"]["init_args"]["freeze_vision"] is True  # Backbone's default


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=_relative)
def test_demo_config_builds_model_and_data_with_linked_processor(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative run folders land here
    cli = main(
        [
            "--config",
            str(path),
            "--trainer.max_steps=2",
            "--model.init_args.backbone.init_args.model=embedded-tiny",  # earlier stages' exports are not here
            *SMALL_DATA,
        ],
        run=False,
    )
    own = yaml.safe_load(path.read_text())
    module_name, class_name = own["model"]["class_path"].rsplit(".", 1)
    assert isinstance(cli.model, getattr(importlib.import_module(module_name), class_name))
    assert cli.trainer.max_steps == 2
    assert cli.datamodule.processor is cli.model.backbone.processor
    assert cli.datamodule.hparams.batch_kind == cli.model.batch_kind
    assert cli.datamodule.hparams.batch_kind == {"SFTModule": "sft", "GRPOModule": "prompt"}[type(cli.model).__name__]
    assert cli.datamodule.hparams.batch_size == 2


def test_demo_pipeline_runs_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SFT for 2 steps exports to runs/demo/sft/export; GRPO starts from that folder for 2 steps."""
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0"]
    sft = main(["fit", "--config", str(REPO / "configs/demo/sft.yaml"), *quiet, *SMALL_DATA])
    assert sft.trainer.global_step == 2
    export = tmp_path / "runs/demo/sft/export"
    assert (export / "config.json").exists() and (tmp_path / "runs/demo/sft/checkpoints/last.ckpt").exists()

    grpo = main(["fit", "--config", str(REPO / "configs/demo/grpo.yaml"), *quiet, *SMALL_DATA])
    assert grpo.trainer.global_step == 2
    assert grpo.datamodule.hparams.batch_kind == "prompt" and grpo.datamodule.hparams.train_split == "rl"
    assert (tmp_path / "runs/demo/grpo/export/config.json").exists()
    # GRPO started from the SFT result: its frozen reference copy holds the SFT model's final weights
    (reference,) = [c for c in grpo.trainer.callbacks if isinstance(c, ReferenceModelCallback)]
    sft_weights = dict(sft.model.backbone.hf_model.named_parameters())
    reference_weights = dict(reference._reference.hf_model.named_parameters())
    assert sft_weights.keys() == reference_weights.keys()
    for name, value in sft_weights.items():
        torch.testing.assert_close(reference_weights[name], value, rtol=0, atol=0, msg=name)
