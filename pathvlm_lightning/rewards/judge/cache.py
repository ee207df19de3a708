"""An SQLite cache of judge scores, so the same completion is never paid for twice.

The file outlives the process: a resumed run (a new process opening the same file) reuses what
was paid for before. Only scores the judge actually gave are stored, never fallbacks, so a
completion that met a fault is asked again next time. Keys are hashes; the file holds no text of
the requests and nothing about the API key.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pathvlm_lightning.rewards.judge.parse import JudgeScores


def cache_key(settings: Mapping[str, Any], image_sha256: str, question: str, completion: str) -> str:
    """A hash of everything that decides the judge's answer: the settings that change the verdict
    (model, rubric version, sampling, reply format, endpoint: see ``JudgeClient.verdict_settings``)
    and the item. JSON-encoded, keys sorted, so fields cannot run into each other.

    >>> cache_key({"model": "gpt-4o"}, "ab", "q", "c") == cache_key({"model": "gpt-4o"}, "ab", "qc", "")
    False
    """
    payload = json.dumps([dict(settings), image_sha256, question, completion], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Scores by key in an SQLite file. Safe to share between threads (one lock around one
    connection) and between processes (SQLite's own file locking, e.g. several DDP ranks)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores "
                "(key TEXT PRIMARY KEY, integrity REAL NOT NULL, knowledge REAL NOT NULL, created REAL NOT NULL)"
            )

    def get(self, key: str) -> JudgeScores | None:
        with self._lock:
            row = self._db.execute("SELECT integrity, knowledge FROM scores WHERE key = ?", (key,)).fetchone()
        return None if row is None else JudgeScores(row[0], row[1])

    def put(self, key: str, scores: JudgeScores) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                (key, scores.integrity, scores.knowledge, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
