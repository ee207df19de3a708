"""The cross-modal process reward as callbacks: the judge over HTTP, or the offline rule stand-in.

``ProcessReward`` sends this rank's completions to the judge in ``begin`` (on a background event
loop, so the reference forward runs meanwhile) and collects the scores in ``score``. Judge faults
never reach training: they become the paper's fallback scores and show up in ``metrics()``.
Rejected credentials are the one fault that stops the fit (:class:`JudgeAuthError`), decided
the same way on every rank. ``RubricProcessReward`` scores the same rubric with rules, offline
and for free (a stand-in, not GPT-4o); it is the embedded default for stage 3 so the pipeline
runs with no API key.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from pathvlm_lightning.callbacks.reward import RewardCallback
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.rollout import Rollout
from pathvlm_lightning.rewards.judge.background import BackgroundLoop
from pathvlm_lightning.rewards.judge.client import JudgeAuthError, JudgeClient
from pathvlm_lightning.rewards.judge.config import JudgeConfig
from pathvlm_lightning.rewards.judge.counters import FAULTS, JudgeResult, summarize
from pathvlm_lightning.rewards.judge.request import JudgeItem
from pathvlm_lightning.rewards.rubric import rubric_scores


class ProcessReward(RewardCallback):
    """Integrity and knowledge scores from an OpenAI-compatible judge (GPT-4o by default); the
    reward is their mean, in [0, 1].

    The API key is read from the environment variable named by ``judge.api_key_env`` when the
    judge starts (``setup``, or the first ``begin``); it is never stored on this callback, in its
    state or in logs. The budget spent so far is the only state, so a resumed run keeps its budget.
    Under DDP every rank judges its own completions with its own budget counters, and the
    checkpoint keeps rank 0's.

    The fit stops with :class:`JudgeAuthError` (naming the key's variable, never its value) when
    the variable is unset at ``setup``, or once ``judge.max_auth_failures`` requests in a row were
    rejected with 401/403: on every rank as soon as one rank sees it (a collective per step), so
    no rank is left waiting on the others. Each step waits at most ``judge.step_deadline_s`` for
    the judge; how long ``score`` blocked on it (seconds, after the reference forward ran
    meanwhile) is logged as ``process/step_wait_max`` (the slowest rank's).

    Args:
        judge: server, model, retries, concurrency, budget and cache (see :class:`JudgeConfig`).
        weight: multiplies the score before rewards are summed.
        name: logged as ``reward/<name>``; defaults to ``"process"``.
    """

    default_name = "process"
    summed_metrics = frozenset(
        {"requests", "retries", "cache_hits", "fallbacks", "prompt_tokens", "completion_tokens", "retry_wait"}
        | {f"fallback/{cause}" for cause in FAULTS}
    )

    def __init__(self, judge: JudgeConfig | None = None, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        if judge is not None and not isinstance(judge, JudgeConfig):
            raise ValueError(f"ProcessReward: judge must be a JudgeConfig, got {type(judge).__name__}")
        self.judge = judge or JudgeConfig()
        self._client: JudgeClient | None = None
        self._loop: BackgroundLoop | None = None
        self._pending: tuple[Rollout, concurrent.futures.Future[list[JudgeResult]]] | None = None
        self._budget_state: dict[str, int] = {}
        self._metrics: dict[str, float] = {}
        self._trainer: Trainer | None = None  # for the rank-consistent decisions; set in setup

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight}, judge={self.judge!r})"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        error: ValueError | None = None
        try:
            self._start()
        except ValueError as err:  # the key's variable is unset on this rank
            error = err
        if not self._all_ranks(error is None):
            raise error or JudgeAuthError(
                f"judge: the environment variable {self.judge.api_key_env} is not set on another rank"
            )

    def _start(self) -> None:
        """Build the judge client (checks the key's variable is set) and its event loop thread."""
        if self._client is None:
            self._client = JudgeClient(self.judge)
            self._client.budget.load_state_dict(self._budget_state)
            self._loop = BackgroundLoop(name=f"judge-{self.name}")

    def _all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (one all-reduce under a distributed strategy)."""
        if self._trainer is None:
            return ok
        return self._trainer.strategy.reduce_boolean_decision(ok, all=True)

    @override
    def begin(self, rollout: Rollout, pl_module: Any) -> None:
        self._start()
        assert self._client is not None and self._loop is not None
        items = [JudgeItem.of(rollout.record_of(i), text) for i, text in enumerate(rollout.completion_texts)]
        judged = self._client.score_many(items, deadline_s=self.judge.step_deadline_s)
        self._pending = (rollout, self._loop.submit(judged))

    @override
    def score(self, rollout: Rollout, pl_module: Any) -> torch.Tensor:
        if self._pending is None or self._pending[0] is not rollout:
            self.begin(rollout, pl_module)
        assert self._pending is not None and self._client is not None
        waiting = time.monotonic()
        results = self._pending[1].result()  # within judge.step_deadline_s of begin
        waited = time.monotonic() - waiting
        self._pending = None
        self._metrics = {**summarize(results), "step_wait_max": waited}
        rejected = self._client.auth_rejected()
        if not self._all_ranks(not rejected):
            raise self._client.auth_error(on_this_rank=rejected)
        return torch.tensor([r.scores.reward for r in results], dtype=torch.float32)  # [B*G]

    @override
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._client.budget.state_dict() if self._client is not None else dict(self._budget_state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._budget_state = {
            "spent_requests": int(state_dict.get("spent_requests", 0)),
            "spent_tokens": int(state_dict.get("spent_tokens", 0)),
        }
        if self._client is not None:
            self._client.budget.load_state_dict(self._budget_state)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.close()
        self._trainer = None

    def close(self) -> None:
        """Stop the event loop thread and close the cache; the next ``begin`` starts them again."""
        if self._client is not None:
            self._budget_state = self._client.budget.state_dict()
            self._client.close()
            self._client = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._pending = None


class RubricProcessReward(RewardCallback):
    """The process rubric checked by rules (:func:`pathvlm_lightning.rewards.rubric.rubric_scores`):
    a cheap, offline stand-in for the GPT-4o judge, NOT the paper's reward. It sees words only,
    never the image. Logs the mean integrity and knowledge like :class:`ProcessReward`.

    Args:
        weight: multiplies the score before rewards are summed.
        name: logged as ``reward/<name>``; defaults to ``"process"``.
    """

    default_name = "process"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self._metrics: dict[str, float] = {}

    @override
    def score(self, rollout: Rollout, pl_module: Any) -> torch.Tensor:
        pairs = [rubric_scores(text, rollout.record_of(i)) for i, text in enumerate(rollout.completion_texts)]
        scores = torch.tensor(pairs, dtype=torch.float32)  # [B*G, 2] integrity, knowledge
        self._metrics = {"integrity": scores[:, 0].mean().item(), "knowledge": scores[:, 1].mean().item()}
        return scores.mean(dim=1)  # [B*G]

    @override
    def score_text(self, completion: str, record: VQARecord) -> float:
        integrity, knowledge = rubric_scores(completion, record)
        return (integrity + knowledge) / 2

    @override
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)
