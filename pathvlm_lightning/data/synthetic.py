"""The built-in synthetic VQA sets: pathology-like tiles (the embedded default) and an out-of-domain set.

Records are written in the canonical PathMMU-style JSON-lines format (one object a line: ``id``,
``image`` relative to the file, ``question``, ``options`` A-D, ``answer`` letter, ``explanation``,
``subset`` = question type, ``modality``) plus ``extra.spec``, the drawing spec the answer was read from,
so analyses can trace any answer back to the image feature it depends on.

Question types are chosen so a tiny model learns each only partly in a short SFT (see
``shared/EMBEDDED-TASK-NOTES.md``): ``stain`` (mostly easy: H&E vs IHC, then how many nuclei are brown),
``nuclear_size`` and ``nuclear_density`` (medium: four grades each, which confound each other in the
total dark area), and ``grade`` (hard: a label set by both size and density). About 30% of tiles carry
two questions, so only image-grouped splits keep an image out of two segments.

Gold answers are always right; the SFT demonstrations, like chains of thought written by a teacher
model, have habits. By default 60% of the grade demonstrations open by restating the question and its
four options (:func:`add_verbose_demonstrations`): right, but too long for the demo's 64-token
completion budget, so a model that copies the habit is cut off before its answer. SFT copies it;
GRPO's format and accuracy rewards, scored under the same budget, can unlearn it. That is the signal
RL has here and SFT on the same demonstrations lacks (see the README's "What the embedded default
shows" for what it does and does not show). :func:`add_teacher_errors` (off by default) makes the
teacher grade two cases with an outdated rule instead. :func:`corrupt_letters` adds, for a chosen fraction of (training) records, a wrong
demonstration letter in ``extra["target_letter"]`` while the explanation and option text stay right,
like GPT-written chains of thought whose letter disagrees with their option text: an SFT target built
with :func:`demonstration_reference` copies that noise, a strict accuracy reward in GRPO corrects it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pathvlm_lightning.data.records import DEMONSTRATION_KEY, LETTERS, VQARecord
from pathvlm_lightning.data.synthetic_tiles import (
    CT_LESION_GRADES,
    DENSITY_GRADES,
    DERM_COLOURS,
    FUNDUS_SPOT_GRADES,
    SIZE_GRADES,
    STAIN_CLASSES,
    TileSpec,
    draw_ct,
    draw_dermoscopy,
    draw_fundus,
    generate_tile,
)

#: ``shuffled``: options in a random order per record, as in PathMMU. ``fixed``: options in the
#: classes' natural order (small < medium < large < very large, ...), so a letter always names the
#: same grade. The embedded default is ``fixed``: a from-scratch 0.8 M-parameter model on CPU did
#: not learn to look a shuffled option's letter up in the prompt within the demo budget (letter and
#: option text agreed in ~25-29% of its answers, chance level, while the option text was right in 48%),
#: which left accuracy below chance and gave RL nothing but noise to work on.
OptionOrder = Literal["shuffled", "fixed"]
EMBEDDED_VERSION = "embedded-v3"  # bump when the drawing or the questions change: cached folders are keyed by it
TARGET_LETTER_KEY = "target_letter"
GRADE_LABELS = ("benign-appearing", "hyperplastic", "atypical", "high-grade")


@dataclass(frozen=True)
class QuestionType:
    """One kind of question: how it is asked, its four option texts, and how the image answers it."""

    name: str  # the records' ``subset``
    phrasings: tuple[str, ...]  # one is picked per record
    classes: tuple[str, ...]  # the four option texts
    answer: Callable[[Any], int]  # spec -> index into ``classes``
    explain: Callable[[Any, str], str]  # (spec, answer text) -> explanation naming the feature seen


_STAIN_SEEN = {
    "H&E": ("The background is pink and the nuclei are purple", "Pink eosin with purple hematoxylin is an H&E stain"),
    "IHC, DAB-negative": (
        "The background is pale blue and every nucleus is blue, none brown",
        "A blue counterstain without brown DAB is a negative IHC stain",
    ),
    "IHC, partly DAB-positive": (
        "The background is pale blue; some nuclei are brown but most are blue",
        "Brown DAB in a minority of nuclei is partial IHC positivity",
    ),
    "IHC, mostly DAB-positive": (
        "The background is pale blue and most nuclei are brown",
        "Brown DAB in most nuclei is diffuse IHC positivity",
    ),
}
_SIZE_SEEN = ("tiny dots about 5 pixels across", "modest ovals about 7 pixels across",
              "large ovals about 10 pixels across", "very large ovals about 14 pixels across")  # fmt: skip
_DENSITY_SEEN = ("Only a handful of nuclei lie far apart", "About ten nuclei lie with clear space between them",
                 "Around twenty nuclei lie close together", "About thirty nuclei crowd the tile")  # fmt: skip
_GRADE_RULES = (
    "Nuclei that are neither enlarged nor crowded look benign",
    "Crowded nuclei that are not enlarged suggest hyperplasia",
    "Enlarged nuclei that are not crowded suggest atypia",
    "Enlarged and crowded nuclei suggest a high-grade lesion",
)


def _grade_index(spec: TileSpec) -> int:
    """Two binary features: enlarged = large or very large; crowded = dense or very dense."""
    return 2 * (spec.size_grade >= 2) + (spec.density_grade >= 2)


#: The teacher's outdated criterion: it grades by nuclear enlargement alone, ignoring crowding, so the
#: crowded-not-enlarged picture (hyperplastic) becomes benign-appearing and the enlarged-and-crowded one
#: (high-grade) becomes atypical. The other two cases come out right under either rule.
_OUTDATED_GRADE = {1: 0, 3: 2}
_OUTDATED_RULES = {
    1: "Nuclei that are not enlarged look benign",
    3: "Enlarged nuclei indicate atypia",
}
#: The embedded default's teacher applies the outdated criterion to this fraction of those cases (off:
#: at the demo's GRPO budget the tiny policy did not unlearn it, so it only lowered every stage alike).
EMBEDDED_TEACHER_ERROR_RATE = 0.0
#: ... and opens this fraction of its grade chains by restating the question and all four options.
EMBEDDED_VERBOSE_RATE = 0.6
_GRADE_PREFACE = (
    "The question asks which description fits the tile best, and the options are benign-appearing, "
    "hyperplastic, atypical and high-grade, so nuclear size and crowding must both be judged first. "
)


def _teacher_grade_demonstration(spec: TileSpec, options: dict[str, str]) -> str:
    """A teacher demonstration that sees size and density right but grades with the outdated rule."""
    size, density = SIZE_GRADES[spec.size_grade], DENSITY_GRADES[spec.density_grade]
    enlarged = "enlarged" if spec.size_grade >= 2 else "not enlarged"
    crowded = "crowded" if spec.density_grade >= 2 else "not crowded"
    graded = GRADE_LABELS[_OUTDATED_GRADE[_grade_index(spec)]]
    letter = next(letter for letter, text in options.items() if text == graded)
    think = (
        f"The nuclei are {size}, so {enlarged}, and {density}, so {crowded}. "
        f"{_OUTDATED_RULES[_grade_index(spec)]}, so the answer is {graded}."
    )
    return f"<think>{think}</think><answer>{letter}) {graded}</answer>"


def add_teacher_errors(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Give ``rate`` of the hyperplastic and high-grade records a teacher demonstration with the
    outdated criterion (``extra["demonstration"]``, ``extra["teacher_error"] = True``).

    ``answer`` and ``explanation`` stay right: evaluation, rewards and GRPO grade against the gold
    answer, only SFT imitates the demonstration. This is the signal RL can use and SFT cannot: in a
    real pipeline the chains of thought come from a teacher model that is sometimes systematically
    wrong, while the gold labels are right. Whether a record is hit depends only on ``(seed, id)``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"add_teacher_errors: rate must be in [0, 1], got {rate!r}")
    for record in records:
        spec = record["extra"].get("spec")
        if record["subset"] != "grade" or spec is None:
            continue
        tile = TileSpec(**spec)
        if _grade_index(tile) not in _OUTDATED_GRADE:
            continue
        if np.random.default_rng([seed, 7, zlib.crc32(record["id"].encode())]).random() < rate:
            record["extra"][DEMONSTRATION_KEY] = _teacher_grade_demonstration(tile, record["options"])
            record["extra"]["teacher_error"] = True
    return records


def add_verbose_demonstrations(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Give ``rate`` of the grade records a teacher demonstration that first restates the question
    and its options (``extra["demonstration"]``, ``extra["teacher_verbose"] = True``).

    The reasoning and the answer stay right; the chain is just long: about 88 tokens against 45, so
    under the demo's 64-token completion budget it is cut before its ``<answer>``. SFT copies the
    habit (greedy decoding follows the majority style), and the format and accuracy rewards, scored
    under the same budget, teach GRPO to answer within it, as RL shortened the paper's outputs (base
    210 tokens, Beta 80). Whether a record is hit depends only on ``(seed, id)``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"add_verbose_demonstrations: rate must be in [0, 1], got {rate!r}")
    for record in records:
        if record["subset"] != "grade":
            continue
        if np.random.default_rng([seed, 11, zlib.crc32(record["id"].encode())]).random() < rate:
            written = record["extra"].get(DEMONSTRATION_KEY) or (
                f"<think>{record['explanation']}</think>"
                f"<answer>{record['answer']}) {record['options'][record['answer']]}</answer>"
            )
            record["extra"][DEMONSTRATION_KEY] = written.replace("<think>", "<think>" + _GRADE_PREFACE, 1)
            record["extra"]["teacher_verbose"] = True
    return records


def _explain_grade(spec: TileSpec, answer: str) -> str:
    size, density = SIZE_GRADES[spec.size_grade], DENSITY_GRADES[spec.density_grade]
    enlarged = "enlarged" if spec.size_grade >= 2 else "not enlarged"
    crowded = "crowded" if spec.density_grade >= 2 else "not crowded"
    return (
        f"The nuclei are {size}, so {enlarged}, and {density}, so {crowded}. "
        f"{_GRADE_RULES[_grade_index(spec)]}, so the answer is {answer}."
    )


QUESTION_TYPES: tuple[QuestionType, ...] = (
    QuestionType(
        name="stain",
        phrasings=(
            "Which staining pattern does this tissue tile show?",
            "What stain and DAB result does this image show?",
        ),
        classes=STAIN_CLASSES,
        answer=lambda spec: STAIN_CLASSES.index(spec.stain),
        explain=lambda spec, answer: "{}. {}, so the answer is {}.".format(*_STAIN_SEEN[spec.stain], answer),
    ),
    QuestionType(
        name="nuclear_size",
        phrasings=("How large are the nuclei in this tile?", "What is the nuclear size grade of this tissue?"),
        classes=SIZE_GRADES,
        answer=lambda spec: spec.size_grade,
        explain=lambda spec, answer: (
            f"The nuclei are {_SIZE_SEEN[spec.size_grade]}. Nuclear size is graded small, medium, large or very "
            f"large by diameter, so the answer is {answer}."
        ),
    ),
    QuestionType(
        name="nuclear_density",
        phrasings=("How densely packed are the nuclei in this tile?", "What is the nuclear density of this tissue?"),
        classes=DENSITY_GRADES,
        answer=lambda spec: spec.density_grade,
        explain=lambda spec, answer: (
            f"{_DENSITY_SEEN[spec.density_grade]}. Density is graded by how many nuclei fill the tile, "
            f"so the answer is {answer}."
        ),
    ),
    QuestionType(
        name="grade",
        phrasings=(
            "Which description best fits this tissue?",
            "Judging nuclear size and crowding, what does this tile show?",
        ),
        classes=GRADE_LABELS,
        answer=_grade_index,
        explain=_explain_grade,
    ),
)


def generate_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int,
    share_fraction: float = 0.3,
    option_order: OptionOrder = "shuffled",
    teacher_error_rate: float = 0.0,
    verbose_rate: float = 0.0,
) -> Path:
    """Write ``num_records`` tile questions and their PNGs into ``out_dir``; return its ``records.jsonl``.

    Deterministic in ``seed`` (byte-identical files). Tile ``t`` depends only on ``(seed, t)``, so a
    smaller set is a prefix of a larger one. A ``share_fraction`` of tiles get two questions of
    different types about the same image. ``option_order`` (see ``OptionOrder``) changes only the
    options' letters, never the images or which class is right.
    """
    if num_records < 1:
        raise ValueError(f"generate_dataset: num_records must be >= 1, got {num_records!r}")
    if not 0.0 <= share_fraction <= 1.0:
        raise ValueError(f"generate_dataset: share_fraction must be in [0, 1], got {share_fraction!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    tile = 0
    while len(records) < num_records:
        rng = np.random.default_rng([seed, tile])
        spec = TileSpec.sample(rng)
        image = f"images/{tile:06d}.png"
        generate_tile(spec, rng).save(out / image, compress_level=1)
        wanted = 2 if rng.random() < share_fraction else 1
        for q, index in enumerate(rng.permutation(len(QUESTION_TYPES))[: min(wanted, num_records - len(records))]):
            records.append(
                _record(
                    QUESTION_TYPES[index], spec, rng, f"syn-{tile:06d}-{q}", image, spec.modality, asdict(spec), option_order
                )
            )
        tile += 1
    records = add_teacher_errors(records, teacher_error_rate, seed)
    return _write_records(out, add_verbose_demonstrations(records, verbose_rate, seed))


_SPOTS_SEEN = ("no", "two to four", "six to nine", "over a dozen")
OOD_MODALITIES: dict[str, tuple[QuestionType, Callable[[int, np.random.Generator], Any]]] = {
    "synthetic-CT": (
        QuestionType(
            name="nodule_size",
            phrasings=("How large is the bright nodule in the lung of this CT slice?",),
            classes=CT_LESION_GRADES,
            answer=lambda grade: grade,
            explain=lambda grade, answer: (
                f"A bright round nodule sits in a dark lung, about {(5, 9, 14, 21)[grade]} pixels across. "
                f"Nodule size is graded by diameter, so the answer is {answer}."
            ),
        ),
        draw_ct,
    ),
    "synthetic-dermoscopy": (
        QuestionType(
            name="lesion_colour",
            phrasings=("What is the main colour of this skin lesion?",),
            classes=tuple(DERM_COLOURS),
            answer=lambda index: index,
            explain=lambda index, answer: (
                f"The lesion is {answer} against the lighter skin. Its dominant pigment decides the colour, "
                f"so the answer is {answer}."
            ),
        ),
        lambda index, rng: draw_dermoscopy(tuple(DERM_COLOURS)[index], rng),
    ),
    "synthetic-fundus": (
        QuestionType(
            name="exudate_count",
            phrasings=("How many bright yellow spots (exudates) are on this retina?",),
            classes=FUNDUS_SPOT_GRADES,
            answer=lambda grade: grade,
            explain=lambda grade, answer: (
                f"Apart from the optic disc, the retina shows {_SPOTS_SEEN[grade]} bright yellow spots. "
                f"Exudates are graded by count, so the answer is {answer}."
            ),
        ),
        draw_fundus,
    ),
}


def generate_ood_dataset(
    out_dir: str | os.PathLike, per_modality: int, seed: int, option_order: OptionOrder = "shuffled"
) -> Path:
    """Write ``per_modality`` questions (one image each, classes balanced) for every synthetic
    out-of-domain modality into ``out_dir``; return its ``records.jsonl``. Deterministic in ``seed``."""
    if per_modality < 1:
        raise ValueError(f"generate_ood_dataset: per_modality must be >= 1, got {per_modality!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for m, (modality, (question, draw)) in enumerate(OOD_MODALITIES.items()):
        short = modality.removeprefix("synthetic-").lower()
        for i in range(per_modality):
            rng = np.random.default_rng([seed, 1000 + m, i])
            cls = i % len(question.classes)
            image = f"images/{short}-{i:05d}.png"
            draw(cls, rng).save(out / image, compress_level=1)
            records.append(
                _record(question, cls, rng, f"ood-{short}-{i:05d}", image, modality, {"class_index": cls}, option_order)
            )
    return _write_records(out, records)


def ensure_embedded_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    num_records: int = 6000,
    option_order: OptionOrder = "fixed",
    teacher_error_rate: float = EMBEDDED_TEACHER_ERROR_RATE,
    verbose_rate: float = EMBEDDED_VERBOSE_RATE,
) -> str:
    """Path of ``<root>/embedded-v3-{option_order}-t{rate}-v{verbose}-seed{seed}-n{num_records}/records.jsonl``,
    generated on first use. The embedded default lists options in a fixed order (see ``OptionOrder``),
    and 60% of its grade demonstrations restate the question first (:func:`add_verbose_demonstrations`);
    the outdated-rule errors (:func:`add_teacher_errors`) are off by default."""
    folder = Path(root) / (
        f"{EMBEDDED_VERSION}-{option_order}-t{teacher_error_rate:g}-v{verbose_rate:g}-seed{seed}-n{num_records}"
    )
    return str(
        _ensure(
            folder,
            lambda tmp: generate_dataset(
                tmp,
                num_records,
                seed,
                option_order=option_order,
                teacher_error_rate=teacher_error_rate,
                verbose_rate=verbose_rate,
            ),
        )
    )


def ensure_ood_dataset(
    root: str | os.PathLike, seed: int = 0, per_modality: int = 200, option_order: OptionOrder = "fixed"
) -> str:
    """Path of ``<root>/ood-v1-{option_order}-seed{seed}-n{per_modality}/records.jsonl``, generated on first use."""
    folder = Path(root) / f"ood-v1-{option_order}-seed{seed}-n{per_modality}"
    return str(_ensure(folder, lambda tmp: generate_ood_dataset(tmp, per_modality, seed, option_order=option_order)))


def corrupt_letters(records: Sequence[VQARecord], rate: float, seed: int) -> list[VQARecord]:
    """Give about ``rate`` of the records a wrong demonstration letter in ``extra["target_letter"]``.

    ``answer``, options and explanation stay correct, so evaluation and rewards are unaffected; only an
    SFT target built with :func:`demonstration_reference` changes (e.g. ``C) large`` where ``large`` is
    option B). Whether a record is hit depends only on ``(seed, record.id)``, not on its neighbours.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corrupt_letters: rate must be in [0, 1], got {rate!r}")
    corrupted = []
    for record in records:
        rng = np.random.default_rng([seed, zlib.crc32(record.id.encode())])
        if rng.random() < rate:
            wrong = [letter for letter in record.options if letter != record.answer]
            record = replace(record, extra={**record.extra, TARGET_LETTER_KEY: wrong[rng.integers(len(wrong))]})
        corrupted.append(record)
    return corrupted


