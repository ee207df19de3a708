"""Our policy losses against TRL 1.16's own loss code (``GRPOTrainer._compute_loss``), same inputs.

TRL is an optional dependency (``pip install trl==1.16.0`` beside torch 2.13.0). TRL's method is called
unbound on a stand-in trainer that holds only the attributes the method reads, with the model's
per-token log-probabilities handed in directly (no model runs), so both sides differentiate the same
leaf tensor. For every type TRL has we report the largest absolute difference of the loss and of
its gradient over several random draws: 2 groups x 4 completions of up to 12 tokens, padded rows
(one empty), old log-probs from an earlier policy (so ratios leave 1 and clipping triggers), and a
reference for the k3 KL (beta 0.04).

Where TRL parametrises differently, the script maps our settings onto TRL's and says so:
- GSPO is TRL's ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` (the per-sequence
  mean TRL recommends for the paper's objective).
- CISPO: TRL's ``epsilon_high`` is the weight ceiling itself; ours is ``1 + epsilon_high`` (the
  MiniMax-M1 paper's form), so TRL gets ``1 + ours``. TRL has no floor; ours defaults to none.
  TRL's ``cispo`` divides by the batch's token count: our ``aggregation: dapo`` with ``num_tokens``.
- SAPO: the same gate and the same per-sequence mean.

Run: ``python benchmarks/loss_parity_trl.py`` (``--dtype float64`` for a check free of rounding).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOTrainer

from pathvlm_lightning.grpo.losses import CISPOLoss, GRPOLoss, GSPOLoss, SAPOLoss

N, L, G, BETA = 8, 12, 4, 0.04


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_loss(logprobs, old, ref, advantages, mask, *, loss_type, level="token", eps_low=0.2, eps_high=0.2):
    """TRL 1.16's ``_compute_loss`` on a stand-in trainer; ``logprobs`` is returned as the model's."""
    entropies = torch.zeros_like(logprobs)
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, entropies, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=BETA,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        max_completion_length=L,
        current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(),
        model=SimpleNamespace(training=True),
        _metrics=defaultdict(lambda: defaultdict(list)),
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(
            use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
            steps_per_generation=1,
        ),
    )
    inputs = {
        "prompt_ids": torch.zeros(N, 1, dtype=torch.long),
        "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.zeros(N, L, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().to(logprobs.dtype),
    }
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


CASES = {
    # name: (our loss, TRL's settings, whether ours is given the global token count)
    "grpo": (GRPOLoss(aggregation="grpo", epsilon_high=0.28, beta=BETA), dict(loss_type="grpo", eps_high=0.28), False),
    "bnpo": (GRPOLoss(aggregation="bnpo", beta=BETA), dict(loss_type="bnpo"), False),
    "dr_grpo": (GRPOLoss(aggregation="dr_grpo", beta=BETA), dict(loss_type="dr_grpo"), False),
    "dapo": (GRPOLoss(aggregation="dapo", epsilon_high=0.28, beta=BETA), dict(loss_type="dapo", eps_high=0.28), True),
    "gspo": (
        GSPOLoss(epsilon_low=3e-4, epsilon_high=4e-4, beta=BETA),
        dict(loss_type="grpo", level="sequence", eps_low=3e-4, eps_high=4e-4),
        False,
    ),
    "gspo (clip 0.2)": (  # wider: some sequences clipped, some not
        GSPOLoss(epsilon_low=0.2, epsilon_high=0.2, beta=BETA),
        dict(loss_type="grpo", level="sequence"),
        False,
    ),
    "cispo": (CISPOLoss(epsilon_high=0.5, beta=BETA), dict(loss_type="cispo", eps_high=1.5), True),
    "sapo": (SAPOLoss(beta=BETA), dict(loss_type="sapo"), False),
}


def draw(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (N,), generator=gen)
    lengths[3] = 0  # an empty completion
    mask = (torch.arange(L)[None] < lengths[:, None]).long()  # [N, L]
    logprobs = -3 * torch.rand(N, L, generator=gen, dtype=torch.float64)  # [N, L]
    old = logprobs + 0.3 * torch.randn(N, L, generator=gen, dtype=torch.float64)  # an earlier policy
    ref = logprobs + 0.2 * torch.randn(N, L, generator=gen, dtype=torch.float64)
    rewards = torch.randn(N // G, G, generator=gen, dtype=torch.float64)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(logprobs), cast(old), cast(ref), cast(advantages), mask


def compare(name: str, seeds: int, dtype: torch.dtype) -> tuple[float, float, float, float]:
    ours_fn, trl_settings, global_count = CASES[name]
    ours_fn.bind(max_completion_length=L)
    loss_diff = grad_diff = loss_scale = grad_scale = 0.0
    for seed in range(seeds):
        logprobs, old, ref, advantages, mask = draw(seed, dtype)
        a, b = logprobs.clone().requires_grad_(), logprobs.clone().requires_grad_()
        num_tokens = float(mask.sum()) if global_count else None
        ours, _ = ours_fn(a, advantages, mask, old_logprobs=old, ref_logprobs=ref, num_tokens=num_tokens)
        theirs = trl_loss(b, old, ref, advantages, mask, **trl_settings)
        (grad_ours,) = torch.autograd.grad(ours, a)
        (grad_theirs,) = torch.autograd.grad(theirs, b)
        loss_diff = max(loss_diff, (ours - theirs).abs().item())
        grad_diff = max(grad_diff, (grad_ours - grad_theirs).abs().max().item())
        loss_scale = max(loss_scale, theirs.abs().item())
        grad_scale = max(grad_scale, grad_theirs.abs().max().item())
    return loss_diff, grad_diff, loss_scale, grad_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"TRL 1.16 GRPOTrainer._compute_loss vs grpo/losses, {args.seeds} draws of {N}x{L}, {args.dtype}")
    print("| type | max abs loss diff | max abs grad diff | largest |loss| | largest |grad| |")
    print("|---|---|---|---|---|")
    for name in CASES:
        loss_diff, grad_diff, loss_scale, grad_scale = compare(name, args.seeds, dtype)
        print(f"| {name} | {loss_diff:.2e} | {grad_diff:.2e} | {loss_scale:.3g} | {grad_scale:.3g} |")


if __name__ == "__main__":
    main()
