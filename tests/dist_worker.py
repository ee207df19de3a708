"""The multi-process side of ``tests/test_distributed.py``; the test also imports it for its 1-process runs.

Launched the way a user launches a job with torchrun::

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR DATA_DIR
    torchrun --standalone --nproc_per_node NUM_GPUS tests/dist_worker.py OUT_DIR DATA_DIR gpu
    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR DATA_DIR families
    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR DATA_DIR prefix

On CPU every rank runs each scenario of :data:`SCENARIOS` (a short Lightning fit on the embedded
tiny Qwen2.5-VL over gloo) and writes ``OUT_DIR/<scenario>.rank<r>.json``; rank 0 also writes the
trained weights ``OUT_DIR/<scenario>.pt`` (gathered in full under FSDP2). Then every rank counts
FSDP2 all-gathers during ``generate`` and rank 0 writes ``OUT_DIR/gathers.json``. One launch keeps
the process start-up cost (~15 s of imports on 2 cores) paid once. With ``gpu`` it runs
:data:`GPU_SCENARIOS` instead, whose trainer settings come from the shipped GPU strategy configs;
with ``families``, :data:`FAMILY_SCENARIOS` (the FSDP2 GRPO step on each family's embedded twin,
for ``tests/test_families.py``).
With ``prefix`` it runs only :func:`grouped_logprobs_and_grads` on an FSDP2-sharded backbone
(``tests/test_prefix_group.py``) and rank 0 writes ``OUT_DIR/prefix.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.strategies import ModelParallelStrategy
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh

from pathvlm_lightning.backbone import Backbone, LoraOptions
from pathvlm_lightning.backbone.sharding import fsdp_units, full_state_dict
from pathvlm_lightning.callbacks import AccuracyReward, ExportCallback, FormatReward, ReferenceModelCallback
from pathvlm_lightning.callbacks.sampler import RolloutCallback
from pathvlm_lightning.data import VQADataModule
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.losses import GRPOLoss
from pathvlm_lightning.grpo.stages import Samples
from pathvlm_lightning.modules import GRPOModule, SFTModule
from tests.test_data_support import pathmmu_rows, write_jsonl
from tests.worker_exit import exit_after_work

STRATEGY_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "strategies"
STEPS = 3
NUM_GENERATIONS = 4
NUM_RECORDS = 16


@dataclass(frozen=True)
class Scenario:
    """One short fit. ``batch_size`` is per process; the 1-process twin uses ``batch_size * 2``."""

    kind: str  # "sft" | "grpo"
    strategy: str  # "ddp" | "fsdp2" (2 CPU processes), "single" (1 process), or a GPU config's file name
    batch_size: int
    lora: bool = False
    loss_type: str = "grpo"
    beta: float = 0.04
    export: bool = False
    model: str = "embedded-tiny"

    def single(self, world_size: int = 2) -> Scenario:
        """The same global batch on one process."""
        return Scenario(**{**self.__dict__, "strategy": "single", "batch_size": self.batch_size * world_size})


SCENARIOS: dict[str, Scenario] = {
    "sft_ddp": Scenario("sft", "ddp", batch_size=2),
    "sft_lora_fsdp2": Scenario("sft", "fsdp2", batch_size=2, lora=True, export=True),
    "grpo_ddp": Scenario("grpo", "ddp", batch_size=1),
    "grpo_fsdp2": Scenario("grpo", "fsdp2", batch_size=1),
    "dapo_ddp": Scenario("grpo", "ddp", batch_size=1, loss_type="dapo", beta=0.0),
}
FAMILY_SCENARIOS: dict[str, Scenario] = {
    f"grpo_fsdp2_{model}": Scenario("grpo", "fsdp2", batch_size=1, model=model)
    for model in ("embedded-tiny-qwen2-vl", "embedded-tiny-qwen3-vl", "embedded-tiny-qwen3.5")
}
GPU_SCENARIOS: dict[str, Scenario] = {
    "sft_fsdp1_gpu": Scenario("sft", "fsdp_gpu.yaml", batch_size=2, export=True),
    "grpo_lora_fsdp2_gpu": Scenario("grpo", "fsdp2_gpu.yaml", batch_size=1, lora=True, export=True),
}


def train_only_data(records: Path, split_dir: Path, batch_size: int, module: Any) -> VQADataModule:
    """The data module every 2-process worker trains on: all of ``records`` as one train split (also
    its test and predict split), no validation, batches of ``module``'s kind."""
    return VQADataModule(
        data_path=str(records),
        split_dir=str(split_dir),
        split_sizes={"train": None},
        train_split="train",
        val_split=None,
        test_split="train",
        predict_split="train",
        batch_size=batch_size,
        batch_kind=module.batch_kind,
        processor=module.backbone.processor,
    )


