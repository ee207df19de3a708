"""benchmarks/gpu_step.py --dry-run: the GPU benchmark's own code, on CPU with the tiny architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generation", "reference", "policy_forward", "policy_backward", "optimizer")


@pytest.mark.slow  # ~2 min of CPU: a process per setting (imports), 1 warm-up + 3 timed GRPO steps each
def test_gpu_step_dry_run_times_each_setting_in_its_own_process(tmp_path):
    output = tmp_path / "gpu_step.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_step.py"), "--dry-run", "--groups", "2",
               "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] is True and set(report["results"]) == {"lora G=2", "full G=2"}
    assert {"torch", "transformers", "lightning", "peft"} <= set(report["versions"])
    lora, full = report["results"]["lora G=2"], report["results"]["full G=2"]
    assert "error" not in lora and "error" not in full, (lora.get("stderr_tail"), full.get("stderr_tail"))
    assert len({lora["pid"], full["pid"], os.getpid()}) == 3  # each setting ran in a process of its own
    assert full["parameters"] < lora["parameters"]  # the same base model, plus adapters
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] < full["parameters"]  # vision frozen
    for result in (lora, full):
        assert result["attn_implementation"] == "sdpa" and result["sharing_mode"] == "grouped"  # checkpointing on
        assert set(result["logged_last_step"]) == {"rollout/sharing_mode", "rollout/sampler_kl"}
        assert [step["warmup"] for step in result["steps"]] == [True, False, False, False]
        assert result["timed_steps"] == 3 and len(result["sampler_kl_per_step"]) == 3
        assert result["steps"][0]["completion_tokens"] == 2 * 4  # the warm-up's short completions
        for step in result["steps"][1:]:
            assert step["completion_tokens"] == 2 * 8  # G x the forced length
            assert all(step["phases"][phase] > 0 for phase in PHASES), step["phases"]
            assert step["phases"]["other"] >= -1e-3  # the phases lie inside the step
        assert result["step_tokens_per_second"] < result["generation_tokens_per_second"]
        assert result["peak_gpu_memory_gib"] is None  # no GPU here
