"""Counterfactual test inputs: does the model look at the image, and does it read the options?

Each held-out question can be asked again under a counterfactual (issue 20; arXiv 2603.03437 and
2509.18234 found RL-tuned medical VLMs answering right with blank or swapped images):

- ``blank``: the image replaced by a uniform grey image of the same size, at the image's mean
  intensity (the mean over all its pixels and channels);
- ``swapped``: the image of another record of the same split whose answer (the option *text*) is
  different, picked by ``(seed, record id)`` alone, so every process of a distributed run picks the
  same one;
- ``no_image``: the prompt built without the image at all: the image-free baseline;
- ``shuffled``: the options in another order (a seeded permutation that moves at least one
  option), the answer letter following its text.

The variants are records (:func:`counterfactual_records`); the prompt collator reads the record's
``extra["counterfactual"]`` to blank the image or drop it, so a variant batch is built exactly as
an ordinary one. :class:`CounterfactualCollator` adds every variant of a test batch to it
(``batch["counterfactuals"][name]``), so the evaluation answers them on the same processes, in the
same batches, as the originals.

Each variant costs a full greedy answer per question. ``items`` limits the variants to a seeded
sample of the split (:func:`counterfactual_ids`), the same records for every variant and every stage
evaluated with the same seed, so the derived columns and the paired stage differences stay paired.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from pathvlm_lightning.data.records import VQARecord

COUNTERFACTUALS = ("blank", "swapped", "no_image", "shuffled")
#: ``extra`` key naming the counterfactual a record is (absent on the original).
VARIANT_KEY = "counterfactual"
#: ``extra`` key holding the original record's image path on a ``swapped`` record.
ORIGINAL_IMAGE_KEY = "original_image"


def check_counterfactuals(names: Sequence[str] | None) -> tuple[str, ...]:
    """``names`` as a tuple, refusing unknown or repeated ones.

    >>> check_counterfactuals(["blank", "shuffled"])
    ('blank', 'shuffled')
    """
    names = tuple(names or ())
    unknown = [name for name in names if name not in COUNTERFACTUALS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"counterfactuals must be distinct names among {list(COUNTERFACTUALS)}, got {list(names)}")
    return names


def blank_like(image: Image.Image) -> Image.Image:
    """A uniform grey RGB image of ``image``'s size at its mean intensity.

    >>> img = Image.new("RGB", (3, 2), (255, 0, 0))
    >>> blank = blank_like(img); blank.size, blank.getpixel((0, 0))
    ((3, 2), (85, 85, 85))
    """
    grey = int(round(float(np.asarray(image.convert("RGB"), dtype=np.float64).mean())))
    return Image.new("RGB", image.size, (grey, grey, grey))


def _rng(seed: int, record_id: str, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, salt, zlib.crc32(record_id.encode())])


def swap_partners(records: Sequence[VQARecord], seed: int) -> dict[str, str]:
    """Record id -> the image of another record whose answer text differs (and whose image is another
    file). Raises when a record has no such partner (a split with one answer class, or one image).

    >>> recs = [VQARecord(id=f"q{i}", image=f"{i}.png", question="?", options={"A": "x", "B": "y"},
    ...                   answer="AB"[i % 2]) for i in range(4)]
    >>> partners = swap_partners(recs, seed=0)
    >>> all(int(partners[f"q{i}"][0]) % 2 != i % 2 for i in range(4))
    True
    """
    by_text: dict[str, list[VQARecord]] = {}
    for record in records:
        by_text.setdefault(record.answer_text, []).append(record)
    partners = {}
    for record in records:
        candidates = [
            other.image for text, group in by_text.items() if text != record.answer_text
            for other in group if other.image != record.image
        ]
        if not candidates:
            raise ValueError(
                f"counterfactual 'swapped': record {record.id!r} has no other record with a different answer "
                f"(every record answers {record.answer_text!r}); drop 'swapped' for this split"
            )
        partners[record.id] = candidates[int(_rng(seed, record.id, 1).integers(len(candidates)))]
    return partners


def shuffle_options(record: VQARecord, seed: int) -> VQARecord:
    """``record`` with its option texts in another seeded order; the answer letter follows its text.

    >>> rec = VQARecord(id="q", image="x.png", question="?", options={"A": "a", "B": "b", "C": "c"}, answer="B")
    >>> moved = shuffle_options(rec, seed=0)
    >>> moved.answer_text, sorted(moved.options.values()), list(moved.options.values()) != ["a", "b", "c"]
    ('b', ['a', 'b', 'c'], True)
    """
    letters = list(record.options)
    texts = [record.options[letter] for letter in letters]
    rng = _rng(seed, record.id, 2)
    order = np.arange(len(texts))
    if len(texts) > 1:
        while (order == np.arange(len(texts))).all():
            order = rng.permutation(len(texts))
    options = {letter: texts[int(i)] for letter, i in zip(letters, order)}
    answer = letters[int(np.flatnonzero(order == letters.index(record.answer))[0])]
    return replace(record, options=options, answer=answer, extra={**record.extra, VARIANT_KEY: "shuffled"})


def check_counterfactual_items(items: int | None) -> None:
    """Refuses a sample size below 1 (None: every record)."""
    if items is not None and items < 1:
        raise ValueError(f"counterfactual_items must be at least 1 (or null: every test record), got {items!r}")


def counterfactual_ids(records: Sequence[VQARecord], items: int | None, seed: int) -> frozenset[str]:
    """The ids of the records that get counterfactual variants: all (``items`` None or >= the split),
    else a sample of ``items`` drawn by ``seed`` and the record ids alone (not their order), so every
    process and every stage with the same split and seed picks the same ones.

    >>> recs = [VQARecord(id=f"q{i}", image=f"{i}.png", question="?", options={"A": "x"}, answer="A") for i in range(10)]
    >>> picked = counterfactual_ids(recs, 4, seed=0)
    >>> len(picked), picked == counterfactual_ids(recs[::-1], 4, seed=0), len(counterfactual_ids(recs, None, 0))
    (4, True, 10)
    """
    check_counterfactual_items(items)
    ids = sorted(record.id for record in records)
    if items is None or items >= len(ids):
        return frozenset(ids)
    chosen = np.random.default_rng([seed, 3]).choice(len(ids), size=items, replace=False)
    return frozenset(ids[int(i)] for i in chosen)


def counterfactual_records(records: Sequence[VQARecord], name: str, seed: int) -> list[VQARecord]:
    """The records of one counterfactual, in the same order and with the same ids."""
    check_counterfactuals([name])
    if name == "shuffled":
        return [shuffle_options(record, seed) for record in records]
    if name == "swapped":
        partners = swap_partners(records, seed)
        return [
            replace(record, image=partners[record.id],
                    extra={**record.extra, VARIANT_KEY: name, ORIGINAL_IMAGE_KEY: record.image})
            for record in records
        ]
    return [replace(record, extra={**record.extra, VARIANT_KEY: name}) for record in records]


class CounterfactualCollator:
    """Wraps a prompt collator: each batch also carries ``counterfactuals[name]``, the ``name`` variant
    of the batch's records that are in the sample (``items``, see :func:`counterfactual_ids`),
    collated the same way (``{"prompt_inputs", "records"}``); no entry when none of them is.

    Swapped images are picked among the whole split, so a record's partner does not depend on the sample."""

    def __init__(
        self, collator: Any, records: Sequence[VQARecord], names: Sequence[str], seed: int, items: int | None = None
    ) -> None:
        self.collator = collator
        self.names = check_counterfactuals(names)
        sampled = counterfactual_ids(records, items, seed)
        self.variants = {
            name: {r.id: r for r in counterfactual_records(records, name, seed) if r.id in sampled}
            for name in self.names
        }

    def __call__(self, records: Sequence[VQARecord]) -> dict[str, Any]:
        batch = self.collator(records)
        batch["counterfactuals"] = {}
        for name, variants in self.variants.items():
            chosen = [variants[r.id] for r in batch["records"] if r.id in variants]
            if chosen:
                batch["counterfactuals"][name] = self.collator(chosen)
        return batch
