"""Score one generated answer against its record, and summarise many into the paper's table rows.

Pure Python: used by the LightningModules' ``test``/``predict`` steps, the pipeline runner and the
judge-consistency command alike, so every table in the project is computed the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.accuracy import accuracy_reward
from pathvlm_lightning.rewards.completion import ParsedCompletion, as_parsed
from pathvlm_lightning.rewards.format import format_reward


@dataclass
class Prediction:
    """One record answered by the model, as written to ``predictions_*.jsonl``."""

    id: str
    image: str  # the record's image path, so a judge can re-read it from this file alone
    subset: str
    modality: str
    question: str
    options: dict[str, str]
    answer: str  # reference letter
    completion: str  # the full generated text, reasoning included
    predicted_letter: str | None
    correct: bool
    format_ok: bool
    output_tokens: int
    truncated: bool = False
    spec: dict | None = None  # what the image truly shows, when the data knows it (embedded: extra["spec"])

    def to_json(self) -> dict:
        return asdict(self)


def score_prediction(
    record: VQARecord,
    completion: str | ParsedCompletion,
    output_tokens: int,
    truncated: bool = False,
    letter_only: bool = False,
) -> Prediction:
    """Grade ``completion`` with the accuracy and format rewards, reading its one parse
    (:mod:`pathvlm_lightning.rewards.completion`; a string is parsed here, once)."""
    parsed = as_parsed(completion, record.options)
    correct = accuracy_reward(parsed, record.answer, record.options, letter_only=letter_only) == 1.0
    return Prediction(
        id=record.id,
        image=record.image,
        subset=record.subset,
        modality=record.modality,
        question=record.question,
        options=dict(record.options),
        answer=record.answer,
        completion=parsed.text,
        predicted_letter=parsed.answer.letter,
        correct=correct,
        format_ok=format_reward(parsed) == 1.0,
        output_tokens=int(output_tokens),
        truncated=bool(truncated),
        spec=dict(record.extra["spec"]) if isinstance(record.extra.get("spec"), dict) else None,
    )


@dataclass(frozen=True)
class Summary:
    count: int
    accuracy: float
    format_compliance: float
    avg_output_tokens: float


def summarize(predictions: Iterable[Prediction]) -> Summary:
    preds = list(predictions)
    if not preds:
        raise ValueError("summarize: no predictions to summarise (empty evaluation split?)")
    n = len(preds)
    return Summary(
        count=n,
        accuracy=sum(p.correct for p in preds) / n,
        format_compliance=sum(p.format_ok for p in preds) / n,
        avg_output_tokens=sum(p.output_tokens for p in preds) / n,
    )


def summarize_by(predictions: Iterable[Prediction], key: str) -> dict[str, Summary]:
    """One summary per value of ``key`` (``"subset"`` or ``"modality"``), sorted by that value."""
    groups: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        groups[getattr(p, key) or "-"].append(p)
    return {name: summarize(groups[name]) for name in sorted(groups)}