def write_records(folder: Path) -> Path:
    """16 single-image questions, all answered ``B) medium`` with one explanation.

    Every SFT target then has the same number of label tokens, so each rank's token-mean loss
    weighs tokens as the 1-process token mean does (see the test module's docstring).
    """
    rows = pathmmu_rows(folder, NUM_RECORDS)
    for row in rows:
        row.update(answer="B", explanation="The nuclei look medium.")
    return write_jsonl(folder / "records.jsonl", rows)


def fixed_completions(record: VQARecord) -> list[str]:
    """G completions that depend on the record only (never on a rank's RNG), of record-dependent length.

    Rewards (format, accuracy) differ inside the group, so advantages are non-zero; the filler
    makes ranks' token counts differ, which is what dapo's global normaliser is for.
    """
    filler = "cells " * (3 * (int(record.id[1:]) % 4))
    return [
        f"<think>{filler}dark nuclei</think><answer>B) medium</answer>",
        f"<think>{filler}</think><answer>A) small</answer>",
        "<answer>B) medium</answer>",
        "no idea " * (1 + int(record.id[1:]) % 3),
    ]


class FixedRollout(RolloutCallback):
    """A rollout whose completions are :func:`fixed_completions`, so 1 and 2 processes train on the
    same data; records each step's valid-token count."""

    def __init__(self) -> None:
        super().__init__(num_generations=NUM_GENERATIONS, max_new_tokens=64)
        self.token_counts: list[int] = []

    def generate(self, backbone: Any, batch: dict) -> Samples:
        tokenizer = backbone.processor.tokenizer
        eos = backbone.eos_token_ids[0]
        rows = [
            tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            for record in batch["records"]
            for text in fixed_completions(record)
        ]
        ids = torch.full((len(rows), max(map(len, rows))), backbone.pad_token_id)  # [B*G, L]
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        ids = ids.to(batch["prompt_inputs"]["input_ids"].device)
        mask, truncated = backbone.completion_mask(ids)  # [B*G, L], [B*G]
        self.token_counts.append(int(mask.sum()))
        return Samples.of(
            records=batch["records"],
            prompt_inputs=batch["prompt_inputs"],
            completion_ids=ids,
            completion_mask=mask,
            truncated=truncated,
            texts=[text for record in batch["records"] for text in fixed_completions(record)],
            group_size=NUM_GENERATIONS,
        )


