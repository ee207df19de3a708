"""Every shipped YAML parses through the CLI with the command its header gives and derives its outputs
from one run_dir; the demo stages also build model and data, and run a 2-step SFT -> GRPO pipeline
in-process; a fit moves with --run_dir, never silently replaces a finished export, and writes plain
progress lines (and none of the handled warnings) when its output goes to a file."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pathvlm_lightning.cli import ConfigBaseError, expand_bases, main, parse_config
from pathvlm_lightning.grpo.losses.legacy import LegacyLossConfigError

REPO = Path(__file__).resolve().parents[1]
# Plans (test_pipeline_runner) and plan overlays, whose header runs them with `pipeline --config` (test_pipeline_overlay).
PLAN_OVERLAY = re.compile(r"-m pathvlm_lightning pipeline [^\n]*--config ")
CONFIGS = sorted(
    p for p in REPO.glob("configs/**/*.yaml") if p.name != "pipeline.yaml" and not PLAN_OVERLAY.search(p.read_text())
)
DEMO_CONFIGS = [p for p in CONFIGS if p.parent.name == "demo"]
#: Stage files: a base and a run_dir of their own (bases leave run_dir "???"; they and data.yaml are read through stages).
STAGES = [p for p in CONFIGS if yaml.safe_load(p.read_text()).get("run_dir", "???") != "???"]
DEMO_STAGES = [p for p in STAGES if p.parent.name == "demo"]
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


def bases_of(path: Path) -> list[Path]:
    """The files ``path`` names as ``base:`` (resolved against its folder)."""
    base = yaml.safe_load(path.read_text()).get("base") or []
    return [(path.parent / b).resolve() for b in ([base] if isinstance(base, str) else base)]


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_starts_with_the_command_that_runs_it(path: Path) -> None:
    """A stage (or snippet) names its command; a base or data file is reached through the stages naming it."""
    assert path.read_text().startswith("#"), f"{_relative(path)} must start with a comment giving its command"
    is_base = any(path.resolve() in bases_of(other) for other in CONFIGS)
    assert header_commands(path) or is_base, f"{_relative(path)}: no `python -m pathvlm_lightning <cmd> --config {_relative(path)}`"


def _later_configs(command: list[str], path: Path) -> list[str]:
    """The ``--config`` files given after ``path`` in ``command`` (they may override its values)."""
    files = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--config"]
    return files[files.index(_relative(path)) + 1 :]


@pytest.mark.parametrize("path", CONFIGS, ids=_relative)
def test_config_parses_with_its_documented_commands(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing only: paper-scale configs name checkpoints and GPUs this machine does not have."""
    monkeypatch.chdir(REPO)  # the commands are written from the repository root
    own = yaml.safe_load(path.read_text())
    for command in header_commands(path):
        printed = print_config(command, capsys)
        assert "${" not in yaml.safe_dump(printed), command  # every interpolation resolved
        for section in ("model", "data"):
            if "class_path" in (own.get(section) or {}):  # overlays and snippets take it from their base
                assert printed[section]["class_path"] == own[section]["class_path"]
        if _later_configs(command, path):
            continue  # a later overlay may change any value
        overridden = {arg.split("=")[0].removeprefix("--trainer.") for arg in command if arg.startswith("--trainer.")}
        for key, value in (own.get("trainer") or {}).items():
            if not isinstance(value, (dict, list)) and "${" not in str(value) and key not in overridden:
                assert printed["trainer"][key] == value, (key, command)


def _outputs(config: dict) -> dict[str, str]:
    """Every folder or file a stage writes, from its resolved config."""
    trainer = config["trainer"]
    outputs = {"default_root_dir": trainer["default_root_dir"], "predictions": config["model"]["init_args"]["predictions_path"]}
    outputs["tensorboard"] = trainer["logger"]["init_args"]["save_dir"]
    for callback in [*trainer["callbacks"], *(config["model"]["init_args"].get("rewards") or [])]:
        args = callback.get("init_args") or {}
        name = callback["class_path"].rsplit(".", 1)[1]
        if "dirpath" in args:
            outputs[name] = args["dirpath"]
        if (args.get("judge") or {}).get("cache_path"):
            outputs["judge cache"] = args["judge"]["cache_path"]
    return outputs


