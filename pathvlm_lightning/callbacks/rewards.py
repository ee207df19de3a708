"""Reward callbacks: the base class and every packaged reward, thin adapters over ``rewards/``.

The pure scoring lives in :mod:`pathvlm_lightning.rewards`; users' own rewards live in the
repository's root ``callbacks/`` folder (``callbacks/conciseness.py`` is the example). A reward
reads the rollout's :class:`~pathvlm_lightning.grpo.stages.Samples`, in which every completion is
already parsed once (:mod:`pathvlm_lightning.rewards.completion`), and returns one score per
completion.

Rewards are parts of ``GRPOModule`` (the list ``model.init_args.rewards``); the module hands them to
Lightning and calls them itself, in a fixed order (sampling -> ``begin`` on every reward -> reference
forward -> ``score`` on every reward, rewards in the order of their names), so the order they are
listed in YAML never matters.
``begin`` lets a slow reward (an HTTP judge) start its work before the reference forward and
collect it in ``score``.

- :class:`FormatReward`, :class:`AccuracyReward`: the paper's two rule rewards;
- :class:`ProcessReward`: the cross-modal process reward, the judge over HTTP. It sends this rank's
  completions to the judge in ``begin`` (on a background event loop, so the reference forward runs
  meanwhile) and collects the scores in ``score``. Judge faults never reach training: they become
  the paper's fallback scores and show up in ``metrics()``. Rejected credentials are the one fault
  that stops the fit (:class:`JudgeAuthError`), decided the same way on every rank;
- :class:`RubricProcessReward`: the same rubric with rules, offline and for free (a stand-in, not
  GPT-4o); the embedded default for stage 3 so the pipeline runs with no API key;
- :class:`TruthProcessReward`: the image-aware offline stand-in on embedded data (task v4): true
  feature claims earn and false ones cost, against the tile's known features.
"""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from pathvlm_lightning.callbacks.settings import RecordsArguments
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.stages import Samples
from pathvlm_lightning.rewards.accuracy import accuracy_reward
from pathvlm_lightning.rewards.completion import ParsedCompletion, parse_completion
from pathvlm_lightning.rewards.format import format_reward
from pathvlm_lightning.rewards.judge.background import BackgroundLoop
from pathvlm_lightning.rewards.judge.client import JudgeAuthError, JudgeClient
from pathvlm_lightning.rewards.judge.config import JudgeConfig
from pathvlm_lightning.rewards.judge.counters import FAULTS, JudgeResult, summarize
from pathvlm_lightning.rewards.judge.request import JudgeItem
from pathvlm_lightning.rewards.rubric import rubric_scores


class RewardCallback(RecordsArguments, Callback):
    """Scores completions. Subclasses implement ``score_completion`` (pure, per parsed completion),
    ``score_text`` (pure, per completion text) or override ``score`` (the whole step's samples).
    A NaN score means "abstain": the completion is ignored by this reward when advantages are
    computed. The module calls :meth:`checked_score`, so a score of another
    shape, or an infinite one, stops the run with an error that names the reward.

    Args:
        weight: multiplies the score before rewards are summed.
        name: the name the reward is logged under (``reward/<name>``); defaults to the class's
            ``default_name``.
    """

    default_name = "reward"
    #: keys of ``metrics()`` that are counts: summed over ranks when logged (others are averaged,
    #: keys ending in ``_max`` take the maximum)
    summed_metrics: frozenset[str] = frozenset()

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        if not math.isfinite(weight):
            raise ValueError(f"{type(self).__name__}: weight must be a finite number, got {weight!r}")
        self.weight = float(weight)
        self.name = name or self.default_name

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def begin(self, samples: Samples) -> None:
        """Start work for these samples (default: nothing). Called before the reference forward."""

    def score(self, samples: Samples) -> torch.Tensor:
        """[B*G] float scores, unweighted: :meth:`score_completion` of each parsed completion."""
        values = []
        for i, completion in enumerate(samples.parsed):
            value = self.score_completion(completion, samples.record_of(i))
            if not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{self._who()}: score_completion returned {value!r} ({type(value).__name__}) for completion {i} "
                    f"(record {samples.record_of(i).id!r}); a score is a float (NaN to abstain)"
                )
            values.append(float(value))
        return torch.tensor(values, dtype=torch.float32)

    def checked_score(self, samples: Samples) -> torch.Tensor:
        """:meth:`score`, checked: [B*G] float32 scores, each finite or NaN (abstain); anything else
        (a non-tensor, another shape, +inf or -inf) raises an error naming this reward."""
        scores = self.score(samples)
        expected = [samples.num_completions]
        if not isinstance(scores, torch.Tensor):
            raise TypeError(
                f"{self._who()}: score returned {type(scores).__name__}, expected a tensor of shape {expected}"
            )
        if list(scores.shape) != expected:
            raise ValueError(
                f"{self._who()}: score returned shape {list(scores.shape)}, expected {expected} "
                "(one score per completion)"
            )
        scores = scores.to(torch.float32)
        infinite = torch.isinf(scores).nonzero().flatten().tolist()
        if infinite:
            i = infinite[0]
            raise ValueError(
                f"{self._who()}: score {scores[i].item()} for completion {i} (record {samples.record_of(i).id!r}) "
                f"is infinite ({len(infinite)} of {expected[0]} completions); a score must be finite, or NaN to abstain"
            )
        return scores

    def score_completion(self, completion: ParsedCompletion, record: VQARecord) -> float:
        """The score of one completion, read through its parse (its ``reasoning``, ``answer``,
        ``well_formed`` and ``text``); default: :meth:`score_text` of its text."""
        if type(self).score_text is RewardCallback.score_text:
            raise NotImplementedError(f"{type(self).__name__} must implement score_completion, score_text or score")
        return self.score_text(completion.text, record)

    def score_text(self, completion: str, record: VQARecord) -> float:
        """The score of one completion's text; default: :meth:`score_completion` of its parse (for
        scripts and tests: the step passes the rollout's parse to ``score_completion``)."""
        if type(self).score_completion is RewardCallback.score_completion:
            raise NotImplementedError(f"{type(self).__name__} must implement score_completion, score_text or score")
        return self.score_completion(parse_completion(completion, record.options), record)

    def _who(self) -> str:
        return f"reward {self.name!r} ({type(self).__name__})"

    def metrics(self) -> dict[str, float]:
        """Extra scalars to log after ``score`` (e.g. judge counters), keyed without prefix."""
        return {}
