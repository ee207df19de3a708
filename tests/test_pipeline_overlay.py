"""Plan overlays (``pipeline --config``): applied after every stage's configs, by the overlay's three rules.

A 2-stage toy plan (SFT ``a`` from an embedded model -> GRPO ``b`` from a's export, with a rollout,
two rewards and a reference as its parts, and the output callbacks); the launcher (:class:`FakeCLI`) writes what the CLI would and
records each command, so what is tested is what the runner reads and passes on.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

import pytest
import yaml

from pathvlm_lightning.pipeline import PipelineRunner, PlanError, load_plan
from pathvlm_lightning.pipeline.overlay import read_overlay
from pathvlm_lightning.stage_config import read_stage_yaml, short_name
from tests.test_pipeline_runner import _prediction

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every plan load parses each stage twice through LightningCLI

GRPO_PARTS = {
    "rollout": {"class_path": "pathvlm_lightning.callbacks.RolloutCallback", "init_args": {"num_generations": 4, "max_new_tokens": 64}},
    "rewards": [
        {"class_path": "pathvlm_lightning.callbacks.FormatReward", "init_args": {"weight": 0.5}},
        {"class_path": "pathvlm_lightning.callbacks.AccuracyReward", "init_args": {"weight": 1.0}},
    ],
    "reference": {"class_path": "pathvlm_lightning.callbacks.ReferenceModelCallback"},
}  # fmt: skip


class FakeCLI:
    """Writes a stage's export (fit) or predictions (test) where its config says; records the commands."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], log_file: Path) -> int:
        self.calls.append(args)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        config = Path(args[args.index("--config") + 1])
        if args[0] == "fit":
            export = config.parent / config.stem / "export"
            export.mkdir(parents=True, exist_ok=True)
            (export / "config.json").write_text("{}")
        else:
            target = Path(args[args.index("--model.init_args.predictions_path") + 1])
            target.write_text("".join(json.dumps(_prediction(i, i < 2)) + "\n" for i in range(4)))
        return 0


