"""Sharded checkpoint folders appear only when complete, a crash at any moment of a save leaves a
complete one findable, and the pipeline resumes from the newest complete checkpoint, file or folder.

The folder-level tests build what each moment of a save leaves on disk (a real save writes the same
entries; see ``checkpoint_sharded``'s docstring). The slow test runs a stage of a small plan through
``PipelineRunner`` on 2 CPU processes (gloo, FSDP2 through ``ModelParallelStrategy``), has a rank
SIGKILL itself inside a sharded save (tests/sharded_kill_worker.py), twice, runs the stage again, and
compares its exported weights with an uninterrupted run's, bit for bit: float32 on CPU, the same
seeds and batches, and every state a step depends on (weights, AdamW moments, scheduler, data
position) restored exactly from the shards and ``meta.pt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from safetensors.torch import load_file

from pathvlm_lightning.checkpoint_sharded import (
    MARKER,
    AtomicFSDPStrategy,
    AtomicModelParallelStrategy,
    completed_step,
    mark_complete,
    publish_folder,
    remove_folder,
    tidy_folder,
    use_atomic_folders,
)
from pathvlm_lightning.cli import main
from pathvlm_lightning.pipeline import PipelineRunner, StageFailed, load_plan
from pathvlm_lightning.pipeline.resume import newest_complete_checkpoint
from pathvlm_lightning.pipeline.runner import subprocess_launcher
from pathvlm_lightning.redact import run_to_log

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "sharded_kill_worker.py"


def _dead_pid() -> int:
    """The id of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def _shards(folder: Path, step: int, complete: bool = True) -> Path:
    """A folder with what a sharded save writes (two shards, .metadata, meta.pt), marked if ``complete``."""
    folder.mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        (folder / name).write_bytes(bytes([step]) * 100)
    torch.save({"global_step": step}, folder / "meta.pt")
    if complete:
        mark_complete(folder, {"global_step": step, "epoch": 0, "world_size": 2})
    return folder


def _step_of(folder: Path) -> int:
    return torch.load(folder / "meta.pt")["global_step"]


# ---- what counts as complete --------------------------------------------------------------------
def test_a_folder_is_complete_only_with_its_marker_and_every_file_it_lists(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "a.ckpt", 7)
    assert completed_step(folder) == 7
    assert json.loads((folder / MARKER).read_text())["files"]["__1_0.distcp"] == 100
    assert completed_step(_shards(tmp_path / "b.ckpt", 7, complete=False)) is None
    (folder / "__1_0.distcp").write_bytes(b"cut")  # a shard overwritten in place (what Lightning alone does)
    assert completed_step(folder) is None
    (folder / "__1_0.distcp").unlink()
    assert completed_step(folder) is None


def test_a_partial_folder_is_never_chosen_even_when_it_is_last_ckpt_and_newer(tmp_path: Path) -> None:
    _shards(tmp_path / "epoch=0-step=4.ckpt", 4)
    _shards(tmp_path / "last.ckpt", 6, complete=False)  # written in place by a killed save
    choice = newest_complete_checkpoint(tmp_path)
    assert (choice.path, choice.step) == (tmp_path / "epoch=0-step=4.ckpt", 4)
    assert [p.name for p, _ in choice.skipped] == ["last.ckpt"]
    assert MARKER in choice.skipped[0][1]


def test_the_highest_step_wins_over_name_and_modification_time_files_and_folders_alike(tmp_path: Path) -> None:
    torch.save({"global_step": 9}, tmp_path / "epoch=0-step=9.ckpt")
    _shards(tmp_path / "last.ckpt", 5)
    torch.save({"global_step": 3}, tmp_path / "epoch=0-step=30.ckpt")  # a name that says more than it holds
    (tmp_path / "cut.ckpt").write_bytes(open(tmp_path / "epoch=0-step=9.ckpt", "rb").read()[:200])
    os.utime(tmp_path / "epoch=0-step=9.ckpt", (1, 1))  # oldest by mtime, newest by step
    choice = newest_complete_checkpoint(tmp_path)
    assert (choice.path.name, choice.step) == ("epoch=0-step=9.ckpt", 9)
    assert [p.name for p, _ in choice.skipped] == ["cut.ckpt"]

    _shards(tmp_path / "epoch=1-step=12.ckpt", 12)
    assert newest_complete_checkpoint(tmp_path).path.name == "epoch=1-step=12.ckpt"
    assert newest_complete_checkpoint(tmp_path / "missing").path is None


