"""API keys never reach the CLI's output or a pipeline stage's log: a canary key pasted where the
variable NAME goes, and another in the variable itself, are searched for in everything printed and
in every file written."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from pathvlm_lightning.__main__ import run
from pathvlm_lightning.cli import main
from pathvlm_lightning.pipeline.runner import subprocess_launcher
from pathvlm_lightning.redact import MASK, RedactingStream, redact, run_to_log, secrets_from

REPO = Path(__file__).resolve().parents[1]
PASTED = "sk-proj-CANARYpasted0123456789abcdefXYZ"  # pasted into judge.api_key_env
IN_ENV = "canary-in-the-environment-0123456789"  # the real variable's value: not key-shaped at all
JUDGE_ARGS = [
    "--config",
    str(REPO / "configs/demo/grpo_process.yaml"),
    "--model.init_args.backbone.init_args.model=embedded-tiny",
    "--model.init_args.rewards.class_path",
    "pathvlm_lightning.callbacks.ProcessReward",
]


def _files_containing(root: Path, needles: list[str]) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and any(n.encode() in p.read_bytes() for n in needles)]


def test_a_key_pasted_into_api_key_env_reaches_neither_the_output_nor_the_stage_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", IN_ENV)
    log_file = tmp_path / "stage" / "fit.log"
    args = ["fit", *JUDGE_ARGS, "--model.init_args.rewards.init_args.judge.api_key_env", PASTED]
    assert subprocess_launcher(args, log_file) == 1
    log = log_file.read_text()
    assert "api_key_env must be the NAME of an environment variable" in log  # the error still says what is wrong
    assert log.count(MASK) >= 3  # jsonargparse quotes the pasted value in three places
    assert _files_containing(tmp_path, [PASTED, IN_ENV, "CANARY"]) == []


def test_print_config_masks_a_pasted_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("stdout", "stderr"):  # run() wraps the streams for the process's life; undo that here
        monkeypatch.setattr(sys, name, getattr(sys, name))
    with pytest.raises(SystemExit):
        run(["fit", *JUDGE_ARGS, "--model.init_args.rewards.init_args.judge.api_key_env", PASTED, "--print_config"])
    sys.stdout.flush()
    sys.stderr.flush()
    captured = capsys.readouterr()
    assert f"api_key_env: {MASK}" in captured.out
    assert "CANARY" not in captured.out + captured.err
    assert list(tmp_path.rglob("*")) == []


def test_the_stage_log_masks_what_any_child_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log writer itself filters, whatever the child is (here one that prints the keys raw)."""
    monkeypatch.setenv("JUDGE_API_KEY", IN_ENV)
    script = f"import sys; print('key {PASTED} env {IN_ENV}'); print('Bearer abcdefghijklmnop', file=sys.stderr)"
    code = run_to_log([sys.executable, "-c", script], tmp_path / "step.log")
    assert code == 0
    assert (tmp_path / "step.log").read_text().splitlines() == [f"key {MASK} env {MASK}", f"Bearer {MASK}"]


def test_secrets_come_from_credential_variables_and_api_key_env_arguments() -> None:
    environ = {"OPENAI_API_KEY": IN_ENV, "MY_JUDGE": "judge-secret-1", "HOME": "/root", "HF_TOKEN": "short"}
    assert secrets_from([], environ) == {IN_ENV}  # "short" is too short to be masked safely
    assert secrets_from(["--a.judge.api_key_env", "MY_JUDGE"], environ) == {IN_ENV, "judge-secret-1"}
    assert secrets_from([f"--a.judge.api_key_env={PASTED}"], environ) == {IN_ENV, PASTED}
    assert secrets_from(["--a.judge.api_key_env", "Zx81kQ0pLm4vB7nW2rTy"], environ) == {IN_ENV, "Zx81kQ0pLm4vB7nW2rTy"}
    assert secrets_from(["--a.judge.api_key_env", "MISSING_NAME"], environ) == {IN_ENV}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sk-abcdefghijklmnop1234 and sk-proj-Ab_cd-EF0123456789xyz", f"{MASK} and {MASK}"),
        ("task-abcdefghijklmnop1234", "task-abcdefghijklmnop1234"),  # "sk-" inside a word is not a key
        ("hf_abcdefghijklmnopqrstuv", MASK),
        ("Authorization: Bearer eyJhbGciOi.J9-eyJzdWIi==", f"Authorization: Bearer {MASK}"),
        ("model sk-1 is small", "model sk-1 is small"),  # too short to be a key
    ],
)
def test_key_shaped_strings_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_key_written_in_pieces_is_masked_whole() -> None:
    target = io.StringIO()
    stream = RedactingStream(target, ["secret-value-42"])
    for piece in ("key: sk-abcdefgh", "ijklmnop1234 and secret-", "value-42\nnext line ", "tail"):
        stream.write(piece)
    assert target.getvalue() == f"key: {MASK} and {MASK}\n"  # the unfinished line waits for flush
    stream.flush()
    assert target.getvalue() == f"key: {MASK} and {MASK}\nnext line tail"


def test_a_variable_named_in_a_yaml_is_masked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``api_key_env: JUDGE_VAR`` in a config file (no KEY in the name, nothing on the command line):
    the CLI adds the variable's value once the config is parsed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUDGE_VAR", IN_ENV)
    overlay = tmp_path / "judge.yaml"
    overlay.write_text(
        "model:\n  init_args:\n    rewards+:\n      - class_path: pathvlm_lightning.callbacks.ProcessReward\n"
        "        init_args:\n          name: judge\n          judge:\n            api_key_env: JUDGE_VAR\n"
    )
    target = io.StringIO()
    monkeypatch.setattr(sys, "stderr", RedactingStream(target, secrets_from([])))
    main(["--config", JUDGE_ARGS[1], "--config", str(overlay), JUDGE_ARGS[2]], run=False)
    print(f"the judge key is {IN_ENV}", file=sys.stderr)
    sys.stderr.flush()
    assert target.getvalue().endswith(f"the judge key is {MASK}\n")
