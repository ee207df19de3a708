"""The LightningDataModule every stage uses: load, check, split once, then serve batches.

All stages of a pipeline point at the same ``split_dir``: the first run writes the image-grouped
split files (see :mod:`pathvlm_lightning.data.splits`), later runs re-use them and refuse to run
if asked for a different split. ``prepare_data`` (one process per node) reads and checks the
source and writes the splits; ``setup`` (every process) only reads split files.

Init arguments are plain types so LightningCLI can build the module from YAML; the processor is
not one of them in practice: the CLI copies the backbone's processor in after construction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pathvlm_lightning.data.counterfactual import (
    CounterfactualCollator,
    check_counterfactual_items,
    check_counterfactuals,
)
from pathvlm_lightning.data.collate import PromptCollator, SFTCollator
from pathvlm_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLimits
from pathvlm_lightning.data.image_paths import check_path_map
from pathvlm_lightning.data.loaders import RECORD_STYLES, FieldMap, load_records
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.data.resumable import ResumableDataLoader
from pathvlm_lightning.data.splits import (
    DEFAULT_SPLIT_SIZES,
    SplitManifest,
    check_manifest,
    normalise_sizes,
    prepare_splits,
    read_split,
)
from pathvlm_lightning.data.synthetic import ensure_embedded_dataset, ensure_ood_dataset
from pathvlm_lightning.data.synthetic_v4 import ensure_embedded_v4_dataset
from pathvlm_lightning.data.validation import RecordChecks, ValidationReport, check_on_invalid, special_tokens_of

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
# The built-in set: the paper's SFT/RL sizes, a validation split for early stopping, and the rest
# (1,700 of the default 6,000) for testing, enough to resolve a few points of accuracy.
EMBEDDED_SPLIT_SIZES: dict[str, int | None] = {"sft": 3000, "rl": 1000, "val": 300, "test": None}
EMBEDDED_OOD = "embedded_ood"
# The synthetic out-of-domain set (CT, dermoscopy, fundus) is only ever tested on: one split, all of it.
EMBEDDED_OOD_SPLIT_SIZES: dict[str, int | None] = {"test": None}


class RecordDataset(Dataset):
    """A list of records; images are opened by the collator, in the loader's workers."""

    def __init__(self, records: list[VQARecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VQARecord:
        return self.records[index]


class EpochSeededSampler(RandomSampler):
    """Shuffles with ``seed + epoch``, so an epoch has the same order in a resumed run as in an
    uninterrupted one (Lightning calls ``set_epoch``; under DDP it substitutes a seeded
    ``DistributedSampler``, as it does for any ``RandomSampler``)."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class VQADataModule(LightningDataModule):
    """Multiple-choice VQA batches for SFT, GRPO and evaluation.

    Args:
        data_path: a .json/.jsonl/.parquet file, a ``save_to_disk`` folder, a folder of such files
            or a glob pattern (files read in sorted order); ``"embedded"`` for the built-in
            synthetic tissue set, ``"embedded_ood"`` for the built-in synthetic out-of-domain set
            (both generated on first use under ``embedded_root``). The OOD set is a test set: use
            it with ``split_sizes: {test: null}`` (its default), ``train_split: test``,
            ``val_split: null`` and a ``split_dir`` of its own.
        record_style: ``"pathmmu"`` (options column), ``"pathmmu_release"`` (PathMMU's ``data.json``
            or ``*_mapping.json`` as downloaded: an object of splits; ``data_path`` may be the
            folder holding ``data.json``), ``"vlm_r1"`` (options in ``problem``, after an
            ``Options:`` line or inline ``A)x, B)y``; reasoning and answer in ``solution``) or
            ``"omnimedvqa"`` (``option_A``..``option_D``, ``gt_answer`` holding the option text;
            images relative to the release root).
        field_map: overrides of the style's source columns, e.g. ``{"answer": "gt_answer"}``.
        image_root: folder relative image paths start from (default: the data file's folder; its
            ``images/`` for ``pathmmu_release``). Image paths outside it are refused, judged by
            their real path (a symbolic link out of the root is outside).
        allow_absolute_image_paths: accept image paths anywhere on the machine (absolute, leading
            out of ``image_root`` with ``..``, or through a symbolic link).
        image_path_map: path prefixes as the records write them, mapped to a folder here
            (relative to ``image_root``, or absolute), for files made on another machine:
            ``{"/home/x/PathMMU/images": "images"}``. The longest matching prefix wins.
        max_image_pixels: largest image (width x height of the file) accepted at validation;
            None for no limit. Images with an aspect ratio over 200 are always refused.
        release_splits: for ``pathmmu_release``, which splits to read: subsets (``PubMed``) or split
            keys (``PubMed/test``, ``val``); None: every split, ``test_tiny`` included (its
            questions are not in ``test``). The splits read are pooled and split again by image
            (``split_sizes``); each record keeps its release split in its id (``data:PubMed/test_tiny:3``).
        split_dir: where the split files and manifest live; share it between the stages of a pipeline.
        split_sizes: records per split in fill order; ``null``/-1 = the rest. Default: the paper's
            3000/1000/1385 for a data file, :data:`EMBEDDED_SPLIT_SIZES` for the embedded set.
        seed: seeds the split, the embedded set and the training shuffle.
        train_split, val_split, test_split, predict_split: which split each loader serves; a
            ``val_split`` absent from the split sizes means no validation loop.
        batch_size, eval_batch_size: records per training / evaluation batch (eval default: batch_size).
        on_invalid: ``"error"`` stops at the first bad record; ``"skip"`` logs, counts and leaves it out.
        batch_kind: what train/val batches are: ``"sft"`` (conversation + labels) or ``"prompt"``
            (prompts for GRPO rollouts). Test and predict batches are always prompts.
        processor: the backbone's processor; set by the CLI after construction.
        max_length, max_prompt_length: token limits of SFT conversations / prompts (None: no limit).
        embedded_records, embedded_root: size and cache folder (default ``<split_dir>/embedded``,
            ``<split_dir>/embedded_ood`` for the OOD set) of the embedded set.
        embedded_ood_per_modality: questions per modality of the embedded OOD set (3 modalities).
        embedded_version: ``v3`` (the default the README's tables use) or ``v4``, the task on which a
            process reward can matter (``data/synthetic_v4.py``).
        counterfactuals: test batches also carry these counterfactual variants of their records
            (``blank``, ``swapped``, ``no_image``, ``shuffled``: see ``data/counterfactual.py``),
            each answered and scored by ``test``; default none.
        counterfactual_seed: seeds the swapped images and shuffled options (default: ``seed``).
        counterfactual_items: ask the counterfactuals of this many test records only, a sample drawn
            by ``counterfactual_seed`` (the same for every variant and every stage); default: all.
            Each variant costs a full greedy answer per question.
    """

    def __init__(
        self,
        data_path: str = EMBEDDED,
        record_style: Literal["pathmmu", "pathmmu_release", "vlm_r1", "omnimedvqa"] = "pathmmu",
        field_map: dict[str, str | list[str] | None] | None = None,
        image_root: str | None = None,
        allow_absolute_image_paths: bool = False,
        image_path_map: dict[str, str] | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        release_splits: list[str] | None = None,
        split_dir: str = "splits",
        split_sizes: dict[str, int | None] | None = None,
        seed: int = 0,
        train_split: str = "sft",
        val_split: str | None = "val",
        test_split: str = "test",
        predict_split: str = "test",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_invalid: Literal["error", "skip"] = "error",
        batch_kind: Literal["sft", "prompt"] = "sft",
        processor: Any = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        embedded_records: int = 6000,
        embedded_root: str | None = None,
        embedded_ood_per_modality: int = 300,
        embedded_version: Literal["v3", "v4"] = "v3",
        counterfactuals: list[str] | None = None,
        counterfactual_seed: int | None = None,
        counterfactual_items: int | None = None,
    ) -> None:
        super().__init__()
        if record_style not in RECORD_STYLES:
            raise ValueError(f"record_style must be one of {RECORD_STYLES}, got {record_style!r}")
        check_on_invalid(on_invalid)
        if batch_kind not in ("sft", "prompt"):
            raise ValueError(f"batch_kind must be 'sft' or 'prompt', got {batch_kind!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if embedded_ood_per_modality < 1:
            raise ValueError(f"embedded_ood_per_modality must be at least 1, got {embedded_ood_per_modality!r}")
        if embedded_version not in ("v3", "v4"):
            raise ValueError(f"embedded_version must be 'v3' or 'v4', got {embedded_version!r}")
        check_counterfactuals(counterfactuals)
        check_counterfactual_items(counterfactual_items)
        FieldMap.for_style(record_style, field_map)  # fail at construction on unknown fields
        ImageLimits(max_pixels=max_image_pixels)  # and on a bad limit
        check_path_map(image_path_map)
        if release_splits is not None and record_style != "pathmmu_release":
            raise ValueError(f"release_splits only apply to record_style 'pathmmu_release', not {record_style!r}")
        default_sizes = {EMBEDDED: EMBEDDED_SPLIT_SIZES, EMBEDDED_OOD: EMBEDDED_OOD_SPLIT_SIZES}.get(
            data_path, DEFAULT_SPLIT_SIZES
        )
        self.split_sizes = normalise_sizes(split_sizes if split_sizes is not None else default_sizes)
        for role, name in (("train_split", train_split), ("test_split", test_split), ("predict_split", predict_split)):
            if name not in self.split_sizes:
                raise ValueError(f"{role} {name!r} is not one of the splits {list(self.split_sizes)}")
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.validation_report: ValidationReport | None = None
        self.manifest: SplitManifest | None = None
        self.datasets: dict[str, RecordDataset] = {}

    @property
    def has_val(self) -> bool:
        return self.hparams.val_split is not None and self.hparams.val_split in self.split_sizes

    def records_path(self) -> str:
        """The records file, dataset folder or pattern to read; generates an embedded set on first use.

        The OOD set lists its options in the same fixed order as the embedded default, so a letter
        means the same position to a model trained on the default."""
        h = self.hparams
        if h.data_path == EMBEDDED:
            root = h.embedded_root or os.path.join(h.split_dir, EMBEDDED)
            if h.embedded_version == "v4":
                return str(Path(ensure_embedded_v4_dataset(root, h.seed, h.embedded_records)).resolve())
            return str(Path(ensure_embedded_dataset(root, h.seed, h.embedded_records)).resolve())
        if h.data_path == EMBEDDED_OOD:
            root = h.embedded_root or os.path.join(h.split_dir, EMBEDDED_OOD)
            path = ensure_ood_dataset(root, h.seed, h.embedded_ood_per_modality, option_order="fixed")
            return str(Path(path).resolve())
        return str(Path(h.data_path).resolve())

    def _asked(self, records_path: str) -> SplitManifest:
        return SplitManifest(source=records_path, seed=self.hparams.seed, sizes=self.split_sizes)

    def record_checks(self) -> RecordChecks:
        """What every record is checked for: its image (readable, within ``max_image_pixels``, its
        tokens within the tighter of ``max_length``/``max_prompt_length``) and its text (none of
        the processor's special tokens). Without a processor the token checks are skipped."""
        h = self.hparams
        if self.processor is None:
            log.warning("VQADataModule has no processor yet: image token counts and special tokens are not checked")
            return RecordChecks(image_limits=ImageLimits(max_pixels=h.max_image_pixels))
        limits = [(n, name) for n, name in ((h.max_length, "max_length"), (h.max_prompt_length, "max_prompt_length"))
                  if n is not None]  # fmt: skip
        max_tokens, limit_name = min(limits) if limits else (None, "")
        image_processor = getattr(self.processor, "image_processor", None)
        image_limits = ImageLimits(
            max_pixels=h.max_image_pixels,
            max_tokens=max_tokens,
            tokens_limit_name=limit_name,
            image_processor=image_processor if hasattr(image_processor, "merge_size") else None,  # Qwen-VL's
        )
        return RecordChecks(image_limits=image_limits, special_tokens=special_tokens_of(self.processor))

    def prepare_data(self) -> None:
        """Read and check the source, then write the splits (or confirm the existing ones match)."""
        path = self.records_path()
        asked = self._asked(path)
        check_manifest(self.hparams.split_dir, asked, check_fingerprint=False)  # refuse before a long read
        records, self.validation_report = load_records(
            path,
            self.hparams.record_style,
            self.hparams.field_map,
            image_root=self.hparams.image_root,
            image_dir=os.path.join(self.hparams.split_dir, "images"),
            on_invalid=self.hparams.on_invalid,
            checks=self.record_checks(),
            allow_absolute_image_paths=self.hparams.allow_absolute_image_paths,
            release_splits=self.hparams.release_splits,
            image_path_map=self.hparams.image_path_map,
        )
        log.info("%s", self.validation_report.summary())
        self.manifest = prepare_splits(records, self.hparams.split_dir, asked)

    def setup(self, stage: str | None = None) -> None:
        """Read the split files the stage needs (written by ``prepare_data``)."""
        if self.processor is None:
            raise RuntimeError(
                "VQADataModule.processor is None: set it to the backbone's processor before setup "
                "(the CLI does this; in code: datamodule.processor = model.backbone.processor)"
            )
        manifest = check_manifest(self.hparams.split_dir, self._asked(self.records_path()), check_fingerprint=False)
        if manifest is None:
            raise FileNotFoundError(
                f"no splits in {self.hparams.split_dir!r}: call prepare_data() first (the Trainer does this)"
            )
        self.manifest = manifest
        for name in self._splits_for(stage):
            if name not in self.datasets:
                self.datasets[name] = RecordDataset(read_split(self.hparams.split_dir, name))

    def _splits_for(self, stage: str | None) -> list[str]:
        h = self.hparams
        val = [h.val_split] if self.has_val else []
        if stage == "validate" and not val:
            raise ValueError(f"val_split {h.val_split!r} is not one of the splits {list(self.split_sizes)}")
        wanted = {"fit": [h.train_split, *val], "validate": val, "test": [h.test_split], "predict": [h.predict_split]}
        return wanted.get(stage, [h.train_split, *val, h.test_split, h.predict_split])

    def _split_batch_collator(self, split: str, kind: str) -> SFTCollator | PromptCollator:
        h = self.hparams
        name = os.path.join(h.split_dir, f"{split}.jsonl")
        if kind == "sft":
            return SFTCollator(self.processor, max_length=h.max_length, on_invalid=h.on_invalid, name=name)
        return PromptCollator(self.processor, max_prompt_length=h.max_prompt_length, on_invalid=h.on_invalid, name=name)

    def _loader(
        self, split: str, kind: str, batch_size: int, shuffle: bool, counterfactuals: bool = False
    ) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"split {split!r} is not loaded: call setup() for the stage that uses it first")
        dataset = self.datasets[split]
        loader_class = ResumableDataLoader if shuffle else DataLoader  # training resumes mid-epoch
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededSampler(dataset, self.hparams.seed) if shuffle else None,
            # Its own generator: starting an epoch never draws from the global RNG, whose state
            # RolloutCallback checkpoints, so a resumed run samples the completions the original did.
            generator=torch.Generator().manual_seed(self.hparams.seed),
            collate_fn=(
                self._counterfactual_collator(split, kind) if counterfactuals else self._split_batch_collator(split, kind)
            ),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, self.hparams.batch_kind, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of ``val_split`` like the training ones; ``[]`` (no validation) without a val split."""
        if not self.has_val:
            return []
        return self._loader(self.hparams.val_split, self.hparams.batch_kind, self._eval_batch_size, shuffle=False)

    def _counterfactual_collator(self, split: str, kind: str) -> CounterfactualCollator:
        h = self.hparams
        seed = h.seed if h.counterfactual_seed is None else h.counterfactual_seed
        base = self._split_batch_collator(split, kind)
        return CounterfactualCollator(
            base, self.datasets[split].records, h.counterfactuals, seed, items=h.counterfactual_items
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader(
            self.hparams.test_split, "prompt", self._eval_batch_size, shuffle=False,
            counterfactuals=bool(self.hparams.counterfactuals),
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split, "prompt", self._eval_batch_size, shuffle=False)
