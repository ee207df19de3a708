"""The output layer under 2-process FSDP2 (gloo): gathered once per step, results as on one process.

``tests/dist_output_layer_worker.py`` runs under torchrun. Before, every log-prob pass gathered the
root unit again (the policy's after each slice's backward resharded it; the frozen reference's root
resharded after each forward and ``output_layer`` all-gathered the float32 lm_head once more per
call). Now a step's passes sit inside ``Backbone.output_layer_gathered()``: one gather of each root
per step, and no ``full_tensor`` of the output layer at all. The counts come from FSDP's own
``unshard`` (only the calls that really gather) and would read 2 per model without the block, as
the worker's unscoped passes show.

Tolerances (float32) are those of ``tests/test_prefix_group.py`` and ``tests/test_distributed.py``:
log-probs atol/rtol 1e-5; gradients rtol 1e-4, atol 1e-5 x the largest entry; weights after 2 SGD
steps atol 1e-5, losses rtol 2e-5: the ranks pad their own batches and FSDP2 averages gradients
through gloo, so only the reduction order differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathvlm_lightning.backbone import Backbone
from tests.dist_output_layer_worker import full_gradients, one_prompt_slices, run_fit, slice_passes

REPO_ROOT = Path(__file__).resolve().parent.parent
LOGP_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-5


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, data = tmp_path_factory.mktemp("output_layer"), tmp_path_factory.mktemp("output_layer_data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = [str(REPO_ROOT / "tests" / "dist_output_layer_worker.py"), str(out), str(data)]
    done = subprocess.run([*command, *worker], capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return out


def _assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        atol = GRAD_ATOL_OF_MAX * max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(got[name], grad, rtol=GRAD_RTOL, atol=atol, msg=name)
    assert max(grad.abs().max().item() for grad in want.values()) > 1e-2  # gradients did arrive


@pytest.mark.slow  # one 2-process launch: ~1 min on 2 cores
def test_sharded_passes_gather_the_output_layer_once_and_match_one_process(two_processes):
    sharded = torch.load(two_processes / "passes.pt")
    # Two slices per rank: one root gather inside the block, one per slice outside it.
    assert sharded["policy_scoped"]["counts"] == {"policy": 1, "reference": 0, "full_tensor": 0}
    assert sharded["policy_unscoped"]["counts"] == {"policy": 2, "reference": 0, "full_tensor": 0}
    assert sharded["reference_scoped"]["counts"] == {"policy": 0, "reference": 1, "full_tensor": 0}
    assert sharded["reference_unscoped"]["counts"] == {"policy": 0, "reference": 2, "full_tensor": 2}
    assert sharded["policy_resharded"] and sharded["reference_resharded"]  # the blocks released them

    backbone = Backbone()  # the same seed-0 weights, unsharded; the output layer is tied to the embedding
    slices = one_prompt_slices(backbone.processor, range(4))
    logps = slice_passes(backbone, slices, scale=0.5, grad=True)  # FSDP2 averaged the 2 ranks' gradients
    grads = full_gradients(backbone)
    assert "lm_head.weight" not in grads and "model.language_model.embed_tokens.weight" in grads  # tied
    for key in ("policy_scoped", "policy_unscoped"):
        torch.testing.assert_close(sharded[key]["logps"], logps, **LOGP_TOL)
        _assert_grads_close(sharded[key]["grads"], grads)
    for key in ("reference_scoped", "reference_unscoped"):
        torch.testing.assert_close(sharded[key]["logps"], logps, **LOGP_TOL)


@pytest.mark.slow
def test_grpo_steps_gather_each_output_layer_once_per_step_and_train_as_one_process(two_processes, tmp_path):
    sharded = torch.load(two_processes / "fit.pt")
    # Full fine-tuning, two micro-batch slices per rank: the policy's root and the frozen
    # reference's root each gathered once per step, the output layer never gathered apart.
    assert sharded["counts"] == [{"policy": 1, "reference": 1, "full_tensor": 0}] * 2
    single = run_fit(tmp_path, processes=1)
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=2e-5, atol=1e-7)
    assert single["weights"].keys() == sharded["weights"].keys()
    for name, weight in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=0, atol=1e-5, msg=name)
    initial = Backbone().model.state_dict()
    moved = max((single["weights"][k] - initial[k]).abs().max().item() for k in single["weights"])
    assert moved > 1e-3  # the steps trained
