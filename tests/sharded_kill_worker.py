"""The CLI with one process armed to SIGKILL itself inside a sharded checkpoint save (a helper of
tests/test_checkpoint_sharded.py; no tests here).

``PATHVLM_KILL=<rank>:<save>:<moment> python tests/sharded_kill_worker.py fit --config ...`` runs
``pathvlm_lightning.cli.main`` on the arguments. Lightning starts the other ranks by running this same
script again (same arguments and environment), so every rank is armed, and the one whose rank is
``<rank>`` kills itself during its ``<save>``-th sharded save, at ``<moment>`` (one of
:data:`MOMENTS`). The kill is placed by wrapping the calls the save makes, so it is exact, not timed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter

import pathvlm_lightning.checkpoint_sharded as sharded
from pathvlm_lightning.cli import main

#: ``shard_written``: this rank's shard file is on disk, the other ranks' and the metadata maybe not;
#: ``between_renames``: the old folder is renamed aside, the complete new one not yet in place (rank 0)
MOMENTS = ("shard_written", "between_renames")


def arm(rank: int, killed_save: int, moment: str) -> None:
    if int(os.environ.get("LOCAL_RANK", "0")) != rank:
        return
    saves = 0
    save_checkpoint = sharded.AtomicFolderSaves.save_checkpoint
    write_data = FileSystemWriter.write_data
    publish_folder = sharded.publish_folder

    def die_at(now: str) -> None:
        if saves == killed_save and now == moment:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted_save(self, *args, **kwargs):
        nonlocal saves
        saves += 1
        return save_checkpoint(self, *args, **kwargs)

    def checked_write_data(self, *args, **kwargs):
        written = write_data(self, *args, **kwargs)
        written.wait()
        die_at("shard_written")
        return written

    def checked_publish(temporary: Path, target: Path) -> None:
        if saves == killed_save and moment == "between_renames" and target.exists():
            os.replace(target, sharded._hidden_name(target, "old"))  # publish_folder's first rename
            die_at("between_renames")
        publish_folder(temporary, target)

    sharded.AtomicFolderSaves.save_checkpoint = counted_save
    FileSystemWriter.write_data = checked_write_data
    sharded.publish_folder = checked_publish


if __name__ == "__main__":
    rank, save, moment = os.environ["PATHVLM_KILL"].split(":")
    assert moment in MOMENTS, moment
    arm(int(rank), int(save), moment)
    main(sys.argv[1:])
