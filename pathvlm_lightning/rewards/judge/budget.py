"""What the judge may spend over a run, kept across resumes through the callback's state."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class JudgeBudget:
    """Counts HTTP requests (retries included) and tokens; once a limit is reached no request is
    sent and completions get fallback scores. ``None`` means no limit.

    >>> budget = JudgeBudget(max_requests=1)
    >>> budget.take_request(), budget.take_request()
    (True, False)
    """

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.spent_requests = 0
        self.spent_tokens = 0
        self._warned = False

    def exhausted(self) -> bool:
        return (self.max_requests is not None and self.spent_requests >= self.max_requests) or (
            self.max_tokens is not None and self.spent_tokens >= self.max_tokens
        )

    def take_request(self) -> bool:
        """Reserve one request; False (and a warning, the first time) when the budget is spent.
        Called from one event loop thread only, so check and reserve cannot interleave."""
        if self.exhausted():
            if not self._warned:
                self._warned = True
                log.warning(
                    "judge budget spent (%d/%s requests, %d/%s tokens): fallback scores from now on",
                    self.spent_requests, self.max_requests, self.spent_tokens, self.max_tokens,
                )
            return False
        self.spent_requests += 1
        return True

    def add_tokens(self, tokens: int) -> None:
        self.spent_tokens += tokens

    def state_dict(self) -> dict[str, int]:
        return {"spent_requests": self.spent_requests, "spent_tokens": self.spent_tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.spent_requests = int(state.get("spent_requests", 0))
        self.spent_tokens = int(state.get("spent_tokens", 0))
