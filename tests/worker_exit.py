"""The end of a multi-process test worker: leave without Python's interpreter teardown.

A worker's results are on disk (or checked) once its work returns; what remains is interpreter
teardown, during which torch's C++ threads and statics can abort the process
(``terminate called without an active exception``, SIGABRT: pytorch/pytorch#65237 and kin). Seen
here on 2026-12-07: rank 1 of ``test_fsdp2_two_processes_match_one`` aborted in 2 of ~100 runs, about
1 s before a normal run ends, when the work (under 1 s) was done and teardown (~4 s with torchrun's
agent) was under way. The test then failed although every result was right. A worker that raises
never gets here, so its traceback and exit code still fail the test.
"""

from __future__ import annotations

import os
import sys


def exit_after_work() -> None:
    """Flush stdout and stderr, then end the process with status 0, skipping interpreter teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