class StepRecorder(pl.Callback):
    """Each step's logged ``train/loss`` (and ``train/grad_norm``) on this rank and its records' ids."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []  # GRPO logs the (clipped-to) global gradient norm
        self.record_ids: list[list[str]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: dict, index: int) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        if "train/grad_norm" in trainer.callback_metrics:
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))
        self.record_ids.append([record.id for record in batch["records"]])


def strategy_trainer_args(path: Path, devices: int | None = None) -> dict[str, Any]:
    """The ``trainer`` settings of a strategy config, parsed and built as the CLI does.

    ``devices`` overrides the config's GPU count (and the data-parallel size, which must match).
    """
    config = yaml.safe_load(path.read_text())
    if devices is not None:
        config["trainer"]["devices"] = devices
        init_args = config["trainer"]["strategy"].get("init_args", {})
        if "data_parallel_size" in init_args:
            init_args["data_parallel_size"] = devices
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    return dict(parser.instantiate(parser.parse_object(config)).trainer)


def _trainer_args(strategy: str) -> dict[str, Any]:
    if strategy.endswith(".yaml"):
        return strategy_trainer_args(STRATEGY_CONFIGS / strategy, devices=torch.cuda.device_count())
    if strategy == "single":
        return {"accelerator": "cpu", "devices": 1}
    if strategy == "fsdp2":
        fsdp2 = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        return {"accelerator": "cpu", "devices": 2, "strategy": fsdp2}
    return {"accelerator": "cpu", "devices": 2, "strategy": strategy}


def saved_model(model: str, folder: Path) -> str:
    """The embedded ``model`` exported to a checkpoint folder under ``folder`` (once per process), so that
    fits load it the way users load theirs: ``from_pretrained``, with whatever hub kernels it brings."""
    target = folder / f"{model}.rank{os.environ.get('RANK', '0')}"  # ranks start together: one folder each
    if not (target / "config.json").is_file():
        Backbone(model=model).export(target)
    return str(target)


def run_scenario(name: str, scenario: Scenario, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Fits ``scenario`` for :data:`STEPS` steps and returns this rank's record; rank 0 writes the weights.
    The model is loaded from a saved folder (:func:`saved_model`)."""
    model = saved_model(scenario.model, data_dir / "models")
    pl.seed_everything(0)  # LoRA's initialisation must agree across ranks: FSDP2 broadcasts nothing
    lora = LoraOptions(r=4, dropout=0.0) if scenario.lora else None  # dropout would differ per rank
    backbone = Backbone(model=model, lora=lora)
    # SGD: the weights' change is lr x the gradient, so any gradient difference shows (Adam would
    # normalise away a uniform scale error, such as a missing division by the world size).
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    if scenario.kind == "sft":
        module: Any = SFTModule(backbone, optimizer=optimizer)
        callbacks: list[pl.Callback] = []
    else:
        # a synced frozen copy with full fine-tuning; LoRA's is the adapter-free base
        reference = ReferenceModelCallback(sync_every_n_steps=None if scenario.lora else 1) if scenario.beta > 0 else None
        module = GRPOModule(
            backbone, FixedRollout(), [FormatReward(), AccuracyReward()], reference, optimizer=optimizer,
            loss=GRPOLoss(aggregation=scenario.loss_type, beta=scenario.beta),
        )  # fmt: skip
        callbacks = []
    recorder = StepRecorder()
    callbacks.append(recorder)
    if scenario.export:
        callbacks.append(ExportCallback(str(out_dir / f"{name}.export")))
    data = train_only_data(write_records(data_dir), data_dir / "splits", scenario.batch_size, module)
    trainer = pl.Trainer(
        **_trainer_args(scenario.strategy),
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    compared = not scenario.strategy.endswith(".yaml")  # the GPU runs only have to complete and export
    initial = _trainable_weights(backbone) if compared else {}  # before configure_model: unsharded
    trainer.fit(module, datamodule=data)
    record: dict[str, Any] = {
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "record_ids": recorder.record_ids,
    }
    rollout = getattr(module, "rollout", None)  # GRPO only
    if rollout is not None:
        record["token_counts"] = rollout.token_counts
    reference = getattr(module, "reference", None)
    if reference is not None and not reference.uses_adapters:
        record.update(_reference_round_trip(reference))
    if compared:
        weights = {"initial." + k: v for k, v in initial.items()}
        weights.update({"final." + k: v for k, v in _trainable_weights(backbone).items()})
        if reference is not None:
            weights.update({"reference." + k: v for k, v in reference.state_dict()["reference"].items()})
        if trainer.global_rank == 0:
            torch.save(weights, out_dir / f"{name}.pt")
    return record


def _trainable_weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The trainable weights in full (a collective under FSDP2; empty off rank 0 there)."""
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    state = full_state_dict(backbone.model) if fsdp_units(backbone.model) else backbone.model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k in trainable}


def _reference_round_trip(reference: ReferenceModelCallback) -> dict[str, Any]:
    """The reference's checkpoint state: saved, the weights scrambled, loaded back; did they come back?

    Under FSDP2 ``state_dict`` gathers to rank 0 and every rank loads the full weights (in a resume
    each rank reads the checkpoint file; here rank 0's copy is broadcast).
    """
    saved = reference.state_dict()
    saved = {**saved, "reference": {k: v.clone() for k, v in saved["reference"].items()}}
    if dist.is_initialized():
        holder = [saved]
        dist.broadcast_object_list(holder, src=0)
        saved = holder[0]
    with torch.no_grad():
        for parameter in reference._reference.parameters():
            parameter.mul_(0.5)
    reference.load_state_dict(saved)
    again = reference.state_dict()["reference"]  # empty off rank 0 when sharded
    restored = all(torch.equal(again[k], v) for k, v in saved["reference"].items()) if again else None
    return {"reference_sharded": bool(fsdp_units(reference._reference)), "reference_restored": restored}


# ---------------------------------------------------------------- all-gathers during generate
@contextmanager
def counted_all_gathers() -> Iterator[list[int]]:
    """Counts the all-gather collectives FSDP2 issues inside the block (``calls[0]``).

    FSDP2 gathers a unit's parameters with ``dist.all_gather_single`` (``all_gather_into_tensor`` in
    older torch), looked up on ``torch.distributed`` at call time, so wrapping it sees each one.
    """
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    original = getattr(dist, name)
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counting)
    try:
        yield calls
    finally:
        setattr(dist, name, original)


def count_generation_gathers(new_tokens: tuple[int, ...] = (2, 8)) -> dict[str, Any]:
    """All-gathers per ``generate`` of each length in ``new_tokens`` on an FSDP2-sharded backbone."""
    pl.seed_everything(0)
    backbone = Backbone()
    backbone.apply_fully_shard(init_device_mesh("cpu", (dist.get_world_size(),)))
    processor = backbone.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which grade?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (56, 56), (200, 80, 120))
    inputs = dict(processor(images=[image, image], text=[text, text], return_tensors="pt", padding=True))
    gathers = {}
    for n in new_tokens:
        with counted_all_gathers() as calls:
            out = backbone.generate(inputs, num_generations=2, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape == (4, n), out.shape
        gathers[str(n)] = calls[0]
    resharded = all(type(p).__name__ == "DTensor" for p in backbone.parameters())
    return {"gathers": gathers, "units": len(fsdp_units(backbone.model)), "resharded": resharded}


# ---------------------------------------------------------------- prefix-grouped log-probs under FSDP2
PREFIX_GENERATIONS = 3
PREFIX_QUESTIONS = ("Which stain dominates the tile?", "Size?", "How dense are the nuclei in this tile?", "Grade?")


def prefix_case(processor: Any, prompts: slice = slice(None)) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Left-padded image prompts (from :data:`PREFIX_QUESTIONS`, selected by ``prompts``) and their
    G ragged completions [B*G, 6]: EOS at different places, padding after it, an image id inside."""
    eos, pad, image_pad = 1000, 998, 1010  # the embedded vocabulary's <|im_end|>, <|endoftext|>, <|image_pad|>
    chosen = range(len(PREFIX_QUESTIONS))[prompts]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PREFIX_QUESTIONS[i]}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in chosen
    ]
    images = [Image.new("RGB", (56 * (1 + i % 2),) * 2, (40 * i, 200 - 30 * i, 120)) for i in chosen]
    inputs = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    completions = torch.tensor(
        [
            row
            for i in chosen
            for row in (
                [11 + i, 12, 13, 14, 15, eos],
                [21 + i, eos, pad, pad, pad, pad],
                [31, image_pad, 33 + i, 34, 35, 36],
            )
        ]
    )  # [B*G, 6]
    return inputs, completions


