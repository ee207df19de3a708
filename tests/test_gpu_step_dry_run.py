"""benchmarks/gpu_step.py --dry-run: the GPU benchmark's own code, on CPU with the tiny architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~30 s of CPU: two 20 M-parameter builds, generation and GRPO steps
def test_gpu_step_dry_run_reports_both_modes(tmp_path):
    output = tmp_path / "gpu_step.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_step.py"), "--dry-run", "--groups", "2",
               "--steps", "1", "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] is True and set(report["modes"]) == {"lora", "full"}
    lora, full = report["modes"]["lora"], report["modes"]["full"]
    assert full["parameters"] < lora["parameters"]  # the same base model, plus adapters
    assert full["parameters"] > 151936 * 128  # Qwen's vocabulary: the embedding alone
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] < full["parameters"]  # vision frozen
    for mode in (lora, full):
        for cache in ("dynamic", "static"):
            probe = mode["generation"]["G=2"][cache]
            assert probe["new_tokens"] == 2 * 8 and probe["tokens_per_second"] > 0
        step = mode["grpo"]["G=2"]
        assert step["completion_length_seen"] == [8.0]  # forced length, one step
        assert step["seconds_per_step"] > 0 and step["loss"] is not None
        assert step["peak_gpu_memory_gib"] is None  # no GPU here