# ---- every moment of replacing last.ckpt --------------------------------------------------------
def test_each_moment_of_a_save_leaves_a_complete_folder_findable(tmp_path: Path) -> None:
    pid = _dead_pid()
    last = _shards(tmp_path / "last.ckpt", 1)
    new = _shards(tmp_path / f".last.ckpt.tmp-{pid}-0123abcd", 2, complete=False)
    assert newest_complete_checkpoint(tmp_path).step == 1  # shards being written
    mark_complete(new, {"global_step": 2})
    assert newest_complete_checkpoint(tmp_path).path == new  # complete, not yet renamed
    aside = tmp_path / f".last.ckpt.old-{pid}-4567abcd"
    os.replace(last, aside)
    assert newest_complete_checkpoint(tmp_path).path == new  # between the two renames
    os.replace(new, last)
    assert newest_complete_checkpoint(tmp_path).path == last  # in place, the old one not yet removed
    (aside / MARKER).unlink()
    (aside / "__0_0.distcp").unlink()  # the old one partly removed
    assert newest_complete_checkpoint(tmp_path).path == last
    assert _step_of(last) == 2


def test_publishing_replaces_the_old_folder_and_leaves_nothing_behind(tmp_path: Path) -> None:
    _shards(tmp_path / "last.ckpt", 1)
    publish_folder(_shards(tmp_path / ".last.ckpt.tmp-1-0123abcd", 2), tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert completed_step(tmp_path / "last.ckpt") == 2


def test_the_next_save_cleans_stale_temporaries_and_restores_a_folder_killed_between_renames(tmp_path: Path) -> None:
    dead = _dead_pid()
    _shards(tmp_path / "last.ckpt", 4)
    stale = _shards(tmp_path / f".last.ckpt.tmp-{dead}-0123abcd", 5, complete=False)  # killed mid-write
    _shards(tmp_path / f".epoch=0-step=2.ckpt.old-{dead}-0123abcd", 2)  # killed between the renames...
    newest = _shards(tmp_path / f".epoch=0-step=2.ckpt.tmp-{dead}-4567abcd", 3)  # ...of this one
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = _shards(tmp_path / f".last.ckpt.tmp-{sleeper.pid}-89abcdef", 6, complete=False)
        restored, removed = tidy_folder(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert restored == [tmp_path / "epoch=0-step=2.ckpt"]
    assert _step_of(tmp_path / "epoch=0-step=2.ckpt") == 3
    assert sorted(p.name for p in removed) == sorted([stale.name, f".epoch=0-step=2.ckpt.old-{dead}-0123abcd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", "epoch=0-step=2.ckpt", running.name])
    assert newest.name not in os.listdir(tmp_path)


def test_removing_a_folder_takes_its_marker_first_and_leaves_no_link_target_behind(tmp_path: Path) -> None:
    kept = _shards(tmp_path / "epoch=0-step=1.ckpt", 1)
    (tmp_path / "last.ckpt").symlink_to(kept.name)  # save_last="link"
    remove_folder(tmp_path / "last.ckpt")
    assert completed_step(kept) == 1  # the link went, not what it points to
    remove_folder(kept)
    assert list(tmp_path.iterdir()) == []


# ---- installation ---------------------------------------------------------------------------------
def test_lightning_s_own_sharding_strategies_are_switched_and_others_left_alone() -> None:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    use_atomic_folders(SimpleNamespace(strategy=strategy))
    assert type(strategy) is AtomicModelParallelStrategy and strategy._writes_folders()
    fsdp = FSDPStrategy(state_dict_type="sharded")
    use_atomic_folders(SimpleNamespace(strategy=fsdp))
    assert type(fsdp) is AtomicFSDPStrategy and fsdp._writes_folders()
    assert not AtomicFSDPStrategy(state_dict_type="full")._writes_folders()

    class Mine(ModelParallelStrategy):
        pass

    mine = Mine()
    use_atomic_folders(SimpleNamespace(strategy=mine))
    assert type(mine) is Mine


def test_the_cli_with_the_fsdp2_config_writes_folders_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["--config", str(REPO / "configs/demo/sft.yaml"), "--config", str(REPO / "configs/strategies/fsdp2_cpu.yaml")],
        run=False,
    )
    assert type(cli.trainer.strategy) is AtomicModelParallelStrategy


# ---- a rank killed inside a sharded save, then the pipeline stage run again -----------------------
STEPS = 3


def _stage_config(root: Path, run_dir: Path) -> Path:
    """An overlay of the shipped SFT stage on the settings of configs/strategies/fsdp2_cpu.yaml: 3 steps
    on a small embedded set, a sharded ``last.ckpt`` after every step, a progress line per step."""
    strategy = yaml.safe_load((REPO / "configs/strategies/fsdp2_cpu.yaml").read_text())["trainer"]
    config = {
        "base": str(REPO / "configs/demo/sft.yaml"),
        "run_dir": str(run_dir),
        "trainer": {
            **strategy,
            "max_steps": STEPS,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "logger": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": "${run_dir}/checkpoints", "save_last": True, "save_top_k": 0,
                               "every_n_train_steps": 1}},
                {"class_path": "pathvlm_lightning.callbacks.ExportCallback", "init_args": {"dirpath": "${run_dir}/export"}},
            ],
        },
        "progress": {"every_n_steps": 1},
        "data": {"init_args": {"embedded_records": 28, "split_sizes": {"sft": 8, "rl": 8, "val": 4, "test": None},
                               "batch_size": 2, "eval_batch_size": 8}},
    }  # fmt: skip
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _uninterrupted(root: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The exported weights and the fit log of the stage run once without a kill (the CLI, as a user would)."""
    config = _stage_config(root, root / "uninterrupted")
    code = run_to_log([sys.executable, "-m", "pathvlm_lightning", "fit", "--config", str(config)], root / "fit.log")
    log = (root / "fit.log").read_text()
    assert code == 0, log[-3000:]
    return load_file(root / "uninterrupted/export/model.safetensors"), log


def _progress(log: str) -> list[str]:
    """The ``step N/M | loss ...`` lines of a fit log, without their timings."""
    return [" | ".join(line.split(" | ")[:2]) for line in log.splitlines() if line.startswith("step ")]


@pytest.mark.slow
def test_ranks_killed_in_sharded_saves_resume_in_the_pipeline_and_end_as_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two kills in a row, then a clean run of the stage: rank 0 dies between the renames of the step-2
    save (the complete step-2 folder is only findable under its hidden name), then the run resumed
    from it has rank 1 die with its step-3 shard written (the step-2 folder, restored into place by
    that save, is the newest complete one), then the stage finishes. 5 launches in all."""
    monkeypatch.chdir(tmp_path)
    config = _stage_config(tmp_path, tmp_path / "run")
    plan = {
        "out_dir": str(tmp_path / "report"),
        "stages": {"s": {"config": str(config), "description": "SFT 3 steps, FSDP2 on 2 processes"}},
        "comparisons": [],
        "eval_overrides": ["--trainer.devices=1", "--trainer.strategy=auto"],
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    checkpoints = tmp_path / "run/checkpoints"
    fit_log = tmp_path / "report/s/fit.log"
    echoed: list[str] = []

    def run_stage(kill: str | None) -> None:
        """The stage through PipelineRunner; with ``kill`` (``rank:save:moment``) the CLI runs through
        the worker, which arms that kill, and the stage must fail."""
        if kill is None:
            return PipelineRunner(load_plan("plan.yaml"), launcher=subprocess_launcher, echo=echoed.append).run()

        def through_worker(args: list[str], log_file: Path) -> int:
            return run_to_log([sys.executable, str(WORKER), *args], log_file)

        monkeypatch.setenv("PATHVLM_KILL", kill)
        with pytest.raises(StageFailed, match="stage 's' step 'fit' failed"):
            PipelineRunner(load_plan("plan.yaml"), launcher=through_worker, echo=echoed.append).run()
        monkeypatch.delenv("PATHVLM_KILL")

    run_stage(kill="0:2:between_renames")
    aside, hidden = sorted(checkpoints.iterdir())  # the step-1 folder set aside, the step-2 one not yet in place
    assert aside.name.startswith(".last.ckpt.old-") and hidden.name.startswith(".last.ckpt.tmp-")
    assert (completed_step(aside), completed_step(hidden)) == (1, 2)

    run_stage(kill="1:1:shard_written")
    assert f"[s] fit: resuming from {hidden}" in echoed
    assert f"Restored all states from the checkpoint at {hidden}" in fit_log.read_text()
    partial, last = sorted(checkpoints.iterdir())  # step 2 restored into place; step 3's shards cut short
    assert last.name == "last.ckpt" and completed_step(last) == 2
    assert partial.name.startswith(".last.ckpt.tmp-") and completed_step(partial) is None

    run_stage(kill=None)
    assert f"[s] fit: resuming from {last}" in echoed
    log = fit_log.read_text()
    assert f"Restored all states from the checkpoint at {last}" in log
    reference_weights, reference_log = _uninterrupted(tmp_path)
    reference_steps = _progress(reference_log)
    assert len(reference_steps) == STEPS and _progress(log) == reference_steps[2:]  # step 3 only, at the same loss
    weights = load_file(tmp_path / "run/export/model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(weights[name], value), name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # what the kills left is cleaned
    assert completed_step(last) == STEPS
    assert (tmp_path / "report/s/predictions_test.jsonl").is_file()