@pytest.mark.parametrize("path", STAGES, ids=_relative)
def test_every_output_of_a_stage_derives_from_its_run_dir(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = parse_config(["--config", _relative(path)])
    assert config["run_dir"] == yaml.safe_load(path.read_text())["run_dir"]
    assert {"ModelCheckpoint", "ExportCallback", "tensorboard", "predictions"} <= set(_outputs(config))
    for name, where in _outputs(config).items():
        assert Path(where).is_relative_to(config["run_dir"]), (name, where)
    moved = parse_config(["--config", _relative(path), "--run_dir", "/elsewhere/run"])
    for name, where in _outputs(moved).items():
        assert Path(where).is_relative_to("/elsewhere/run"), (name, where)


def test_bases_are_read_first_and_their_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nseed_everything: 2\n")
    (tmp_path / "c.yaml").write_text("base: [sub/b.yaml]\n")
    assert expand_bases(["fit", "--config", str(tmp_path / "c.yaml"), "--x=1"]) == [
        "fit", "--config", str(tmp_path / "sub" / ".." / "a.yaml"), "--config", str(tmp_path / "sub" / "b.yaml"),
        "--config", str(tmp_path / "c.yaml"), "--base", "null", "--x=1",
    ]  # fmt: skip
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigBaseError, match="bases lead back to it"):
        expand_bases(["--config", str(tmp_path / "c.yaml")])
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigBaseError, match=r"d.yaml: base 'missing.yaml' does not exist"):
        expand_bases([f"--config={tmp_path / 'd.yaml'}"])


def test_print_config_fills_in_the_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    printed = print_config(
        ["fit", "--config", "configs/demo/grpo.yaml", "--model.init_args.loss.init_args.beta=0.0"], capsys
    )
    init = printed["model"]["init_args"]
    loss = init["loss"]
    assert loss["class_path"] == "pathvlm_lightning.grpo.losses.GRPOLoss"
    assert loss["init_args"]["beta"] == 0.0  # the command line wins over the YAML's 0.04
    assert loss["init_args"]["epsilon_low"] == 0.2  # GRPOLoss's default, not in the YAML
    assert init["num_iterations"] == 1  # GRPOModule's default
    assert init["backbone"]["init_args"]["freeze_vision"] is True  # Backbone's default


@pytest.mark.parametrize("path", DEMO_STAGES, ids=_relative)
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
    module_name, class_name = parse_config(["--config", str(path)])["model"]["class_path"].rsplit(".", 1)
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
    reference = grpo.model.reference
    assert any(reference is c for c in grpo.trainer.callbacks)  # the module handed it to Lightning
    sft_weights = dict(sft.model.backbone.hf_model.named_parameters())
    reference_weights = dict(reference._reference.hf_model.named_parameters())
    assert sft_weights.keys() == reference_weights.keys()
    for name, value in sft_weights.items():
        torch.testing.assert_close(reference_weights[name], value, rtol=0, atol=0, msg=name)


def test_a_finished_export_is_not_overwritten_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(REPO / "configs/demo/sft.yaml"), "--run_dir", "trial", "--trainer.max_steps=1",
           "--trainer.enable_progress_bar=false", *SMALL_DATA]  # fmt: skip
    main(fit)
    weights = tmp_path / "trial/export/model.safetensors"
    first = weights.read_bytes()
    with pytest.raises(FileExistsError, match=r"trial/export already holds a finished export .*--overwrite_export true"):
        main(fit)
    assert weights.read_bytes() == first
    main([*fit, "--overwrite_export=true", "--model.init_args.optimizer.init_args.lr=0.1"])
    assert weights.read_bytes() != first  # trained again, with another lr, and exported over the old one


