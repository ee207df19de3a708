"""Stage 3 end to end: GRPO fits through the CLI with the process reward, judged over real HTTP.

Every fit is the embedded tiny model on 2 RL questions (one batch of 2 prompts x 2 completions =
4 completions a step, 8 new tokens each) for 2 steps, against the scripted loopback server of
tests/judge_server.py, with everything written under the test's ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pathvlm_lightning.callbacks import ProcessReward, ReferenceModelCallback, RubricProcessReward
from pathvlm_lightning.cli import PathVLMCLI, expand_bases, main
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.synthetic import generate_dataset
from pathvlm_lightning.eval import judge_consistency
from pathvlm_lightning.rewards.judge import FAULTS, JudgeClient, JudgeConfig, JudgeItem
from pathvlm_lightning.stage_config import read_stage_yaml
from tests.judge_server import JUDGE_KEY_ENV, JudgeServer, Scripted, scores_reply

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "grpo_process.yaml"
COMPLETIONS_PER_STEP = 4  # batch of 2 prompts x G = 2


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic questions; the split below trains on 2 of them and tests on the other 14."""
    return generate_dataset(tmp_path_factory.mktemp("records"), 16, seed=0)


def judge_entry(server: JudgeServer, **judge: Any) -> dict:
    """The ProcessReward callback entry of a config, pointed at the loopback server."""
    settings = {"base_url": server.base_url, "api_key_env": JUDGE_KEY_ENV, "backoff_base": 0.0, **judge}
    return {"class_path": "pathvlm_lightning.callbacks.ProcessReward", "init_args": {"judge": settings}}


def write_config(root: Path, records: Path, process: dict, max_steps: int = 2, **module: Any) -> Path:
    """A stage-3 config like configs/demo/grpo_process.yaml, shrunk to seconds, ``process`` its last
    reward; returns its path."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root), "name": "tb", "version": ""},
            },
            "callbacks": [
                {
                    # Step checkpoints: resuming from an epoch-end one, Lightning 2.6 skips an epoch
                    # of the sampler's order (set_epoch 1, then 2), so the batches would differ.
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "filename": "{step}", "save_top_k": -1,
                                  "every_n_train_steps": 1, "save_last": True},
                },
            ],
        },
        "model": {
            "class_path": "pathvlm_lightning.modules.GRPOModule",
            "init_args": {
                "backbone": {
                    "class_path": "pathvlm_lightning.backbone.Backbone",
                    "init_args": {"model": "embedded-tiny"},
                },
                "rollout": {
                    "class_path": "pathvlm_lightning.callbacks.RolloutCallback",
                    "init_args": {"num_generations": 2, "max_new_tokens": 8},
                },
                "rewards": [
                    {"class_path": "pathvlm_lightning.callbacks.FormatReward"},
                    {"class_path": "pathvlm_lightning.callbacks.AccuracyReward"},
                    process,
                ],
                "reference": {"class_path": "pathvlm_lightning.callbacks.ReferenceModelCallback"},
                "log_completions_every_n_steps": 0,
                "eval_max_new_tokens": 8,
                "predictions_path": str(root / "predictions_test.jsonl"),
                **module,
            },
        },
        "data": {
            "class_path": "pathvlm_lightning.data.VQADataModule",
            "init_args": {
                "data_path": str(records),
                "split_dir": str(root / "splits"),
                "split_sizes": {"rl": 2, "test": None},
                "train_split": "rl",
                "val_split": None,
                "test_split": "test",
                "batch_size": 2,
                "eval_batch_size": 16,
            },
        },
    }
    path = root / "stage3.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every TensorBoard scalar under ``log_dir``: tag -> values in step order."""
    (events,) = sorted(log_dir.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0}).Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def request_text(body: dict) -> str:
    """The text part of a judge request (rubric inputs: question, reasoning, answers)."""
    return body["messages"][1]["content"][1]["text"]


def bodies(server: JudgeServer) -> list[str]:
    return [json.dumps(seen.body, sort_keys=True) for seen in server.requests]


# ---- the judge client on its own ------------------------------------------------------------------


def test_identical_completions_in_one_batch_are_judged_once(judge_server, judge_key, tmp_path):
    image = tmp_path / "tile.png"
    Image.new("RGB", (8, 8), (200, 100, 150)).save(image)
    record = VQARecord(id="q", image=str(image), question="Size?", options={"A": "Large", "B": "Small"}, answer="A")
    judge_server.responder = lambda body: scores_reply(0.6, 1.0)
    client = JudgeClient(JudgeConfig(base_url=judge_server.base_url, api_key_env=JUDGE_KEY_ENV))
    same, other = "<think>x</think><answer>A) Large</answer>", "<think>y</think><answer>A) Large</answer>"
    results = client.score_batch([JudgeItem.of(record, text) for text in (same, other, same, same)])
    assert len(judge_server.requests) == 2  # `same` once, `other` once
    assert [r.source for r in results] == ["judge", "judge", "cache", "cache"]
    assert [r.scores.reward for r in results] == pytest.approx([0.8] * 4)
    assert [r.requests for r in results] == [1, 1, 0, 0]  # counters add up to what was sent


# ---- GRPO fits through the CLI -------------------------------------------------------------------


def test_a_failing_judge_never_stops_the_fit(judge_server, judge_key, records, tmp_path):
    """Every request fails: a 500 or a dropped connection, chosen by the request's text so both
    attempts of one completion fail alike. Each completion falls back to 0.5 if right, 0 if wrong."""

    def fails(body: dict) -> Scripted:
        return Scripted(drop=True) if zlib.crc32(request_text(body).encode()) % 2 else Scripted(status=500)

    judge_server.responder = fails
    root = tmp_path / "run"
    cli = main(["fit", "--config", str(write_config(root, records, judge_entry(judge_server, max_retries=1)))])

    assert cli.trainer.global_step == 2 and (root / "checkpoints" / "last.ckpt").exists()
    logged = scalars(root / "tb")
    texts = set(request_text(seen.body) for seen in judge_server.requests)
    dropped = sum(zlib.crc32(text.encode()) % 2 for text in texts)
    assert len(texts) == 2 * COMPLETIONS_PER_STEP  # distinct completions over 2 steps
    assert len(judge_server.requests) == 2 * len(texts)  # one retry each
    assert logged["process/requests"] == [8.0, 8.0] and logged["process/retries"] == [4.0, 4.0]
    assert logged["process/fallbacks"] == [4.0, 4.0]
    assert sum(logged["process/fallback/connection"]) == dropped
    assert sum(logged["process/fallback/http_status"]) == len(texts) - dropped
    for fault in set(FAULTS) - {"connection", "http_status"}:
        assert logged[f"process/fallback/{fault}"] == [0.0, 0.0]
    # Fallback scores: 0.5 for a correct answer, 0 otherwise, so the mean is half the accuracy.
    assert logged["reward/process"] == pytest.approx([0.5 * a for a in logged["reward/accuracy"]])
    assert logged["process/integrity"] == logged["process/knowledge"] == logged["reward/process"]


