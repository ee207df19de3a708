"""The CPU dress rehearsal of the paper plan, end to end, as a user runs it: ``examples/rehearsal_cpu.py``.

It runs ``python -m pathvlm_lightning pipeline --plan configs/pipeline.yaml --config
configs/rehearsal_cpu.yaml --no-ood``: every stage of the paper plan (base, Alpha SFT, Beta GRPO,
PathVLM-R1 with the judge's process reward, the Gamma/Delta/Epsilon controls) from the shipped
configs, under FSDP2 on 2 CPU processes (gloo), 2 steps each, the base model loaded from a folder
(Qwen2.5-VL's twin with Qwen's real vocabulary), PathMMU as released (``tests/fixtures/pathmmu_release``:
val, test and test_tiny of two subsets) and a loopback judge. Then, from what the run left:

- every GRPO stage scored its groups with the fast sharing mode (``grouped``: FSDP2 with activation
  checkpointing and sdpa) and warned of no fallback;
- every stage that had something to learn moved its weights, and never the frozen vision tower:
  the SFT stages (alpha, gamma, delta) and r1, whose judge scores differ between completions. Beta
  and epsilon reward format and accuracy only, which a random-weight base model never earns (every
  group scores 0, so every step is skipped, as GRPO must: a zero advantage is no signal); for them
  the test checks exactly that: both steps skipped, and the export equal to the model it started from;
- the test split, and every stage's test count, includes ``test_tiny`` questions;
- the report tables exist, with a row per stage and the plan's comparisons.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pathvlm_lightning.backbone import shared_prompt

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "pathmmu_release"
#: stage -> (its run_dir in the paper configs, the stage whose export it starts from; None: the base folder)
TRAINED = {
    "alpha": ("runs/sft", None),
    "beta": ("runs/grpo", "alpha"),
    "r1": ("runs/grpo_process", "beta"),
    "gamma": ("runs/gamma", "alpha"),
    "delta": ("runs/delta", None),
    "epsilon": ("runs/epsilon", None),
}
GRPO_STAGES = ("beta", "r1", "epsilon")
#: GRPO stages rewarded for format and accuracy only: nothing a random-weight model can earn in 2 steps.
NO_SIGNAL = ("beta", "epsilon")
SHARING_TAG = "rollout/sharing_mode"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The rehearsal's working folder after one full run, and what the script printed."""
    work = tmp_path_factory.mktemp("rehearsal")
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "rehearsal_cpu.py"), "--workdir", str(work)],
        capture_output=True, text=True, timeout=3000, cwd=work,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return work, output


def _fixture_ids() -> dict[str, set[str]]:
    """Ids the release fixture's records get (``data:<subset>/<split>:<No>``), by release split."""
    data = json.loads((FIXTURE / "data.json").read_text())
    ids: dict[str, set[str]] = {}
    for subset, splits in data.items():
        for split, rows in splits.items():
            ids.setdefault(split, set()).update(f"data:{subset}/{split}:{row['No']}" for row in rows)
    return ids