def test_a_fit_logging_to_a_file_moves_with_run_dir_and_prints_progress_lines(tmp_path: Path) -> None:
    """stdout to a file, as under nohup: a plain line per step, none of the warnings the CLI silences,
    and nothing written outside run_dir (and the split folder) even though the working folder is empty."""
    cwd, run_dir = tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    command = [
        sys.executable, "-m", "pathvlm_lightning", "fit", "--config", str(REPO / "configs/demo/grpo.yaml"),
        f"--run_dir={run_dir}", "--model.init_args.backbone.init_args.model=embedded-tiny", "--trainer.max_steps=2",
        "--progress.every_n_steps=1", f"--data.init_args.split_dir={tmp_path / 'splits'}", *SMALL_DATA,
        # a checkpoint every step: the path on which Lightning warns about manual optimisation
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1",
        f"--trainer.callbacks.init_args.dirpath={run_dir}/every_step",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=err, env=env, check=False).returncode
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert code == 0, stderr[-3000:]
    # A step either trains (loss and KL logged) or, when no group's rewards vary (likely for this
    # random model), is skipped without an optimizer step and counted instead.
    trained_or_skipped = r"(loss \S+ \| reward \S+ \| accuracy \S+ \| kl \S+|reward \S+ \| accuracy \S+ \| skipped \d)"
    line = r"step {}/2 \| " + trained_or_skipped + r".* \| \d+\.\d\d s/step \| ETA \d+s"
    assert re.search(line.format(1), stdout) and re.search(line.format(2), stdout), stdout[-2000:]
    assert "Epoch 0" in stdout and "Epoch 0/-2" not in stdout  # the bar's last frame, max_epochs -1
    for handled in ("manual optimization", "LeafSpec", "LightningCLI's args parameter"):
        assert handled not in stdout + stderr, handled
    assert sorted(p.name for p in (run_dir / "every_step").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    assert (run_dir / "export/config.json").is_file() and list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert list(cwd.iterdir()) == []
    assert {p.name for p in tmp_path.iterdir()} == {"cwd", "elsewhere", "splits", "out.log", "err.log"}


#: Pixels one image token covers: (vision patch x spatial merge)^2, by the family the model path names.
PIXELS_PER_TOKEN = {"Qwen3-VL": (16 * 2) ** 2, "Qwen2.5-VL": (14 * 2) ** 2}
#: The longest question the paper configs are sized for: 120 words and five options of 90 characters, a
#: generous bound for a multiple-choice question (a longer one makes this test say whether it still fits).
LONGEST_QUESTION = " ".join(["which feature of the lesion best explains the pattern"] * 15)
LONGEST_OPTIONS = {letter: " ".join(["dense fibrotic stroma with scattered atypical glands"] * 2)[:90] for letter in "ABCDE"}
#: Qwen's chat template adds a default system turn ("You are a helpful assistant.") the tiny one lacks.
SYSTEM_TURN_TOKENS = 12
PAPER_RUNS = [[_relative(p)] for p in STAGES if p.parent.name == "configs"] + [
    ["configs/sft.yaml", "configs/qwen3_vl_8b.yaml"],
    ["configs/grpo.yaml", "configs/qwen3_vl_8b.yaml"],
]


def _text_tokens() -> int:
    """Template + longest question + chat wrapping, counted by the embedded tokenizer (1,024 entries: it
    splits English into more tokens than Qwen's 151k vocabulary, so this over-counts)."""
    from pathvlm_lightning.backbone.tiny import build_tiny_processor
    from pathvlm_lightning.data.prompt import build_prompt_messages
    from pathvlm_lightning.data.records import VQARecord

    record = VQARecord(id="long", image="x.png", question=LONGEST_QUESTION, options=LONGEST_OPTIONS, answer="A")
    processor = build_tiny_processor()
    text = processor.apply_chat_template(build_prompt_messages(record), add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "")  # the image's tokens are counted from max_pixels
    return len(processor.tokenizer(text)["input_ids"]) + SYSTEM_TURN_TOKENS


@pytest.mark.parametrize("files", PAPER_RUNS, ids=" + ".join)
def test_every_paper_config_holds_its_largest_image_in_the_prompt(files: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = parse_config([arg for f in files for arg in ("--config", f)])
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    family = "Qwen3-VL" if "Qwen3-VL" in backbone["model"] or "qwen3_vl" in files[-1] else "Qwen2.5-VL"
    image_tokens = backbone["max_pixels"] // PIXELS_PER_TOKEN[family]
    data = config["data"]["init_args"]
    limit = data.get("max_prompt_length") or data.get("max_length")
    assert limit is not None, files
    assert image_tokens + _text_tokens() <= limit, (files, image_tokens, _text_tokens(), limit)
    assert image_tokens >= 512, files  # and still a useful resolution (at least 512 tokens: ~630 x 630 pixels)


def test_a_config_that_sets_the_loss_on_the_module_stops_with_the_new_layout(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text("model:\n  init_args:\n    loss_type: dapo\n    epsilon_high: 0.28\n")
    with pytest.raises(LegacyLossConfigError) as raised:
        expand_bases(["--config", str(tmp_path / "old.yaml")])
    message = str(raised.value)
    assert "old.yaml: model.init_args sets loss_type, epsilon_high" in message
    assert "      class_path: pathvlm_lightning.grpo.losses.GRPOLoss\n      init_args:\n" in message
    assert "        aggregation: dapo\n        epsilon_high: 0.28" in message
    with pytest.raises(LegacyLossConfigError, match=r"(?s)the flag --model.init_args.beta=0.0: .*        beta: 0.0"):
        expand_bases(["--config", "configs/demo/grpo.yaml", "--model.init_args.beta=0.0"])
