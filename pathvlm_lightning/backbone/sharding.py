"""FSDP2 (``fully_shard``) for every model family: one all-gather per ``generate`` call instead of one per token,
and the full weights gathered back into a plain model for export.

Sharding unit: each language-model decoder layer and each vision block (where they live is the
family's ``decoder_layers``/``vision_blocks``), then the root (embeddings, lm_head, norms, the
vision patch embedding and merger(s)). Non-root units reshard after forward (the
memory saving); the root keeps its parameters between forward and backward (FSDP2's own choice
for roots), and :func:`gathered_for_generation` restores exactly these settings (True for nested
units, False for roots) on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from pathvlm_lightning.backbone.families import family_of


def apply_fully_shard(
    model: PreTrainedModel, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None
) -> PreTrainedModel:
    """Shard a (possibly peft-wrapped) model of any family in place with FSDP2 over ``mesh``; returns it.

    Call after LoRA/freezing (FSDP2 keeps ``requires_grad`` per parameter, so frozen and trainable
    parameters may share a unit) and before the optimizer is built.
    """
    policy = mp_policy or MixedPrecisionPolicy()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(inner)
    for layer in family.decoder_layers(inner):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for block in family.vision_blocks(inner):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(inner, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a Lightning ``precision`` setting.

    ``bf16-mixed``: float32 shards (the optimizer's master weights), gathered as bfloat16 for the
    forward/backward and gradients reduced in float32 (a bf16 reduce-scatter over 8 ranks loses
    about 3 bits of the mean). Everything else gathers the shards as they are: ``32-true`` in
    float32, ``bf16-true``/``16-true`` whose weights are already half precision.
    """
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


@torch.no_grad()
def copy_local_shards(source: torch.nn.Module, target: torch.nn.Module, device: torch.device) -> None:
    """Fill ``target``, sharded like ``source`` but on the meta device, with ``source``'s weights.

    Allocates ``target``'s local shards on ``device`` (``to_empty``) and copies each rank's local
    shard of every parameter, and every (unsharded) buffer, by name: no rank gathers anything, and
    the rank's memory grows by 1/world_size of the parameters. Both must be sharded over the same
    mesh with the same units, so local shards have equal shapes (checked).
    """
    target.to_empty(device=device)
    sources = dict(source.named_parameters())
    for name, parameter in target.named_parameters():
        local, wanted = _local(parameter), _local(sources[name])
        if local.shape != wanted.shape:
            raise ValueError(f"copy_local_shards: {name} is sharded differently ({tuple(local.shape)} vs {tuple(wanted.shape)})")
        local.copy_(wanted)
    source_buffers = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        buffer.copy_(source_buffers[name])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor parameter; a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    """The FSDP2 units inside ``model`` (empty when it is not sharded)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_for_generation(model: torch.nn.Module) -> Iterator[None]:
    """Keep every FSDP2 unit's full parameters for the whole block; a no-op when not sharded.

    Autoregressive decoding runs one forward per token; with reshard-after-forward each of them would
    all-gather every layer again. Here each unit is gathered once on entry, kept through all decoding
    steps, and resharded on exit (peak memory: the full model on every rank for the duration).
    All ranks must enter together (the gathers are collectives), as they do in a rollout.

    The explicit gather is also what makes ``generate`` work at all under FSDP2: transformers 5.x
    runs the vision tower (``get_image_features``) before the first root forward, so the root's own
    parameters (patch embedding, merger) would still be sharded and the first vision block would
    claim to be FSDP's root. FSDP's root state is therefore initialised here first; that uses the
    private ``_get_fsdp_state()._lazy_init()`` (torch 2.4-2.13), the one step with no public API.
    """
    units = fsdp_units(model)
    if not units:
        yield
        return
    nested = {id(m) for u in units for m in u.modules() if m is not u and isinstance(m, FSDPModule)}
    for unit in units:
        if id(unit) not in nested:
            unit._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(id(unit) in nested, recurse=False)


@contextmanager
def root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Keep the FSDP2 root unit's parameters gathered from its first forward in the block to the block's
    end; a no-op when not sharded.

    The root holds the embeddings, the output layer (the same tensor when tied), the final norm and
    the vision merger: 2 GiB in bf16 at 7B. A step's log-prob passes (every micro-batch slice, the
    reference's too) each run a root forward; inside this block the first one all-gathers and the
    others find the parameters gathered, so the output layer is gathered once per step, as FSDP's
    own unsharded parameters in the mixed-precision policy's ``param_dtype`` (gradients reach FSDP's
    reduce-scatter after every backward as usual). On exit the root reshards and gets back its usual
    settings: a trainable model's root keeps its parameters between forward and backward
    (:func:`apply_fully_shard`), a frozen one's reshards after forward (the reference's). Close the
    block before the optimizer step: the gathered copy does not see the step's update. A collective
    (all ranks run the same passes inside it).
    """
    units = fsdp_units(model)
    nested = {id(m) for u in units for m in u.modules() if m is not u and isinstance(m, FSDPModule)}
    roots = [unit for unit in units if id(unit) not in nested]
    for root in roots:
        root.set_reshard_after_forward(False, recurse=False)
        root.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        frozen = not any(p.requires_grad for p in model.parameters())
        for root in roots:
            root.reshard()
            root.set_reshard_after_backward(True, recurse=False)
            root.set_reshard_after_forward(frozen, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded ``model`` on CPU, on global rank 0; ``{}`` on the other ranks.

    A collective (every rank calls it). Gathering to rank 0's CPU only keeps GPU memory at one unit's
    worth and spares the other ranks a full copy they would not use.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_unsharded(
    model: PreTrainedModel | PeftModel, root: torch.nn.Module | None = None, prefix: str = ""
) -> PreTrainedModel | PeftModel | None:
    """A plain, unsharded CPU copy of a sharded ``model`` on global rank 0; ``None`` on the others.

    A collective. ``root`` is the module the sharding was applied to, with ``prefix`` the name of
    ``model`` inside it: FSDP2 shards ``model`` itself (the default), Lightning's FSDP1 wraps the
    whole LightningModule (pass the strategy's model and ``"backbone.model."``). The copy is built
    on the meta device from the model's config (and its active LoRA adapter), then takes the
    gathered weights by assignment: rank 0 holds one full copy in CPU memory and no randomly
    initialised one. Non-persistent buffers (rotary frequencies) are not in a state dict and FSDP
    never shards buffers, so they are copied from the live model.
    """
    state = full_state_dict(model if root is None else root)
    if dist.get_rank() != 0:
        return None
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    peft = isinstance(model, PeftModel)
    inner = model.get_base_model() if peft else model
    plain_class = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclassed it
    with torch.device("meta"):
        copy: PreTrainedModel | PeftModel = plain_class(inner.config)
        if peft:
            adapter = model.active_adapter
            copy = PeftModel(copy, model.peft_config[adapter], adapter_name=adapter)
    copy.load_state_dict(state, assign=True)
    live_buffers = {_without_wrappers(name): buffer for name, buffer in model.named_buffers()}
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, live_buffers[name].detach().cpu().clone(), persistent=False)
    plain = copy.get_base_model() if peft else copy
    plain.tie_weights()
    plain.generation_config = inner.generation_config
    return copy.eval()


def _without_wrappers(name: str) -> str:
    """A parameter/buffer name without the FSDP1 and activation-checkpointing wrapper segments."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
