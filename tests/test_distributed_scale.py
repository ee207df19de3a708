"""Global normalisers, FSDP2 mixed precision and the sharded reference, 2 processes (gloo) vs 1.

``tests/dist_scale_worker.py`` runs under ``torchrun --nproc_per_node 2``; the SFT and GRPO runs
are repeated here in one process on the same global batch and compared with the tolerances of
``tests/test_distributed.py`` (its module docstring says why they hold).

- SFT on targets of different lengths: ranks hold different label-token counts (checked), so a
  rank-local token mean would weigh the tokens of the shorter rank more; the global normaliser
  makes 2 processes train as 1.
- GRPO with ``scale_rewards: batch``: the record-dependent reward gives each rank a different reward
  std (checked); the advantages must use the global batch's, as one process does. The run also
  slices each rank's rollout into micro-batches of one group under dapo's global normaliser.
- FSDP2 under ``bf16-mixed``: parameters are all-gathered (and seen inside forward) as bfloat16,
  gradients reduce-scattered in float32 into float32 shards; the reference is built sharded
  (each rank keeps half of it) and, after a resume, still holds the starting weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pathvlm_lightning.backbone import Backbone
from tests.dist_scale_worker import grpo_batch_scaled, sft_uneven
from tests.test_distributed import Twin, _compare, _ranks

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every run of the worker in 2 processes (one launch); returns the folder of its outputs."""
    out, data = tmp_path_factory.mktemp("scale_two"), tmp_path_factory.mktemp("scale_two_data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(REPO_ROOT / "tests" / "dist_scale_worker.py"), str(out), str(data)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return out


def _twin(tmp_path: Path, name: str, run: Any) -> dict[str, Twin]:
    """The 1-process run of ``name`` with the global batch (2 x the per-rank batch of 2)."""
    record = run(name, "single", 4, tmp_path / "data", tmp_path)
    return {name: Twin(record, tmp_path, name)}


@pytest.mark.slow
def test_sft_normalises_by_the_global_label_token_count(two_processes: Path, tmp_path: Path) -> None:
    ranks = _ranks(two_processes, "sft_uneven_ddp")
    assert ranks[0]["label_tokens"] != ranks[1]["label_tokens"]  # [50, 81, 48] vs [94, 81, 28]
    _compare("sft_uneven_ddp", two_processes, _twin(tmp_path, "sft_uneven_ddp", sft_uneven))


@pytest.mark.slow
def test_batch_scaled_advantages_use_the_global_batch(two_processes: Path, tmp_path: Path) -> None:
    ranks = _ranks(two_processes, "grpo_batch_scaled_ddp")
    local_stds = zip(ranks[0]["local_reward_stds"], ranks[1]["local_reward_stds"])  # [16.8, 10.1, 5.1] vs [16.9, 8.8, 15.7]
    assert max(abs(a - b) for a, b in local_stds) > 1.0
    twins = _twin(tmp_path, "grpo_batch_scaled_ddp", grpo_batch_scaled)
    expected = twins["grpo_batch_scaled_ddp"].record["advantages"]  # record id -> its G advantages
    got = {**ranks[0]["advantages"], **ranks[1]["advantages"]}
    assert got.keys() == expected.keys() and len(got) == 12  # 3 steps x 4 records
    for record_id, values in expected.items():
        assert got[record_id] == pytest.approx(values, rel=1e-5, abs=1e-6), record_id
    _compare("grpo_batch_scaled_ddp", two_processes, twins)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_gathers_bf16_and_reduces_in_fp32(two_processes: Path) -> None:
    for rank in _ranks(two_processes, "fsdp2_bf16"):
        assert rank["forward_dtypes"] == {
            "policy": ["torch.bfloat16"], "reference": ["torch.bfloat16"], "grad": ["torch.float32"]
        }
        assert rank["collectives"]["all_gather"] == ["torch.bfloat16"]
        assert rank["collectives"]["reduce_scatter"] == ["torch.float32"]
        # the reference: frozen, so stored as it is gathered (bf16 shards, half the policy's float32), half on each rank
        assert rank["reference_shard_dtypes"] == ["torch.bfloat16"]
        assert rank["reference_local_fraction"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_fsdp2_reference_is_the_starting_policy_also_after_resume(two_processes: Path) -> None:
    assert [r["sharded"] for r in _ranks(two_processes, "fsdp2_reference_resume")] == [True, True]
    assert _ranks(two_processes, "fsdp2_reference_resume")[0]["global_step"] == 3
    weights = torch.load(two_processes / "fsdp2_reference_resume.pt")
    initial = Backbone().state_dict()  # the worker's starting weights (seed 0)
    for prefix in ("reference.", "first_reference."):
        got = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        assert got.keys() == initial.keys()
        assert all(torch.equal(got[k], initial[k]) for k in initial), prefix  # copied shard by shard, exactly
    policy = {k[len("policy."):]: v for k, v in weights.items() if k.startswith("policy.")}
    moved = [k for k in initial if not torch.equal(policy[k], initial[k])]
    assert moved  # the resumed policy is trained; the reference did not follow it