def demonstration_reference(record: VQARecord) -> str:
    """The answer an SFT demonstration writes: the correct option text behind the (maybe corrupted)
    demonstration letter, e.g. ``C) large``; equal to ``record.reference`` for a clean record."""
    return f"{record.extra.get(TARGET_LETTER_KEY, record.answer)}) {record.answer_text}"


def _record(
    question: QuestionType,
    spec: Any,
    rng: np.random.Generator,
    record_id: str,
    image: str,
    modality: str,
    spec_dict: dict,
    option_order: OptionOrder = "shuffled",
) -> dict:
    """One record dict; options shuffled by ``rng`` or, with ``fixed``, in the classes' own order."""
    order = rng.permutation(len(question.classes))  # order[k] = class shown as letter k
    if option_order == "fixed":  # the permutation is still drawn so the rest of the stream is unchanged
        order = np.arange(len(question.classes))
    correct = question.answer(spec)
    answer_text = question.classes[correct]
    return {
        "id": record_id,
        "image": image,
        "question": question.phrasings[rng.integers(len(question.phrasings))],
        "options": {letter: question.classes[c] for letter, c in zip(LETTERS, order)},
        "answer": LETTERS[int(np.flatnonzero(order == correct)[0])],
        "explanation": question.explain(spec, answer_text),
        "subset": question.name,
        "modality": modality,
        "extra": {"spec": spec_dict},
    }


def _write_records(out: Path, records: list[dict]) -> Path:
    path = out / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _ensure(folder: Path, build: Callable[[Path], Path]) -> Path:
    """Build into a hidden temporary sibling, then rename it into place: a crash never leaves a half
    dataset under ``folder``, and when two processes race the first rename wins and both use it."""
    records = folder / "records.jsonl"
    if records.is_file():
        return records
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        try:
            os.rename(tmp, folder)
        except OSError as err:
            if not records.is_file():
                raise OSError(
                    f"cannot move the generated dataset to {folder}: it exists without records.jsonl"
                ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return records
