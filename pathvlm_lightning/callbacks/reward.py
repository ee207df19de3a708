"""Base class of every reward callback: a thin adapter from a rollout to one score per completion.

Rewards are parts of ``GRPOModule`` (the list ``model.init_args.rewards``); the module hands them to
Lightning and calls them itself, in a fixed order (rollout -> ``begin`` on every reward -> reference
forward -> ``score`` on every reward, rewards in the order of their names), so the order they are
listed in YAML never matters. ``begin`` lets a slow reward (an HTTP judge) start
its work before the reference forward and collect it in ``score``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from pathvlm_lightning.callbacks.settings import RecordsArguments
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.rollout import Rollout


class RewardCallback(RecordsArguments, Callback):
    """Scores completions. Subclasses implement ``score_text`` (pure, per completion) or override
    ``score`` (whole rollout). A NaN score means "abstain": the completion is ignored by this reward
    when advantages are computed. The module calls :meth:`checked_score`, so a score of another
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

    def begin(self, rollout: Rollout, pl_module: Any) -> None:
        """Start work for this rollout (default: nothing). Called before the reference forward."""

    def score(self, rollout: Rollout, pl_module: Any) -> torch.Tensor:
        """[B*G] float scores, unweighted."""
        values = []
        for i, text in enumerate(rollout.completion_texts):
            value = self.score_text(text, rollout.record_of(i))
            if not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{self._who()}: score_text returned {value!r} ({type(value).__name__}) for completion {i} "
                    f"(record {rollout.record_of(i).id!r}); a score is a float (NaN to abstain)"
                )
            values.append(float(value))
        return torch.tensor(values, dtype=torch.float32)

    def checked_score(self, rollout: Rollout, pl_module: Any) -> torch.Tensor:
        """:meth:`score`, checked: [B*G] float32 scores, each finite or NaN (abstain); anything else
        (a non-tensor, another shape, +inf or -inf) raises an error naming this reward."""
        scores = self.score(rollout, pl_module)
        expected = [len(rollout.completion_texts)]
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
                f"{self._who()}: score {scores[i].item()} for completion {i} (record {rollout.record_of(i).id!r}) "
                f"is infinite ({len(infinite)} of {expected[0]} completions); a score must be finite, or NaN to abstain"
            )
        return scores

    def score_text(self, completion: str, record: VQARecord) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement score_text or score")

    def _who(self) -> str:
        return f"reward {self.name!r} ({type(self).__name__})"

    def metrics(self) -> dict[str, float]:
        """Extra scalars to log after ``score`` (e.g. judge counters), keyed without prefix."""
        return {}
