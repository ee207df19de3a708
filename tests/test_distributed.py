"""Multi-process training on CPU (gloo): 2 processes must train as 1 process does on the same global batch.

``tests/dist_worker.py`` runs under ``torchrun --nproc_per_node 2`` (DDP and FSDP2 via
``ModelParallelStrategy`` + ``fully_shard``), b records per rank; the same scenarios run here in one
process with 2b records. Both see the same records per step (Lightning's ``DistributedSampler``
uses the same seeded permutation as the data module's sampler and deals it out by rank).

Why equality is expected, not only approximate agreement:
- SFT: each rank's loss is a mean over its label tokens; ranks' gradients are averaged. That
  equals the 1-process token mean when every rank has the same number of label tokens, which the
  records here guarantee (same answer and explanation everywhere). With unequal counts DDP
  weighs a token of the shorter rank more (as gradient accumulation does).
- GRPO, ``aggregation: grpo``: mean over each completion's tokens, then over completions; every rank
  has the same number of completions and whole groups, so the rank mean of means is the global mean.
- GRPO, ``aggregation: dapo``: the token sum is divided by the step's token count over all ranks
  / world size (``BackboneModule.global_count_per_rank``); the fixed completions give ranks different token
  counts, so this is what makes the two agree.
- Sampling would differ per rank (RNG), so the rollout is fixed per record (``FixedRollout``).

Tolerance: float32 (eps 1.2e-7) with a different reduction order: each rank's forward runs on a
batch padded to its own length (other matmul blockings), and the gradient arrives as
(g0 + g1) / 2 through gloo instead of one batch reduction, so values differ by a few ulps per step.
Measured over 3 SGD steps (lr 0.1): losses within 2.2e-7 relative (1.4e-6 on 6.55) and weights
within 1.2e-7 absolute, while training moves them by 1.3e-2 to 9.2e-2. Gradient norms sum ~6e5
squares in float32, over whole tensors on one process and over shards under FSDP2; that
accumulation alone is off by 3.6e-6 relative from the float64 norm, and the FSDP2 norms differ
from the 1-process ones by 7.5e-6. Bounds: rtol 2e-5 on losses, 1e-4 on gradient norms, atol 1e-5
on weights, a 10-100x margin and far below what a real error produces: a per-rank dapo normaliser
(bnpo) is off by 0.12 (50 %), a gradient summed instead of averaged by 100 %.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from pathvlm_lightning.backbone import Backbone
from tests.dist_worker import GPU_SCENARIOS, SCENARIOS, STEPS, Scenario, run_scenario, strategy_trainer_args

REPO_ROOT = Path(__file__).resolve().parent.parent
STRATEGY_CONFIGS = sorted((REPO_ROOT / "configs" / "strategies").glob("*.yaml"))
LOSS_RTOL, LOSS_ATOL = 2e-5, 1e-7
GRAD_NORM_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


def _launch(out: Path, data: Path, processes: int, *args: str) -> None:
    """``torchrun --standalone --nproc_per_node <processes> tests/dist_worker.py out data *args``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*command, str(REPO_ROOT / "tests" / "dist_worker.py"), str(out), str(data), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every scenario of the worker in 2 processes (one launch); returns the folder of its outputs."""
    out = tmp_path_factory.mktemp("two_processes")
    _launch(out, tmp_path_factory.mktemp("two_processes_data"), 2)
    return out


@dataclass(frozen=True)
class Twin:
    """A 1-process run: its record, and its outputs ``out/<name>.pt`` (and ``out/<name>.export``)."""

    record: dict[str, Any]
    out: Path
    name: str


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Twin]:
    """The 1-process twin (same global batch) of each scenario, by scenario name; run once per twin."""
    data = tmp_path_factory.mktemp("one_process_data")
    out = tmp_path_factory.mktemp("one_process")
    runs: dict[Scenario, Twin] = {}
    for name, scenario in SCENARIOS.items():
        single = scenario.single()
        if single not in runs:  # grpo_ddp and grpo_fsdp2 share theirs
            runs[single] = Twin(run_scenario(name, single, data, out), out, name)
    return {name: runs[scenario.single()] for name, scenario in SCENARIOS.items()}


def _ranks(out: Path, name: str, processes: int = 2) -> list[dict[str, Any]]:
    return [json.loads((out / f"{name}.rank{rank}.json").read_text()) for rank in range(processes)]


def _compare(name: str, two_processes: Path, one_process: dict[str, Twin]) -> None:
    """Checks records, losses, gradient norms and weights of ``name`` against its 1-process twin."""
    ranks = _ranks(two_processes, name)
    twin = one_process[name]
    single = twin.record
    for step in range(STEPS):  # the two ranks together saw exactly the 1-process batch
        assert sorted(ranks[0]["record_ids"][step] + ranks[1]["record_ids"][step]) == sorted(single["record_ids"][step])
    # Rank-local logged losses (SFT, dapo) average to the global one; synced ones (grpo) are equal.
    losses = torch.tensor([ranks[0]["losses"], ranks[1]["losses"]]).mean(dim=0)  # [STEPS]
    expected = torch.tensor(single["losses"])
    torch.testing.assert_close(losses, expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for rank in ranks:  # GRPO: gradients are reduced before clipping, so every rank logs the global norm
        norms = torch.tensor(rank["grad_norms"])  # [STEPS] for GRPO, [] for SFT
        torch.testing.assert_close(norms, torch.tensor(single["grad_norms"]), rtol=GRAD_NORM_RTOL, atol=0)
    weights = torch.load(two_processes / f"{name}.pt")
    expected_weights = torch.load(twin.out / f"{twin.name}.pt")
    assert weights.keys() == expected_weights.keys()
    weight_diff = max((weights[k] - expected_weights[k]).abs().max().item() for k in weights)
    assert weight_diff < WEIGHT_ATOL
    moved = max(
        (expected_weights[k] - expected_weights[k.replace("final.", "initial.")]).abs().max().item()
        for k in expected_weights
        if k.startswith("final.")
    )
    assert moved > 100 * WEIGHT_ATOL  # the comparison is not between two barely trained models
    print(
        f"{name}: losses {expected.tolist()}, max |2 proc - 1 proc| {(losses - expected).abs().max().item():.1e}; "
        f"weights moved up to {moved:.1e}, max |2 proc - 1 proc| {weight_diff:.1e}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft_ddp", "sft_lora_fsdp2"])
def test_sft_two_processes_match_one(name, two_processes, one_process):
    _compare(name, two_processes, one_process)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo_ddp", "grpo_fsdp2"])
def test_grpo_two_processes_match_one(name, two_processes, one_process):
    # Full fine-tuning, beta 0.04, a frozen reference copy synced every step (sharded under FSDP2),
    # so the KL term and the sync are part of what must agree.
    _compare(name, two_processes, one_process)
    ranks = _ranks(two_processes, name)
    assert [r["reference_sharded"] for r in ranks] == [name.endswith("fsdp2")] * 2
    assert ranks[0]["reference_restored"] is True  # its checkpoint state reloads into the (sharded) copy


@pytest.mark.slow
def test_dapo_normalises_by_the_global_token_count(two_processes, one_process):
    ranks = _ranks(two_processes, "dapo_ddp")
    # The fixed completions give the ranks different token counts (30 vs 40 at step 0): with a
    # per-rank normaliser (bnpo) two processes would not match one.
    assert ranks[0]["token_counts"] != ranks[1]["token_counts"]
    _compare("dapo_ddp", two_processes, one_process)


@pytest.mark.slow
def test_fsdp2_export_matches_one_process_export(two_processes, one_process):
    # LoRA + FSDP2: the shards are gathered to rank 0, rebuilt as a plain PeftModel, merged, written.
    exported = two_processes / "sft_lora_fsdp2.export"
    twin = one_process["sft_lora_fsdp2"]
    weights = load_file(exported / "model.safetensors")
    expected = load_file(twin.out / f"{twin.name}.export" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert not any("lora" in k for k in weights)  # merged
    assert max((weights[k] - expected[k]).abs().max().item() for k in weights) < WEIGHT_ATOL
    reloaded = Backbone(model=str(exported))  # what the next stage does with the folder
    assert reloaded.hf_model.generation_config.eos_token_id == Backbone().hf_model.generation_config.eos_token_id


@pytest.mark.slow
def test_generate_under_fsdp2_gathers_once_per_rollout(two_processes):
    counts = json.loads((two_processes / "gathers.json").read_text())
    # One all-gather per FSDP2 unit (2 decoder layers + 2 vision blocks + the root = 5) for a whole
    # generate call of 2 or of 8 new tokens; gathering per decoding step would grow with the length.
    assert counts["units"] == 5
    assert counts["gathers"] == {"2": 5, "8": 5}
    assert counts["resharded"]  # parameters are sharded again afterwards


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_strategy_configs_train_and_export(tmp_path):
    # The shipped fsdp_gpu.yaml (FSDP1: SFT) and fsdp2_gpu.yaml (FSDP2: GRPO with LoRA) on every GPU
    # of this machine, both exporting: the fits complete, the exports load and were trained.
    processes = torch.cuda.device_count()
    _launch(tmp_path / "out", tmp_path / "data", processes, "gpu")
    for name in GPU_SCENARIOS:
        for record in _ranks(tmp_path / "out", name, processes):
            assert len(record["losses"]) == STEPS and all(math.isfinite(x) for x in record["losses"]), record
    initial = dict(Backbone().hf_model.named_parameters())
    for name in [name for name, scenario in GPU_SCENARIOS.items() if scenario.export]:
        exported = dict(Backbone(model=str(tmp_path / "out" / f"{name}.export")).hf_model.named_parameters())
        assert exported.keys() == initial.keys()
        assert all(torch.isfinite(p).all() for p in exported.values())
        assert any(not torch.equal(exported[k], initial[k]) for k in initial)


@pytest.mark.slow
def test_readme_fsdp2_snippet_runs_from_a_folder(tmp_path):
    # The README's FSDP2 command as a user runs it, the model loaded from a saved folder (what every
    # paper config does) and no environment variable set: with transformers >= 5.25 and `kernels`
    # installed, hub kernels used to be re-applied to the reference skeleton on the meta device.
    from tests.test_cli_configs import SMALL_DATA

    model = tmp_path / "model"
    Backbone(model="embedded-tiny").export(model)
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "pathvlm_lightning", "fit", "--config", "configs/demo/grpo.yaml",
        "--config", "configs/strategies/fsdp2_cpu.yaml", f"--run_dir={run_dir}",
        f"--model.init_args.backbone.init_args.model={model}", "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false", f"--data.init_args.split_dir={tmp_path / 'splits'}", *SMALL_DATA,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert (run_dir / "export" / "config.json").is_file()
    assert "Unsupported device type" not in result.stderr
    # The project's INFO lines reach the console (the CLI sets up logging), and the mode is the fast one:
    # grouped under FSDP2, so no fallback warning.
    assert "wrote splits to" in result.stderr or "re-using splits" in result.stderr
    assert "not the faster way" not in result.stderr


# ---------------------------------------------------------------- strategy snippets
@pytest.mark.parametrize("path", STRATEGY_CONFIGS, ids=lambda p: p.name)
def test_strategy_config_parses(path):
    text = path.read_text()
    header = text.split("\ntrainer:")[0]
    assert header.startswith("# ") and f"--config configs/strategies/{path.name}" in header  # opens with its command
    settings = strategy_trainer_args(path)  # class paths, wrap policies and choices checked, strategy built
    if path.name.endswith("_cpu.yaml"):  # runnable here: build the Trainer too (no process starts yet)
        trainer = Trainer(**settings)
        assert trainer.num_devices == 2 and trainer.strategy.root_device.type == "cpu"


def test_the_strategy_configs_are_all_there():
    names = {p.name for p in STRATEGY_CONFIGS}
    assert names == {"ddp_cpu.yaml", "fsdp2_cpu.yaml", "fsdp2_gpu.yaml", "fsdp_gpu.yaml", "multinode_fsdp.yaml"}