def _config(tmp: Path, name: str, module: str, start: str, parts: dict | None = None) -> str:
    config = {
        "trainer": {
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp / name / "ckpt")}},
                {"class_path": "pathvlm_lightning.callbacks.ExportCallback", "init_args": {"dirpath": str(tmp / name / "export")}},
            ],
        },
        "model": {
            "class_path": f"pathvlm_lightning.modules.{module}",
            "init_args": {
                "backbone": {"class_path": "pathvlm_lightning.backbone.Backbone", "init_args": {"model": start}},
                **(parts or {}),
            },
        },
        "data": {"class_path": "pathvlm_lightning.data.VQADataModule", "init_args": {"data_path": "embedded"}},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _plan(tmp: Path) -> str:
    a = _config(tmp, "a", "SFTModule", "embedded-tiny")
    b = _config(tmp, "b", "GRPOModule", str(tmp / "a" / "export"), GRPO_PARTS)
    plan = {"out_dir": str(tmp / "report"), "stages": {"a": {"config": a}, "b": {"config": b, "needs": "a"}}}
    (tmp / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return str(tmp / "plan.yaml")


def _overlay(tmp: Path, **values) -> str:
    overlay = {
        "trainer": {"max_steps": 3},
        "model": {"init_args": {
            "backbone": {"init_args": {"model": "embedded-small", "max_pixels": 12544}},
            "rollout": {"class_path": "pathvlm_lightning.callbacks.RolloutCallback", "init_args": {"max_new_tokens": 8}},
        }},
        **values,
    }  # fmt: skip
    path = tmp / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return str(path)


def test_overlay_applies_to_every_stage_by_its_rules(tmp_path):
    plain = load_plan(_plan(tmp_path))
    plan = load_plan(_plan(tmp_path), [_overlay(tmp_path)])
    a, b = plan.stages["a"], plan.stages["b"]
    # the root stage starts from the overlay's model, the chained one from its parent's export
    assert a.info.start_model == "embedded-small"
    assert b.info.start_model == str(tmp_path / "a" / "export") == plain.stages["b"].info.start_model
    # b's rollout updated in place (its other settings as written); its rewards and callbacks untouched
    rollout = b.overlay["model"]["init_args"]["rollout"]
    assert short_name(rollout["class_path"]) == "RolloutCallback"
    assert rollout["init_args"]["max_new_tokens"] == 8 and rollout["init_args"]["num_generations"] == 4
    assert "rewards" not in b.overlay["model"]["init_args"] and "callbacks" not in b.overlay["trainer"]
    assert "rollout" not in a.overlay["model"]["init_args"]  # a (SFT) has no rollout: nothing reaches it
    # plain values reach both; the digest (the stage's identity) sees the overlay
    for stage in (a, b):
        assert stage.overlay["trainer"]["max_steps"] == 3
        assert stage.config_digest() != plain.stages[stage.name].config_digest()


def test_runner_passes_the_written_overlay_and_notices_a_changed_one(tmp_path):
    overlay = _overlay(tmp_path)
    fake = FakeCLI()
    runner = PipelineRunner(load_plan(_plan(tmp_path), [overlay]), launcher=fake, echo=lambda _: None)
    runner.run(evaluate_ood=False)
    fit_b = next(c for c in fake.calls if c[0] == "fit" and c[2].endswith("b.yaml"))
    written = tmp_path / "report" / "b" / "overlay.yaml"
    assert fit_b[:5] == ["fit", "--config", str(tmp_path / "b.yaml"), "--config", str(written)]
    assert yaml.safe_load(written.read_text()) == runner.plan.stages["b"].overlay
    assert written.read_text().startswith(f"# Written by the pipeline: {overlay}")
    # what the CLI reads from the stage file plus the written overlay is what the plan resolved
    resolved = read_stage_yaml(tmp_path / "b.yaml", ["--config", str(written)])
    assert resolved["model"]["init_args"]["rollout"]["init_args"]["max_new_tokens"] == 8
    assert resolved["model"]["init_args"]["backbone"]["init_args"]["model"] == str(tmp_path / "a" / "export")
    state = yaml.safe_load((tmp_path / "report" / "a" / "state.json").read_text())
    assert state["steps"]["fit"]["overlays"] == [overlay]

    _overlay(tmp_path, seed_everything=7)  # the same file, changed
    with pytest.raises(PlanError, match="stage 'a': .*a.yaml changed since its model was trained"):
        PipelineRunner(load_plan(_plan(tmp_path), [overlay]), launcher=fake, echo=lambda _: None).run(evaluate_ood=False)


def test_overlay_refuses_what_cannot_apply_to_a_whole_plan(tmp_path):
    with pytest.raises(PlanError, match=r"sets \['run_dir'\], which a plan overlay cannot"):
        load_plan(_plan(tmp_path), [_overlay(tmp_path, run_dir="runs/x")])
    typo = {"model": {"init_args": {"rollout": {"class_path": "pathvlm_lightning.callbacks.RolloutCallbak", "init_args": {}}}}}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    with pytest.raises(PlanError, match=r"updates callbacks that no stage has: \['.*typo.yaml: RolloutCallbak'\]"):
        load_plan(_plan(tmp_path), [str(tmp_path / "typo.yaml")])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [{"init_args": {"x": 1}}]}}))
    with pytest.raises(PlanError, match="each trainer.callbacks entry needs a class_path and init_args"):
        load_plan(_plan(tmp_path), [str(tmp_path / "bad.yaml")])
    old = {"trainer": {"callbacks": [{"class_path": "pathvlm_lightning.callbacks.RolloutCallback", "init_args": {"max_new_tokens": 8}}]}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(PlanError, match=r"(?s)old.yaml: trainer.callbacks lists .*RolloutCallback.*model:\n  init_args:\n    rollout:"):
        load_plan(_plan(tmp_path), [str(tmp_path / "old.yaml")])
    with pytest.raises(PlanError, match="overlay 'missing.yaml' does not exist"):
        load_plan(_plan(tmp_path), ["missing.yaml"])


def test_an_overlay_reward_updates_the_stage_reward_of_its_class_in_place(tmp_path):
    update = {"class_path": "pathvlm_lightning.callbacks.FormatReward", "init_args": {"weight": 2.0}}
    plan = load_plan(_plan(tmp_path), [_overlay(tmp_path, model={"init_args": {"rewards": [update]}})])
    rewards = plan.stages["b"].overlay["model"]["init_args"]["rewards"]
    assert [(short_name(r["class_path"]), r["init_args"]["weight"]) for r in rewards] == [
        ("FormatReward", 2.0), ("AccuracyReward", 1.0),
    ]  # fmt: skip  (the list and its order kept, the accuracy reward as written)
    assert "rewards" not in plan.stages["a"].overlay.get("model", {}).get("init_args", {})


def test_the_shipped_rehearsal_overlay_loads_with_the_paper_plan_as_its_header_says(monkeypatch):
    monkeypatch.chdir(REPO)
    header = "\n".join(line for line in Path("configs/rehearsal_cpu.yaml").read_text().splitlines() if line.startswith("#"))
    command = shlex.split(re.search(r"-m pathvlm_lightning pipeline ([^\n]*)", header).group(1))
    assert command[:4] == ["--plan", "configs/pipeline.yaml", "--config", "configs/rehearsal_cpu.yaml"]
    overlay = read_overlay("configs/rehearsal_cpu.yaml")
    assert overlay.start_model == "rehearsal/qwen2_5_vl_twin"
    assert overlay.callback_updates == {} and overlay.part_updates == {"RolloutCallback": {"max_new_tokens": 16}}
    plan = load_plan("configs/pipeline.yaml", ["configs/rehearsal_cpu.yaml"])  # every stage resolves with it
    paper = {name: read_stage_yaml(stage.config) for name, stage in plan.stages.items()}
    for name, stage in plan.stages.items():
        resolved = read_stage_yaml(stage.config, ["--config", _written(stage.overlay)])
        own = paper[name]
        # kept: what the paper configs say about precision, sharding, checkpointing, batches and rewards
        assert resolved["trainer"]["precision"] == own["trainer"]["precision"]
        assert resolved["trainer"]["strategy"]["class_path"] == own["trainer"]["strategy"]["class_path"]
        backbone, own_backbone = (c["model"]["init_args"]["backbone"]["init_args"] for c in (resolved, own))
        for key in ("dtype", "gradient_checkpointing", "freeze_vision", "attn_implementation"):
            assert backbone[key] == own_backbone[key], (name, key)
        assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == [c["class_path"] for c in own["trainer"]["callbacks"]]
        module, own_module = (c["model"]["init_args"] for c in (resolved, own))
        assert [r["class_path"] for r in module.get("rewards") or []] == [r["class_path"] for r in own_module.get("rewards") or []]
        if own_module.get("rollout"):  # GRPO: the rollout's budget swapped, G kept
            assert module["rollout"]["init_args"]["max_new_tokens"] == 16
            assert module["rollout"]["init_args"]["num_generations"] == own_module["rollout"]["init_args"]["num_generations"]
        for key in ("batch_size", "max_length", "max_prompt_length"):
            assert resolved["data"]["init_args"][key] == own["data"]["init_args"][key], (name, key)
        # swapped: 2 CPU processes, the twin's folder at the roots, the release fixture
        assert resolved["trainer"]["strategy"]["init_args"]["data_parallel_size"] == 2
        assert (resolved["trainer"]["accelerator"], resolved["trainer"]["devices"]) == ("cpu", 2)
        start = backbone["model"]
        assert start == ("rehearsal/qwen2_5_vl_twin" if stage.needs is None else plan.stages[stage.needs].evaluated_model)
        assert resolved["data"]["init_args"]["record_style"] == "pathmmu_release"
    r1 = read_stage_yaml("configs/grpo_process.yaml", ["--config", _written(plan.stages["r1"].overlay)])
    assert r1["model"]["init_args"]["micro_batch_size"] == 4
    judge = r1["model"]["init_args"]["rewards"][-1]["init_args"]["judge"]
    assert (judge["model"], judge["api_key_env"], judge["base_url"]) == ("gpt-4o", "OPENAI_API_KEY", None)


def _written(overlay: dict) -> str:
    path = Path(tempfile.mkdtemp()) / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return str(path)