def grouped_logprobs_and_grads(
    backbone: Backbone, inputs: dict[str, torch.Tensor], completions: torch.Tensor, scale: float
) -> dict[str, Any]:
    """``token_logprobs`` of ``completions`` [B*G, L] and the full gradients of ``scale`` x their sum
    over real tokens (a collective under FSDP2: every rank gathers every gradient)."""
    mask, _ = backbone.completion_mask(completions)  # [B*G, L]
    logps = backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)  # [B*G, L]
    (scale * logps[mask == 1].sum()).backward()
    grads = {}
    for name, parameter in backbone.model.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return {"logps": logps.detach().masked_fill(mask == 0, 0.0), "grads": grads, "mode": backbone.sharing_mode(inputs)}


def sharded_grouped_logprobs(out_dir: Path) -> None:
    """Each of the 2 ranks scores 2 of the 4 prompts of :func:`prefix_case` (padded to its own batch)
    on an FSDP2-sharded backbone with activation checkpointing; rank 0 writes ``prefix.pt``."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    backbone = Backbone(freeze_vision=False, gradient_checkpointing=True)
    score_prefix_case_sharded(backbone, rank, world, out_dir / "prefix.pt")
    dist.destroy_process_group()


def score_prefix_case_sharded(backbone: Backbone, rank: int, world: int, out_path: Path) -> None:
    """Shards ``backbone`` (FSDP2), scores this rank's share of :func:`prefix_case`'s prompts and has
    rank 0 write every rank's log-probs (prompt order), rank 0's gradients and the modes to ``out_path``."""
    backbone.apply_fully_shard(init_device_mesh("cpu", (world,)))
    share = len(PREFIX_QUESTIONS) // world
    inputs, completions = prefix_case(backbone.processor, slice(rank * share, (rank + 1) * share))
    result = grouped_logprobs_and_grads(backbone, inputs, completions, scale=1.0)  # FSDP2 averages over ranks
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"logps": result["logps"], "mode": result["mode"]})
    if rank == 0:
        logps = torch.cat([g["logps"] for g in gathered])  # [4*G, L]: rank order is prompt order
        modes = [g["mode"] for g in gathered]
        torch.save({"logps": logps, "grads": result["grads"], "modes": modes}, out_path)
    dist.barrier()


def main(out_dir: Path, data_dir: Path, device: str = "cpu") -> None:
    if device == "prefix":
        sharded_grouped_logprobs(out_dir)
        return
    scenarios = {"gpu": GPU_SCENARIOS, "families": FAMILY_SCENARIOS}.get(device, SCENARIOS)
    for scenario in scenarios.values():  # before the first fit starts the process group: under one,
        saved_model(scenario.model, data_dir / "models")  # transformers writes the config on rank 0 only
    for name, scenario in scenarios.items():
        record = run_scenario(name, scenario, data_dir, out_dir)
        (out_dir / f"{name}.rank{dist.get_rank()}.json").write_text(json.dumps(record))
    if device == "cpu":
        counts = count_generation_gathers()
        if dist.get_rank() == 0:
            (out_dir / "gathers.json").write_text(json.dumps(counts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown
