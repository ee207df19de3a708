"""GRPOModule's parts (rollout, rewards, reference, loss): every cross-check's message, the whole objective
in --print_config and the saved hyperparameters (no secret), a config or flag in the layout before the
parts went into the module stopping with the new layout, and a checkpoint of that layout resuming."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pathvlm_lightning.backbone import Backbone, LoraOptions
from pathvlm_lightning.callbacks import AccuracyReward, FormatReward, ReferenceModelCallback, RolloutCallback
from pathvlm_lightning.cli import expand_bases, main
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.legacy_parts import LegacyPartsConfigError, part_kind
from pathvlm_lightning.modules import GRPOModule
from tests.fit_support import LengthReward
from tests.test_cli_configs import REPO, SMALL_DATA
from tests.test_resume import assert_resume_matches, fit

OLD_LAYOUT = REPO / "tests" / "fixtures" / "old_layout" / "checkpoint_meta.pt"


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone("embedded-tiny", seed=0)


@pytest.fixture(scope="module")
def lora_backbone() -> Backbone:
    return Backbone("embedded-tiny", seed=0, lora=LoraOptions(r=4))


# ---- one check, one message each ----------------------------------------------------------------
def _parts(**changes: Any) -> dict[str, Any]:
    parts = dict(
        rollout=RolloutCallback(num_generations=4, max_new_tokens=8),
        rewards=[FormatReward(), AccuracyReward()],
        reference=ReferenceModelCallback(),
        loss=GRPOLoss(beta=0.04),
    )
    return {**parts, **changes}


def _bound_dr_grpo() -> GRPOLoss:
    return GRPOLoss(aggregation="dr_grpo", beta=0.0).bind(max_completion_length=64)  # bound by another module


CASES = {
    "rollout-type": (dict(rollout=FormatReward()), r"rollout must be a RolloutCallback .* got FormatReward"),
    "no-rewards": (dict(rewards=[]), r"rewards must be a non-empty list of reward callbacks"),
    "reward-type": (dict(rewards=[FormatReward(), RolloutCallback()]), r"must be a RewardCallback subclass; got \['RolloutCallback'\]"),
    "duplicate-names": (dict(rewards=[FormatReward(), AccuracyReward(name="format")]), r"share the name\(s\) \['format'\]"),
    "reference-type": (dict(reference=FormatReward()), r"reference must be a ReferenceModelCallback or null, got FormatReward"),
    "loss-type": (dict(loss=torch.nn.MSELoss()), r"loss must be a PolicyLoss .* got MSELoss"),
    "scale-rewards": (dict(scale_rewards="rank"), r"scale_rewards must be one of \('group', 'batch', 'none'\), got 'rank'"),
    "num-iterations": (dict(num_iterations=0), r"num_iterations must be an integer >= 1, got 0"),
    "grad-norm": (dict(max_grad_norm=0.0), r"max_grad_norm must be > 0 or null, got 0.0"),
    "micro-batch": (dict(micro_batch_size=0), r"micro_batch_size counts completions .* got 0"),
    "micro-batch-vs-G": (dict(micro_batch_size=6), r"micro_batch_size=6 must be a multiple of the rollout's num_generations=4, .*\(e.g. 4 or 8\)"),
    "beta-without-reference": (dict(reference=None), r"(?s)beta=0.04 weighs a KL term .*model.init_args.reference is null.*class_path: pathvlm_lightning.callbacks.ReferenceModelCallback"),
    "reference-without-beta": (dict(loss=GRPOLoss(beta=0.0)), r"beta is 0, so no reference model is used, .* Set model.init_args.reference: null"),
    "dr_grpo-length": (dict(reference=None, loss=_bound_dr_grpo()), r"dr_grpo loss divides by max_completion_length=64, .* max_new_tokens=8"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_setting_stops_the_module_with_its_message(backbone: Backbone, case: str) -> None:
    changes, message = dict(CASES[case][0]), CASES[case][1]
    module_args = {k: changes.pop(k) for k in list(changes) if k not in ("rollout", "rewards", "reference", "loss")}
    with pytest.raises(ValueError, match=message):
        GRPOModule(backbone, **_parts(**changes), **module_args)


def test_lora_refuses_a_synced_reference(lora_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match=r"sync_every_n_steps=2 moves a separate reference copy .* with LoRA"):
        GRPOModule(lora_backbone, **_parts(reference=ReferenceModelCallback(sync_every_n_steps=2)))
    GRPOModule(lora_backbone, **_parts())  # without sync: the base model with adapters disabled


def test_settings_flow_from_the_module_to_its_parts(backbone: Backbone) -> None:
    parts = _parts(loss=GRPOLoss(aggregation="dr_grpo", beta=0.04))
    module = GRPOModule(backbone, **parts, micro_batch_size=8)
    assert module.loss.max_completion_length == 8  # the rollout's max_new_tokens
    assert parts["reference"].policy is backbone  # the slices (micro_batch_size) come with each call
    assert module.configure_callbacks() == [parts["rollout"], *module.rewards, parts["reference"]]
    assert [r.name for r in module.rewards] == ["accuracy", "format"]  # by name


# ---- the whole objective in the saved hyperparameters and --print_config -------------------------
def test_hyperparameters_name_the_whole_objective_from_python_and_from_yaml(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    canary = "canary-judge-key-0123456789"
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", canary)
    monkeypatch.chdir(tmp_path)
    cli = main([
        "--config", str(REPO / "configs/demo/grpo_process.yaml"),
        "--model.init_args.backbone.init_args.model=embedded-tiny",
        "--model.init_args.rewards.class_path", "pathvlm_lightning.callbacks.ProcessReward",  # swaps the last reward
        "--model.init_args.rewards.init_args.judge.api_key_env", "JUDGE_KEY_FOR_TEST", *SMALL_DATA,
    ], run=False)  # fmt: skip
    saved = cli.model.hparams
    assert saved["rollout"] == {
        "class_path": "pathvlm_lightning.callbacks.RolloutCallback",
        "init_args": {"num_generations": 8, "max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "min_new_tokens": 0},
    }
    assert [r["class_path"].rsplit(".", 1)[1] for r in saved["rewards"]] == ["FormatReward", "AccuracyReward", "ProcessReward"]
    assert saved["rewards"][2]["init_args"]["judge"]["api_key_env"] == "JUDGE_KEY_FOR_TEST"  # the name, never the value
    assert saved["reference"] == {
        "class_path": "pathvlm_lightning.callbacks.ReferenceModelCallback",
        "init_args": {"sync_every_n_steps": None, "sync_mix": 0.6},
    }
    assert saved["loss"]["class_path"] == "pathvlm_lightning.grpo.losses.GRPOLoss"
    dumped = yaml.safe_dump(dict(saved))  # plain data: hparams.yaml and the checkpoint can hold it
    assert canary not in dumped and "sk-" not in dumped
    # the same parts built in Python are saved the same way
    python = GRPOModule(
        backbone, RolloutCallback(num_generations=8, max_new_tokens=64), [FormatReward(), AccuracyReward()],
        ReferenceModelCallback(), loss=GRPOLoss(beta=0.04),
    )  # fmt: skip
    assert python.hparams["rollout"] == saved["rollout"] and python.hparams["reference"] == saved["reference"]
    assert python.hparams["rewards"] == saved["rewards"][:2]


def test_print_config_shows_the_parts_under_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/demo/grpo.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    module = printed["model"]["init_args"]
    assert module["rollout"]["init_args"]["num_generations"] == 8
    assert [r["class_path"] for r in module["rewards"]] == [
        "pathvlm_lightning.callbacks.FormatReward", "pathvlm_lightning.callbacks.AccuracyReward",
    ]  # fmt: skip
    assert module["reference"]["class_path"] == "pathvlm_lightning.callbacks.ReferenceModelCallback"
    assert module["loss"]["init_args"]["beta"] == 0.04
    assert not any(part_kind(c["class_path"]) for c in printed["trainer"]["callbacks"])


# ---- the layout before: configs and flags stop with the new one ----------------------------------
OLD_CONFIG = {
    "trainer": {
        "callbacks": [
            {"class_path": "pathvlm_lightning.callbacks.RolloutCallback", "init_args": {"num_generations": 4}},
            {"class_path": "pathvlm_lightning.callbacks.FormatReward"},
            {"class_path": "callbacks.conciseness.ConcisenessReward", "init_args": {"weight": 0.5}},
            {"class_path": "pathvlm_lightning.callbacks.ReferenceModelCallback"},
            {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
        ]
    },
    "model": {
        "class_path": "pathvlm_lightning.modules.GRPOModule",
        "init_args": {"backbone": {"class_path": "pathvlm_lightning.backbone.Backbone", "init_args": {"model": "embedded-tiny"}}},
    },
}  # fmt: skip


def test_an_old_layout_config_stops_through_the_cli_with_the_new_layout(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(OLD_CONFIG, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pathvlm_lightning", "fit", "--config", str(old), "--run_dir", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # stopped before anything was built or written
    message = done.stderr.split("error: ", 1)[1]
    assert message.startswith(f"{old}: trainer.callbacks lists pathvlm_lightning.callbacks.RolloutCallback, ")
    # the message's YAML is the new layout of the same entries (the LearningRateMonitor stays where it was)
    shown = yaml.safe_load(message.split("write instead:\n", 1)[1].split("\n(", 1)[0])
    entries = OLD_CONFIG["trainer"]["callbacks"]
    assert shown == {"model": {"init_args": {"rollout": entries[0], "rewards": entries[1:3], "reference": entries[3]}}}


def test_an_old_layout_overlay_and_flags_stop_with_the_new_layout(tmp_path: Path) -> None:
    overlay = tmp_path / "process.yaml"
    overlay.write_text("trainer:\n  callbacks+:\n    - class_path: pathvlm_lightning.callbacks.RubricProcessReward\n")
    with pytest.raises(LegacyPartsConfigError, match=r"(?s)trainer.callbacks\+ lists .*RubricProcessReward.*    rewards\+:\n"):
        expand_bases(["--config", str(REPO / "configs/demo/grpo.yaml"), "--config", str(overlay)])
    flag = "--trainer.callbacks+=callbacks.conciseness.ConcisenessReward"
    with pytest.raises(LegacyPartsConfigError, match=r"--model.init_args.rewards\+=callbacks.conciseness.ConcisenessReward"):
        expand_bases(["--config", str(REPO / "configs/demo/grpo.yaml"), flag])
    judge = "--trainer.callbacks.init_args.judge.base_url"
    with pytest.raises(LegacyPartsConfigError, match=r"Write --model.init_args.rewards.init_args.judge.base_url"):
        expand_bases([judge, "http://localhost:1/v1"])
    # other callbacks on the command line are not parts and pass
    assert expand_bases(["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         "--trainer.callbacks.init_args.every_n_train_steps=1"])[0].startswith("--trainer.callbacks+")


# ---- a checkpoint of the layout before resumes -------------------------------------------------
def test_a_checkpoint_of_the_old_layout_resumes_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """The fixture is a step-2 checkpoint written by the code before this change (parts under
    trainer.callbacks), less its weights and optimizer state (``make_checkpoint_meta.py``); the same
    step's weights of the current code (bit-identical) are put back. Its callback states are keyed
    by the same ``state_key`` the parts have now, so the RNG state of the rollout (and the
    reference's) load, and steps 3-4 match the uninterrupted run."""
    old = torch.load(OLD_LAYOUT, weights_only=False)
    assert "rollout" not in old["hyper_parameters"]  # written before the module named its parts

    def build() -> GRPOModule:
        return GRPOModule(
            Backbone("embedded-tiny", seed=0), RolloutCallback(num_generations=4, max_new_tokens=8),
            [LengthReward(), FormatReward()], ReferenceModelCallback(),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), loss=GRPOLoss(beta=0.04),
            log_completions_every_n_steps=0,
        )  # fmt: skip

    full, full_log, _ = fit(tmp_path / "full", build, "prompt", [])
    new = torch.load(tmp_path / "full" / "ckpt" / "step=2.ckpt", weights_only=False)
    assert set(new["callbacks"]) == set(old["callbacks"])  # the same state keys in both layouts
    converted = {**old, "state_dict": new["state_dict"], "optimizer_states": new["optimizer_states"]}
    path = tmp_path / "old_layout.ckpt"
    torch.save(converted, path)
    resumed, resumed_log, _ = fit(tmp_path / "resumed", build, "prompt", [], ckpt_path=path)
    for key in ("reward/total_mean", "completion/length_mean", "train/loss", "train/kl"):
        expected = [v for step, v in full_log.series(key) if step >= 2]
        assert len(expected) == 2 and [v for _, v in resumed_log.series(key)] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    for name, value in full.backbone.state_dict().items():
        torch.testing.assert_close(resumed.backbone.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)
