"""A kill at any moment of a checkpoint save leaves the previous ``last.ckpt`` loadable, and resume
continues; a damaged checkpoint is named, with the other checkpoints of its folder.

The kill tests run tests/checkpoint_kill_worker.py, which SIGKILLs itself inside its second save at
an exact point of the writer, with ``TMPDIR`` on another filesystem than the checkpoints (/dev/shm
is tmpfs here; the case that used to leave a 0-byte ``last.ckpt``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathvlm_lightning.checkpoint_io import AtomicCheckpointIO, UnreadableCheckpointError, remove_stale_temporaries
from pathvlm_lightning.cli import main
from tests.checkpoint_kill_worker import MOMENTS, fit

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "checkpoint_kill_worker.py"
OTHER_FILESYSTEM = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".last.ckpt.*.partial"))


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_kill_during_a_save_leaves_a_loadable_last_ckpt_and_resume_continues(tmp_path: Path, moment: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if OTHER_FILESYSTEM:
        assert os.stat(OTHER_FILESYSTEM).st_dev != os.stat(tmp_path).st_dev
        env["TMPDIR"] = OTHER_FILESYSTEM
    command = [sys.executable, str(WORKER), str(tmp_path), moment]
    killed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    folder = tmp_path / "ckpt"
    last = folder / "last.ckpt"
    renamed = moment == "after_rename"  # the new file was already in place when the kill came
    assert torch.load(last, weights_only=False)["global_step"] == (2 if renamed else 1)
    assert len(_temporaries(folder)) == (0 if renamed else 1)  # a killed write leaves its temporary

    trainer = fit(tmp_path, max_steps=4, ckpt_path=last)
    assert trainer.global_step == 4
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert _temporaries(folder) == []  # removed by the first save of the resumed run
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("kept_bytes", [0, 1000])
def test_resume_from_a_cut_checkpoint_names_it_and_the_previous_one(tmp_path: Path, kept_bytes: int) -> None:
    fit(tmp_path, max_steps=2)
    folder = tmp_path / "ckpt"
    last = folder / "last.ckpt"
    previous = folder / "epoch=0-step=2.ckpt"
    previous.write_bytes(last.read_bytes())
    last.write_bytes(last.read_bytes()[:kept_bytes])  # what a crash during a copy or a plain write leaves

    with pytest.raises(UnreadableCheckpointError) as error:
        fit(tmp_path, max_steps=3, ckpt_path=last)
    message = str(error.value)
    assert f"checkpoint {last} cannot be loaded ({kept_bytes} bytes;" in message
    assert f"Resume with --ckpt_path {previous}" in message
    assert fit(tmp_path, max_steps=3, ckpt_path=previous).global_step == 3


def test_a_cut_checkpoint_alone_in_its_folder_says_there_is_no_other(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"")
    with pytest.raises(UnreadableCheckpointError, match=r"\(0 bytes; .*No other checkpoint in "):
        AtomicCheckpointIO().load_checkpoint(last)


def test_stale_temporaries_are_removed_but_a_running_writer_s_are_kept(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        stale = tmp_path / f".last.ckpt.{int(dead.stdout)}.0123abcd.partial"
        running = tmp_path / f".last.ckpt.{sleeper.pid}.0123abcd.partial"
        unrelated = tmp_path / ".last.ckpt.notes"
        for path in (stale, running, unrelated):
            path.write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path) == [stale]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, unrelated.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_cli_writes_checkpoints_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "--config",
            str(REPO / "configs/demo/sft.yaml"),
            "--model.init_args.backbone.init_args.model=embedded-tiny",
            "--data.init_args.embedded_records=28",
            "--data.init_args.split_sizes={sft: 8, rl: 8, val: 4, test: null}",
        ],
        run=False,
    )
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
