"""``torchrun --nproc_per_node 2 tests/counterfactual_dist_worker.py OUT``: the scripted colour reader of
tests/test_counterfactual.py answering the counterfactual variants under DDP (gloo); rank 0 writes
the test metrics to OUT/metrics.json and the predictions under OUT/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from pathvlm_lightning.backbone import Backbone
from pathvlm_lightning.data.counterfactual import COUNTERFACTUALS
from pathvlm_lightning.data.datamodule import VQADataModule
from tests.test_counterfactual import ScriptedReader, write_colour_set
from tests.worker_exit import exit_after_work


def main(out: Path) -> None:
    processor = Backbone("embedded-tiny", seed=0).processor
    records_path, _ = write_colour_set(out / "data")
    datamodule = VQADataModule(
        data_path=str(records_path), split_dir=str(out / "splits"), split_sizes={"test": None},
        train_split="test", val_split=None, test_split="test", eval_batch_size=1, processor=processor,
        counterfactuals=list(COUNTERFACTUALS),
    )
    module = ScriptedReader(processor)
    module.predictions_path = str(out / "predictions_test.jsonl")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out))
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_after_work()  # tests/worker_exit.py: no interpreter teardown