class ReferenceWindow:
    """Wraps the reference forward to see the judge's requests from inside it.

    The server holds every reply until the reference forward of that step has returned, and the
    forward starts once all requests of its step have reached the server (this removes the race on
    arrival, nothing else). Had ``begin`` waited for the judge, the forward could not start before
    the replies, so it would find none in flight.
    """

    def __init__(self, server: JudgeServer) -> None:
        self.server = server
        self.gate = threading.Event()
        self.in_flight: list[tuple[int, int]] = []  # requests in flight at the start and end of each forward
        self.held: list[bool] = []  # per reply: released by the gate (not by the safety timeout)
        self._asked_before = 0

    def respond(self, body: dict) -> Scripted:
        self.held.append(self.gate.wait(timeout=20.0))
        return scores_reply(0.6, 1.0)

    def wrap(self, forward: Any) -> Any:
        def reference_logprobs(callback: ReferenceModelCallback, slices: Any) -> torch.Tensor:
            distinct = len({  # (prompt, completion tokens): one judge request each
                ((part.rows.start + j) // part.group_size, tuple(ids[mask.bool()].tolist()))
                for part in slices
                for j, (ids, mask) in enumerate(zip(part.completion_ids, part.completion_mask))
            })
            deadline = time.monotonic() + 10.0
            while len(self.server.requests) < self._asked_before + distinct and time.monotonic() < deadline:
                time.sleep(0.005)
            start = self.server.in_flight
            try:
                return forward(callback, slices)
            finally:
                self.in_flight.append((start, self.server.in_flight))
                self._asked_before = len(self.server.requests)
                gate, self.gate = self.gate, threading.Event()
                gate.set()

        return reference_logprobs


@pytest.fixture
def demo_overrides(records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Run the demo config from ``tmp_path`` (its relative run folders land there) on the tiny model
    and a tiny split; the rollout is shrunk in a copy of the YAML."""
    config = read_stage_yaml(DEMO)  # resolved: with its base's parts
    rollout = config["model"]["init_args"]["rollout"]
    assert rollout["class_path"].endswith("RolloutCallback")
    rollout["init_args"].update(num_generations=2, max_new_tokens=8)
    shrunk = tmp_path / "grpo_process.yaml"
    shrunk.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    yield [
        "fit", "--config", str(shrunk), "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.backbone.init_args.model", "embedded-tiny",
        "--model.init_args.log_completions_every_n_steps", "0",
        "--data.init_args.data_path", str(records), "--data.init_args.batch_size", "2",
        "--data.init_args.split_sizes", '{"rl": 2, "val": 2, "test": null}',
    ]


@pytest.mark.parametrize("stage3, stage2", [("demo/grpo_process", "demo/grpo"), ("grpo_process", "grpo")])
def test_stage_3_config_starts_from_the_stage_2_export(stage3: str, stage2: str):
    third = read_stage_yaml(REPO / "configs" / f"{stage3}.yaml")
    second = read_stage_yaml(REPO / "configs" / f"{stage2}.yaml")
    exported = [c for c in second["trainer"]["callbacks"] if c["class_path"].endswith("ExportCallback")]
    assert third["model"]["init_args"]["backbone"]["init_args"]["model"] == exported[0]["init_args"]["dirpath"]
    assert third["data"]["init_args"] == second["data"]["init_args"]  # the same split, the same RL questions
    assert third["seed_everything"] == second["seed_everything"]
    rewards = [c["class_path"].rsplit(".", 1)[1] for c in third["model"]["init_args"]["rewards"]]
    # The process reward comes last: the demo's one-flag swap to the LLM judge replaces the last entry.
    assert rewards == ["FormatReward", "AccuracyReward", "RubricProcessReward" if stage3.startswith("demo") else "ProcessReward"]


def test_demo_config_runs_offline_with_the_rubric(demo_overrides, tmp_path):
    cli = main(demo_overrides)
    assert [type(r).__name__ for r in cli.model.rewards] == ["AccuracyReward", "FormatReward", "RubricProcessReward"]
    assert any(cli.model.rewards[-1] is c for c in cli.trainer.callbacks)  # handed to Lightning by the module
    logged = scalars(tmp_path / "runs" / "demo" / "grpo_process" / "tb")
    assert cli.trainer.global_step == 2 and len(logged["reward/process"]) == 2
    for step in range(2):  # the reward is the mean of the two rubric scores
        mean = (logged["process/integrity"][step] + logged["process/knowledge"][step]) / 2
        assert logged["reward/process"][step] == pytest.approx(mean)
    assert (tmp_path / "runs" / "demo" / "grpo_process" / "export" / "config.json").exists()


def test_demo_config_with_base_url_runs_the_llm_judge_beside_the_reference(
    demo_overrides, judge_server, judge_key, tmp_path, monkeypatch
):
    window = ReferenceWindow(judge_server)
    judge_server.responder = window.respond
    forward = window.wrap(ReferenceModelCallback.reference_logprobs)
    monkeypatch.setattr(ReferenceModelCallback, "reference_logprobs", forward)
    cli = main([
        *demo_overrides,
        # The swap given in the config's opening comment, pointed at the loopback server.
        "--model.init_args.rewards.class_path", "pathvlm_lightning.callbacks.ProcessReward",
        "--model.init_args.rewards.init_args.judge.cache_path", "runs/demo/grpo_process/judge.sqlite",
        "--model.init_args.rewards.init_args.judge.base_url", judge_server.base_url,
        "--model.init_args.rewards.init_args.judge.api_key_env", JUDGE_KEY_ENV,
    ])
    assert [type(r).__name__ for r in cli.model.rewards if hasattr(r, "judge")] == ["ProcessReward"]

    # The judge's requests were in flight for the whole reference forward of both steps.
    assert window.in_flight == [(4, 4), (4, 4)]
    assert len(window.held) == 8 and all(window.held)
    assert len(set(bodies(judge_server))) == 8  # 4 distinct completions a step, each asked once

    logged = scalars(tmp_path / "runs" / "demo" / "grpo_process" / "tb")
    # Every completion judged 0.6 / 1.0 -> reward 0.8; 4 requests of 100 + 10 tokens a step.
    expected = {
        "reward/process": 0.8, "process/integrity": 0.6, "process/knowledge": 1.0, "process/requests": 4.0,
        "process/prompt_tokens": 400.0, "process/completion_tokens": 40.0, "process/fallbacks": 0.0,
        "process/cache_hits": 0.0, "process/retries": 0.0,
        **{f"process/fallback/{fault}": 0.0 for fault in FAULTS},
    }
    for tag, value in expected.items():
        assert logged[tag] == pytest.approx([value, value]), tag
    assert all(latency > 0 for latency in logged["process/latency_mean"])
    assert all(high >= mean for high, mean in zip(logged["process/latency_max"], logged["process/latency_mean"]))
    totals = [f + a + 0.8 for f, a in zip(logged["reward/format"], logged["reward/accuracy"])]
    assert logged["reward/total_mean"] == pytest.approx(totals)


@pytest.mark.slow
def test_a_resumed_run_asks_nothing_twice(judge_server, judge_key, records, tmp_path):
    """Resume from the step-1 checkpoint and redo step 2: same weights, same sampling state, so the
    same completions, all answered from the cache file the first run filled."""
    judge_server.responder = lambda body: scores_reply(0.6, 1.0)
    cache = str(tmp_path / "judge.sqlite")
    first = tmp_path / "first"
    main(["fit", "--config", str(write_config(first, records, judge_entry(judge_server, cache_path=cache)))])
    assert len(judge_server.requests) == 2 * COMPLETIONS_PER_STEP

    resumed = tmp_path / "resumed"
    config = write_config(resumed, records, judge_entry(judge_server, cache_path=cache))
    main(["fit", "--config", str(config), "--ckpt_path", str(first / "checkpoints" / "step=1.ckpt")])

    assert len(judge_server.requests) == 2 * COMPLETIONS_PER_STEP  # nothing new was sent
    assert len(set(bodies(judge_server))) == len(judge_server.requests)  # and nothing was sent twice
    logged = scalars(resumed / "tb")
    assert logged["process/cache_hits"] == [4.0] and logged["process/requests"] == [0.0]
    assert logged["reward/process"] == pytest.approx([0.8])  # the cached scores
    first_logged = scalars(first / "tb")
    assert logged["reward/total_mean"] == pytest.approx(first_logged["reward/total_mean"][1:])


@pytest.mark.slow
def test_the_api_key_is_in_no_file_a_run_writes(judge_server, records, tmp_path, monkeypatch):
    """A full fit and test (checkpoints, hparams.yaml, the CLI's config.yaml, TensorBoard events
    with sample completions, a DEBUG log of everything, the judge cache, predictions, the split),
    with a key the server even echoes back in a 401: no file under the run folder holds it."""
    canary = "sk-CANARY-7c41d9e0aa2b"
    monkeypatch.setenv(JUDGE_KEY_ENV, canary)
    judge_server.push(Scripted(status=401, body={"error": {"message": f"Incorrect API key provided: {canary}"}}))
    judge_server.responder = lambda body: scores_reply(0.6, 1.0)
    root = tmp_path / "run"
    judge = judge_entry(judge_server, cache_path=str(root / "judge.sqlite"))
    config = write_config(root, records, judge, log_completions_every_n_steps=1)
    log_file = logging.FileHandler(root / "train.log")
    log_file.setLevel(logging.DEBUG)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(log_file)
    root_logger.setLevel(logging.DEBUG)
    try:
        main(["fit", "--config", str(config)])
        main(["test", "--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt")])
    finally:
        root_logger.removeHandler(log_file)
        root_logger.setLevel(level)
        log_file.close()

    assert all(seen.headers["authorization"] == f"Bearer {canary}" for seen in judge_server.requests)  # it was used
    written = {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}
    for name in ("tb/config.yaml", "tb/hparams.yaml", "checkpoints/last.ckpt", "judge.sqlite", "train.log",
                 "predictions_test.jsonl"):
        assert name in written, f"the run did not write {name}: the check would look at nothing"
    assert any(name.startswith("tb/events.out.tfevents") for name in written)
    assert b"judge: HTTP 401" in written["train.log"] and JUDGE_KEY_ENV.encode() in written["tb/config.yaml"]
    for name, data in written.items():
        assert b"CANARY" not in data and canary.encode("utf-16-le") not in data, f"the key leaked into {name}"

    # The evaluation's predictions carry the image path: the consistency command reads them as they are.
    judge_server.requests.clear()
    judge_server.responder = lambda body: scores_reply(*[(zlib.crc32(request_text(body).encode()) % 5) / 4] * 2)
    report = judge_consistency.main([
        "--predictions", str(root / "predictions_test.jsonl"), "--repeats", "2",
        "--judge.base_url", judge_server.base_url, "--judge.api_key_env", JUDGE_KEY_ENV,
        "--master_keys", "0",  # 2 x 14 chains only; the master-key battery has tests of its own
    ])
    assert report["completions"] == 14 and report["fallbacks"] == [0, 0]
    assert report["spearman"] == {"1-2": pytest.approx(1.0)}  # the script gives each chain one score
    assert len(judge_server.requests) == 28


class ParseOnly(PathVLMCLI):
    """Parses and type-checks a config without building anything (no 7B folder, no GPUs here)."""

    def instantiate_classes(self) -> None:
        return None


def test_paper_scale_config_parses_with_the_gpt4o_judge():
    cli = ParseOnly(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=expand_bases(["--config", str(REPO / "configs" / "grpo_process.yaml")]), run=False,
        parser_kwargs={"parser_mode": "omegaconf+"},
    )
    config = cli.config
    rollout, process = config.model.init_args.rollout, config.model.init_args.rewards[-1]
    assert (rollout.init_args.num_generations, rollout.init_args.max_new_tokens) == (4, 1024)
    assert process.class_path == "pathvlm_lightning.callbacks.ProcessReward"
    judge = process.init_args.judge
    assert (judge.model, judge.api_key_env) == ("gpt-4o", "OPENAI_API_KEY")
    assert Path(judge.cache_path).parent == Path(config.trainer.default_root_dir)  # kept with the run
    assert config.trainer.strategy.init_args.data_parallel_size == config.trainer.devices == 4
    ProcessReward(judge=JudgeConfig(**vars(judge)))  # the judge settings pass the callback's checks
    # float32 master weights, bf16 compute (issue 17): the paper configs never update bf16 weights
    assert (config.model.init_args.backbone.init_args.dtype, config.trainer.precision) == ("float32", "bf16-mixed")


def test_help_shows_judge_field_docs(capsys):
    set_parsing_settings(docstring_parse_attribute_docstrings=False)  # as in a fresh process: main turns it on
    with pytest.raises(SystemExit):
        main([
            "fit", "--trainer.callbacks.help", "pathvlm_lightning.callbacks.ProcessReward",
            "--trainer.callbacks.judge.help", "pathvlm_lightning.rewards.judge.JudgeConfig",
        ])
    assert "Requests in flight at once." in capsys.readouterr().out  # JudgeConfig.concurrency's docstring
