"""The staged pipeline (Alpha -> Beta -> PathVLM-R1 and the controls) as one resumable command."""

from pathvlm_lightning.pipeline.plan import Plan, PlanError, Stage, load_plan
from pathvlm_lightning.pipeline.runner import PipelineRunner, StageFailed

__all__ = ["Plan", "PlanError", "PipelineRunner", "Stage", "StageFailed", "load_plan"]