from pathvlm_lightning.rewards.truth import truth_reward


class FormatReward(RewardCallback):
    """1 for ``<think>...</think><answer>...</answer>``, else 0 (see ``rewards.format``).

    Args:
        weight: multiplies the score before rewards are summed.
        name: logged as ``reward/<name>``; defaults to ``"format"``.
    """

    default_name = "format"

    @override
    def score_completion(self, completion: ParsedCompletion, record: VQARecord) -> float:
        return format_reward(completion)


class AccuracyReward(RewardCallback):
    """1 when the answer names the record's correct option by letter and text, else 0 (see
    ``rewards.accuracy``).

    Args:
        weight: multiplies the score before rewards are summed.
        letter_only: judge the letter alone, ignoring the option text written after it.
        name: logged as ``reward/<name>``; defaults to ``"accuracy"``.
    """

    default_name = "accuracy"

    def __init__(
        self, weight: float = 1.0, letter_only: bool = False, name: str | None = None
    ) -> None:
        super().__init__(weight=weight, name=name)
        if not isinstance(letter_only, bool):
            raise ValueError(
                f"AccuracyReward: letter_only must be True or False, got {letter_only!r}"
            )
        self._letter_only = letter_only

    @override
    def score_completion(self, completion: ParsedCompletion, record: VQARecord) -> float:
        return accuracy_reward(
            completion, record.answer, record.options, letter_only=self._letter_only
        )


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
        self._pending: tuple[Samples, concurrent.futures.Future[list[JudgeResult]]] | None = None
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
    def begin(self, samples: Samples) -> None:
        self._start()
        assert self._client is not None and self._loop is not None
        items = [JudgeItem.of(samples.record_of(i), parsed) for i, parsed in enumerate(samples.parsed)]
        judged = self._client.score_many(items, deadline_s=self.judge.step_deadline_s)
        self._pending = (samples, self._loop.submit(judged))

    @override
    def score(self, samples: Samples) -> torch.Tensor:
        if self._pending is None or self._pending[0] is not samples:
            self.begin(samples)
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
    def score(self, samples: Samples) -> torch.Tensor:
        pairs = [rubric_scores(parsed, samples.record_of(i)) for i, parsed in enumerate(samples.parsed)]
        scores = torch.tensor(pairs, dtype=torch.float32)  # [B*G, 2] integrity, knowledge
        self._metrics = {"integrity": scores[:, 0].mean().item(), "knowledge": scores[:, 1].mean().item()}
        return scores.mean(dim=1)  # [B*G]

    @override
    def score_completion(self, completion: ParsedCompletion, record: VQARecord) -> float:
        integrity, knowledge = rubric_scores(completion, record)
        return (integrity + knowledge) / 2

    @override
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)


class TruthProcessReward(RewardCallback):
    """Image-aware offline process reward: true feature claims earn, false ones cost, against the
    tile's known features (``extra["spec"]``; see ``rewards.truth``). Embedded data only: a record
    without a tile spec is an error. It reads claims from the completion's ``<think>`` text by the
    claim reader of ``eval/faithfulness.py`` (an unclosed think block counts up to the end), so the
    reward and the faithfulness metric read a chain the same way.

    Args:
        weight: multiplies the score before rewards are summed.
        name: logged as ``reward/<name>``; defaults to ``"truth"``.
    """

    default_name = "truth"

    @override
    def score_completion(self, completion: ParsedCompletion, record: VQARecord) -> float:
        return truth_reward(completion.text, record)
