"""The child side of the lockstep protocol: wait for "go", run one training step, report its time.

Both benchmark children (ours and TRL's) run their own training loop; a hook at the end of every
optimizer step calls :meth:`StepGate.step_done`, which reports the step's wall time and memory to
the parent and blocks until the parent says "go" again. The parent lets one side step at a time,
alternating which goes first, so load from other processes on the machine falls on both sides
alike and the two sides never compete with each other for the cores.

A step's time runs from "go" to the end of the next optimizer step: everything either loop does in
between (fetching and collating the batch, generation, rewards, reference pass, loss, backward,
optimizer, logging) is counted. Both wall time and the process's CPU time (all its threads) are
reported: on a machine shared with other work the wall time swings with their load, the CPU time
much less.

Messages to the parent are JSON lines on the file descriptor the parent passed; "go" arrives on stdin.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``: resident now; ``VmHWM``: peak since reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so later peaks exclude model loading."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class StepGate:
    """Reports step times and memory to the parent; blocks between steps until told to go.

    Args:
        report_fd: write end of the report pipe (inherited from the parent).
        total_steps: warmup + measured steps; after the last one the gate stops blocking.
    """

    def __init__(self, report_fd: int, total_steps: int) -> None:
        self._report = os.fdopen(report_fd, "w", buffering=1)
        self._total = total_steps
        self._done = 0
        self._started = 0.0
        self._started_cpu = 0.0
        self._rss_at_start_kib = 0

    def ready(self, info: dict[str, Any]) -> None:
        """Call once, after everything is loaded and before the first step; waits for the first go."""
        _reset_peak_rss()
        self._rss_at_start_kib = _status_kib("VmRSS")
        self._send(event="ready", rss_mib=self._rss_at_start_kib / 1024, **info)
        self._wait_for_go()

    def step_done(self) -> None:
        """Call at the end of every optimizer step."""
        seconds = time.perf_counter() - self._started
        cpu_seconds = time.process_time() - self._started_cpu
        self._done += 1
        self._send(event="step", index=self._done, seconds=seconds, cpu_seconds=cpu_seconds)
        if self._done < self._total:
            self._wait_for_go()

    def finish(self, info: dict[str, Any]) -> None:
        """Call after the loop: peak RSS during the steps and the whole process's peak."""
        peak_kib = _status_kib("VmHWM")
        self._send(
            event="done",
            steps=self._done,
            peak_rss_mib=peak_kib / 1024,
            peak_growth_mib=(peak_kib - self._rss_at_start_kib) / 1024,
            process_max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **info,
        )
        self._report.close()

    def _send(self, **message: Any) -> None:
        self._report.write(json.dumps(message) + "\n")

    def _wait_for_go(self) -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"lockstep: expected 'go' from the parent, got {line!r}")
        self._started = time.perf_counter()
        self._started_cpu = time.process_time()