def _split_ids(work: Path, name: str) -> list[str]:
    return [json.loads(line)["id"] for line in (work / "runs" / "splits" / f"{name}.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({key: f.get_tensor(key).float() for key in f.keys()})
    return tensors


def _logged_sharing_modes(tb_dir: Path) -> list[str]:
    """Every value of ``rollout/sharing_mode`` in a stage's TensorBoard files: the scalar decoded with
    ``shared_prompt.SHARING_MODE_CODES`` (i17-floor: 0 none, 1 images, 2 grouped, 3 cache), and the
    text summary's first word (``grouped (0 none, ...)``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = {code: name for name, code in getattr(shared_prompt, "SHARING_MODE_CODES", {}).items()}
    modes = []
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        if SHARING_TAG in tags.get("scalars", []):
            modes += [names.get(int(event.value), f"code {event.value}") for event in accumulator.Scalars(SHARING_TAG)]
        for tag in tags.get("tensors", []):
            if tag.startswith(SHARING_TAG):  # the text summary: rollout/sharing_mode/text_summary
                modes += [event.tensor_proto.string_val[0].decode().split()[0] for event in accumulator.Tensors(tag)]
    return modes


def _scalars(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values += [event.value for event in accumulator.Scalars(tag)]
    return values


@pytest.mark.slow
def test_every_grpo_stage_shares_prompts_the_fast_way(rehearsal):
    work, _ = rehearsal
    modes = {stage: _logged_sharing_modes(work / TRAINED[stage][0] / "tb") for stage in GRPO_STAGES}
    assert modes["r1"], "r1 trained both steps but logged no rollout/sharing_mode"
    for stage in GRPO_STAGES:
        assert set(modes[stage]) <= {"grouped"}, (stage, modes[stage])
        log = (work / "runs" / "report" / stage / "fit.log").read_text(errors="replace")
        fallbacks = [line for line in log.splitlines() if "WARNING" in line and re.search(r"shar|G copies", line)]
        assert not fallbacks, (stage, fallbacks)


@pytest.mark.slow
def test_every_stage_with_a_signal_moved_its_weights_and_none_the_frozen_vision_tower(rehearsal):
    work, _ = rehearsal
    base = work / "rehearsal" / "qwen2_5_vl_twin"
    for stage, (run_dir, parent) in TRAINED.items():
        start = _weights(base if parent is None else work / TRAINED[parent][0] / "export")
        end = _weights(work / run_dir / "export")
        assert start.keys() == end.keys(), stage
        changed = [key for key in end if not torch.equal(start[key], end[key])]
        if stage in NO_SIGNAL:
            assert set(_scalars(work / run_dir / "tb", "groups/zero_variance_frac")) == {1.0}, stage  # every group
            assert max(_scalars(work / run_dir / "tb", "groups/skipped_steps")) == 2.0, stage  # both steps
            assert not changed, f"{stage}: skipped both steps, yet {changed[:3]} changed"
            continue
        vision = {key for key in end if key.startswith("visual.") or ".visual." in key}
        assert vision and not vision & set(changed), f"{stage}: the frozen vision tower changed"
        # every trainable tensor (all of the language model: embeddings, layers, norms) moved
        assert set(changed) == set(end) - vision, f"{stage}: unchanged {sorted(set(end) - vision - set(changed))[:5]}"
    assert min(_scalars(work / "runs/grpo_process/tb", "process/requests")) > 0  # r1 learned from the judge


@pytest.mark.slow
def test_the_test_split_counts_test_tiny(rehearsal):
    work, _ = rehearsal
    released = _fixture_ids()
    assert {split: len(ids) for split, ids in released.items()} == {"val": 10, "test": 10, "test_tiny": 6}
    splits = {name: _split_ids(work, name) for name in ("sft", "rl", "test")}
    assert (len(splits["sft"]), len(splits["rl"])) == (8, 8)
    # every released question, test_tiny's included, is in exactly one split: none left out
    assert sorted(sum(splits.values(), [])) == sorted(set().union(*released.values()))
    assert set(splits["test"]) & released["test_tiny"], "no test_tiny question in the test split"
    report = json.loads((work / "runs" / "report" / "report.json").read_text())
    for stage in ("base", *TRAINED):
        assert report["stages"][stage]["count"] == len(splits["test"]), stage
        predicted = {json.loads(line)["id"] for line in (work / "runs" / "report" / stage / "predictions_test.jsonl").open()}
        assert predicted == set(splits["test"]), stage


@pytest.mark.slow
def test_the_report_tables_exist_and_the_judge_was_asked(rehearsal):
    work, output = rehearsal
    report = json.loads((work / "runs" / "report" / "report.json").read_text())
    assert list(report["stages"]) == ["base", *TRAINED]
    pairs = [(c["a"], c["b"]) for c in report["comparisons"]]
    assert pairs == [("alpha", "base"), ("beta", "alpha"), ("beta", "gamma"), ("r1", "beta"), ("epsilon", "delta")]
    table = (work / "runs" / "report" / "report.md").read_text()
    for stage in ("base", *TRAINED):
        assert f"| {stage} " in table, stage
    requests = int(re.findall(r"the loopback judge answered (\d+) requests", output)[-1])
    assert requests > 0
