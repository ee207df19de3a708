"""Fits that meet a judge which must not cost the run: one that rejects the key (the fit stops,
on every rank, and the key is in no output or file) and one that never answers (each step waits
at most ``judge.step_deadline_s``). The embedded tiny model, 2 prompts x 2 completions a step,
through the CLI against the loopback server, like tests/test_process_integration.py (whose
config helpers these reuse)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pathvlm_lightning.cli import main
from pathvlm_lightning.modules import GRPOModule
from pathvlm_lightning.rewards.judge import JudgeAuthError
from tests.judge_server import JUDGE_KEY_ENV, Scripted, scores_reply
from tests.test_process_integration import REPO, judge_entry, records, scalars, write_config  # noqa: F401 (fixture)


def test_a_judge_that_rejects_the_key_stops_the_fit_and_the_key_leaks_nowhere(
    judge_server, records, tmp_path, monkeypatch, capfd
):
    """A 401 judge that echoes the key, one request at a time, max_auth_failures 6, 4 completions a
    step: step 1 falls back (4 rejected), step 2 reaches 6 and the fit stops with the error, not
    after max_steps 4. The canary key is in no output, log record or file of the run."""
    canary = "sk-CANARY-401-e3b0c44298fc"
    monkeypatch.setenv(JUDGE_KEY_ENV, canary)
    judge_server.responder = lambda body: Scripted(
        status=401, body={"error": {"message": f"Incorrect API key provided: {canary}", "code": "invalid_api_key"}}
    )
    root = tmp_path / "run"
    judge = judge_entry(judge_server, max_auth_failures=6, concurrency=1, cache_path=str(root / "judge.sqlite"))
    config = write_config(root, records, judge, max_steps=4, log_completions_every_n_steps=1)
    log_file = logging.FileHandler(root / "train.log")
    log_file.setLevel(logging.DEBUG)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(log_file)
    root_logger.setLevel(logging.DEBUG)
    steps: list[int] = []
    training_step = GRPOModule.training_step

    def counted(module: GRPOModule, batch: dict, batch_idx: int) -> None:
        steps.append(module.global_step)
        return training_step(module, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", counted)
    try:
        with pytest.raises(JudgeAuthError) as raised:
            main(["fit", "--config", str(config)])
    finally:
        root_logger.removeHandler(log_file)
        root_logger.setLevel(level)
        log_file.close()

    message = str(raised.value)
    assert "rejected the credentials" in message and JUDGE_KEY_ENV in message and "HTTP 401" in message
    assert steps == [0, 1] and len(judge_server.requests) == 6  # stopped in step 2 of 4
    assert all(seen.headers["authorization"] == f"Bearer {canary}" for seen in judge_server.requests)  # it was used
    logged = scalars(root / "tb")
    assert logged["process/fallback/auth"] == [4.0] and logged["process/fallback/http_status"] == [0.0]
    out, err = capfd.readouterr()
    written = {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert b"HTTP 401" in written["train.log"] and any(name.startswith("tb/events") for name in written)
    places = {"stdout": out.encode(), "stderr": err.encode(), "error": message.encode(), **written}
    for name, data in places.items():
        assert b"CANARY" not in data and canary.encode("utf-16-le") not in data, f"the key leaked into {name}"


def test_a_judge_that_never_answers_costs_each_step_at_most_the_deadline(judge_server, judge_key, records,
                                                                         tmp_path):
    """Every request hangs and the request timeout is 60 s: the judge's part of each step must end
    at ``step_deadline_s`` (1 s). What is checked is where the step waits on the judge: the
    requests were cancelled (the server saw every connection closed), every completion fell back as
    ``deadline`` (not ``timeout``, which would take 60 s), and the time ``score`` blocked on the
    judge (``process/step_wait_max``, measured around that wait) is at most the deadline plus a
    0.5 s allowance for the cancellation and thread wake-ups. The rest of the step (generation,
    the reference forward, backward) is the model's time and is not bounded here."""
    judge_server.responder = lambda body: Scripted(hang=True)
    root = tmp_path / "run"
    judge = judge_entry(judge_server, step_deadline_s=1.0, timeout=60.0)
    cli = main(["fit", "--config", str(write_config(root, records, judge))])

    assert cli.trainer.global_step == 2
    logged = scalars(root / "tb")
    assert logged["process/fallback/deadline"] == [4.0, 4.0] and logged["process/fallbacks"] == [4.0, 4.0]
    assert logged["process/fallback/timeout"] == [0.0, 0.0]
    assert logged["process/requests"] == [4.0, 4.0]  # sent, then cancelled: counted and budgeted
    assert logged["reward/process"] == pytest.approx([0.5 * a for a in logged["reward/accuracy"]])
    assert all(0.0 <= waited <= 1.0 + 0.5 for waited in logged["process/step_wait_max"]), logged
    judge_server.close()
    assert judge_server.abandoned == 8


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_rank_is_refused(judge_server, judge_key, records, tmp_path):
    """DDP on 2 CPU processes; only rank 1's key is wrong (401 on its 2 requests, max_auth_failures
    2). Both ranks must stop with the error in the first step, rank 0 saying it came from another
    rank; were the decision per rank, rank 0 would wait in the gradient all-reduce until the
    subprocess timeout below. (The key unset on one rank at setup is decided the same way, with
    the same collective.)"""
    rank_one_key = "sk-wrong-on-rank-1"
    judge_server.accepted_keys = {judge_key}
    judge_server.responder = lambda body: scores_reply(0.6, 1.0)
    root = tmp_path / "run"
    path = write_config(root, records, judge_entry(judge_server, max_auth_failures=2))
    config = yaml.safe_load(path.read_text())
    trainer = config["trainer"]
    trainer["devices"] = 2
    trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                           "init_args": {"process_group_backend": "gloo"}}
    rank_key = {"class_path": "tests.judge_server.KeyOnRank", "init_args": {"rank": 1, "value": rank_one_key}}
    trainer["callbacks"].append(rank_key)  # its setup runs before the judge's: the module's parts come after the trainer's
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pathvlm_lightning", "fit", "--config", str(path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "on another rank" in done.stderr, done.stderr[-3000:]
    assert JUDGE_KEY_ENV in done.stderr and judge_key not in done.stdout + done.stderr
    assert not (root / "checkpoints" / "step=1.ckpt").exists()  # stopped in the first step, before a save
    assert sum(seen.headers["authorization"] == f"Bearer {rank_one_key}" for seen in judge_server.requests) == 2
