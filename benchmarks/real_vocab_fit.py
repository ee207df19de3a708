"""Seconds per step of a short demo GRPO fit of the real-vocabulary tiny twin, as a new user runs it,
for one or more code trees in one sitting (e.g. before and after a change).

    git archive <commit> pathvlm_lightning | tar -x -C /tmp/before     # the tree to compare against
    python benchmarks/real_vocab_fit.py --trees /tmp/before . --steps 3

Each tree runs ``python -m pathvlm_lightning fit --config configs/demo/base_grpo.yaml`` (G = 8,
64 new tokens, beta 0.04) from ``embedded-tiny`` with ``vocab: qwen`` (Qwen's 151,936 ids) in its own
process with ``PYTHONPATH`` set to the tree, and the ``ProgressLog`` line after the last step gives
each step's wall and CPU seconds (``_step_timer.StepTimer``; CPU seconds of the fit's process, all
threads, which a shared machine disturbs less than wall time). The first step is a warm-up and is left
out of the medians. The configs are this checkout's, and the trees share one data split (made by the
first fit). Trees run in the order given; alternate the order to see drift.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_fit(tree: Path, steps: int, run_dir: Path, split_dir: Path, threads: int) -> list[dict[str, float]]:
    """Per-step ``{"step", "wall", "cpu"}`` seconds of one fit with ``tree`` first on ``PYTHONPATH``."""
    command = [
        sys.executable, "-m", "pathvlm_lightning", "fit",
        "--config", str(REPO / "configs/demo/base_grpo.yaml"),
        "--run_dir", str(run_dir),
        "--model.init_args.backbone.init_args.model", "embedded-tiny",
        "--model.init_args.backbone.init_args.vocab", "qwen",
        "--data.init_args.split_dir", str(split_dir),
        "--trainer.max_steps", str(steps),
        "--trainer.callbacks+=_step_timer.StepTimer",
    ]  # fmt: skip
    path = os.pathsep.join([str(tree.resolve()), str(Path(__file__).resolve().parent)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"fit with {tree} failed:\n{result.stderr[-4000:]}")
    lines = [json.loads(line)["step_timer"] for line in result.stdout.splitlines() if line.startswith('{"step_timer"')]
    if len(lines) != steps:
        raise RuntimeError(f"expected {steps} step timings from {tree}, got {len(lines)}:\n{result.stdout[-2000:]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, default=[REPO], help="folders holding pathvlm_lightning/")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, tree in enumerate(args.trees):
            steps = run_fit(tree, args.steps, Path(scratch) / f"run{index}", Path(scratch) / "splits", args.threads)
            timed = steps[1:]
            result = {
                "tree": str(tree),
                "steps": steps,
                "wall_s_per_step": statistics.median(s["wall"] for s in timed),
                "cpu_s_per_step": statistics.median(s["cpu"] for s in timed),
            }
            results.append(result)
            print(f"{tree}: {result['wall_s_per_step']:.2f} s/step wall, {result['cpu_s_per_step']:.2f} CPU s/step "
                  f"(median of steps 2..{args.steps}; all: {[round(s['wall'], 2) for s in steps]})", flush=True)
    for result in results[1:]:
        print(f"{result['tree']} / {results[0]['tree']}: wall {result['wall_s_per_step'] / results[0]['wall_s_per_step']:.3f}, "
              f"CPU {result['cpu_s_per_step'] / results[0]['cpu_s_per_step']:.3f}")
    if args.output:
        args.output.write_text(json.dumps({"steps": args.steps, "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
