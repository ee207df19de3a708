"""Greedy evaluation shared by the SFT and GRPO modules: ``test`` and ``predict``.

Each record is answered once with greedy decoding; the answer is graded with the same rules as the
accuracy and format rewards (``eval/scoring.py``). ``test`` logs accuracy overall and per question
type (``subset``) and ``modality``, format compliance and average output tokens, and writes every
prediction with its reasoning to JSONL.

When the test batches carry counterfactual variants (``batch["counterfactuals"]``, see
``data/counterfactual.py``), each is answered too: ``test/<variant>/accuracy`` and
``/format_compliance`` are logged with ``test/image_reliance`` and ``test/option_consistency``
(``eval/counterfactual.py``), and each variant's predictions go beside the original's
(``predictions_test.<variant>.jsonl``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import torch
import torch.distributed as dist
from torchmetrics.aggregation import MeanMetric

from pathvlm_lightning.backbone.decoding import decode_completions
from pathvlm_lightning.eval.counterfactual import stage_row, variant_path
from pathvlm_lightning.eval.scoring import Prediction, score_prediction, summarize, summarize_by


class GenerationEvaluation:
    """Mixin for a LightningModule with ``self.backbone`` and ``self.hparams.eval_max_new_tokens``."""

    def _init_evaluation(self, eval_max_new_tokens: int, predictions_path: str | None) -> None:
        self.eval_max_new_tokens = eval_max_new_tokens
        self.predictions_path = predictions_path
        self.test_accuracy = MeanMetric()
        self._predictions: list[Prediction] = []
        self._variant_predictions: dict[str, list[Prediction]] = {}

    @torch.no_grad()
    def answer_batch(self, batch: dict) -> list[Prediction]:
        backbone = self.backbone
        ids = backbone.generate(
            batch["prompt_inputs"], num_generations=1, max_new_tokens=self.eval_max_new_tokens, do_sample=False
        )  # [B, L]
        mask, truncated = backbone.completion_mask(ids)
        texts = decode_completions(backbone.processor, ids, mask)
        return [
            score_prediction(record, text, int(m.sum()), bool(t))
            for record, text, m, t in zip(batch["records"], texts, mask, truncated)
        ]

    def on_test_epoch_start(self) -> None:
        self._predictions = []
        self._variant_predictions = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds = self.answer_batch(batch)
        self._predictions.extend(preds)
        self.test_accuracy.update(torch.tensor([float(p.correct) for p in preds]))
        for name, variant in batch.get("counterfactuals", {}).items():
            self._variant_predictions.setdefault(name, []).extend(self.answer_batch(variant))

    def on_test_epoch_end(self) -> None:
        self.log("test/accuracy", self.test_accuracy.compute(), prog_bar=True)
        self.test_accuracy.reset()
        predictions = _gather(self._predictions)
        overall = summarize(predictions)
        self.log("test/format_compliance", overall.format_compliance)
        self.log("test/avg_output_tokens", overall.avg_output_tokens)
        self.log("test/count", float(overall.count))
        for key in ("subset", "modality"):
            for name, s in summarize_by(predictions, key).items():
                self.log(f"test/accuracy_{key}/{name}", s.accuracy)
        variants = {name: _gather(preds) for name, preds in sorted(self._variant_predictions.items())}
        if variants:
            row = stage_row(predictions, variants)
            for name in variants:
                self.log(f"test/{name}/accuracy", float(row[f"{name}_accuracy"]))
                self.log(f"test/{name}/format_compliance", float(row["format"][name]))
            for key in ("image_reliance", "option_consistency"):
                if row.get(key) is not None:
                    self.log(f"test/{key}", float(row[key]))
        if self.trainer.is_global_zero:
            path = self._predictions_file("test")
            _write_jsonl(path, predictions)
            self.print(f"wrote {overall.count} predictions to {path}")
            for name, preds in variants.items():
                _write_jsonl(variant_path(path, name), preds)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return [p.to_json() for p in self.answer_batch(batch)]

    def _predictions_file(self, stage: str) -> Path:
        if self.predictions_path:
            return Path(self.predictions_path)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / f"predictions_{stage}.jsonl"


def _gather(predictions: list[Prediction]) -> list[Prediction]:
    """All ranks' predictions (every rank gets the full list), each record once: a distributed
    sampler pads the last batch with repeats, which must not count twice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(predictions)
    parts: list[list[Prediction] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, predictions)
    unique: dict[str, Prediction] = {}
    for part in parts:
        for p in part or []:
            unique.setdefault(p.id, p)
    return list(unique.values())


def _write_jsonl(path: Path, predictions: list[Prediction]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for p in predictions:
            f.write(json.dumps(p.to_json()) + "\n")
    os.replace(tmp, path)
