"""The training DataLoader: a run resumed from a mid-epoch checkpoint continues the epoch.

Lightning saves the state of a train loader that has ``state_dict``/``load_state_dict`` in the
checkpoint and restores it before iterating again (its "stateful loader" protocol; see
``FitLoop.on_save_checkpoint`` and ``CombinedLoader._load_state_dicts``). A plain DataLoader has no
state, so a resumed run starts the interrupted epoch from its first batch: it trains twice on the
batches before the checkpoint and skips as many after it, and its steps no longer match the
uninterrupted run's. The epoch's order is fixed by its epoch seed (``EpochSeededSampler``, or the
seeded ``DistributedSampler`` Lightning substitutes under DDP), so the number of batches already
handed out is all the state needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A DataLoader that remembers how many batches of the current pass it handed out.

    After ``load_state_dict`` the next pass skips that many batches. They are still collated and
    thrown away, whatever the sampler (ours, or Lightning's distributed one), which costs at most one
    epoch of image decoding once per resume. A checkpoint taken after the last batch of an epoch
    saves 0, so the next epoch starts from its beginning.
    """

    _served = 0  # batches of the current pass handed out so far
    _resume_at = 0  # batches the next pass skips (set by load_state_dict)

    def __iter__(self) -> Iterator[Any]:
        skip, self._resume_at = self._resume_at, 0
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        served = self._served if self._served < len(self) else 0
        return {"batches_served": served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = int(state_dict.get("batches_served", 0))
