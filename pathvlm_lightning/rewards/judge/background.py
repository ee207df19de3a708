"""An asyncio event loop on a daemon thread, so judge requests run while training code runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """Runs coroutines on its own thread; ``submit`` returns at once with a future.

    >>> async def two():
    ...     return 2
    >>> loop = BackgroundLoop()
    >>> loop.submit(two()).result()
    2
    >>> loop.close()
    """

    def __init__(self, name: str = "judge-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Stop the loop and its thread; work still pending is abandoned."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
