"""Durable cache of paid API answers: one sqlite row per answered request, committed as it arrives.

Hand-written because no library gives "persist on arrival, key by the full request, safe to SIGKILL, shared by
concurrent Snakemake jobs": sqlite in WAL mode with synchronous=FULL does, from the standard library. A
killed process loses at most the requests it had in flight; a rerun reads every committed answer back and
never sends those requests again.
"""
from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError

OPEN_PATIENCE_S = 120   # how long opening waits out other jobs' locks

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,           -- sha256 of the canonical JSON request (the model is part of it)
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    content TEXT NOT NULL,          -- the judge's raw answer text
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    via TEXT NOT NULL,              -- 'online' or 'batch:<id>'
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    submission TEXT PRIMARY KEY,    -- our id, recorded before the batch is created (found again by metadata)
    batch_id TEXT,                  -- the API's id, recorded as soon as it is known
    keys TEXT NOT NULL,             -- JSON list of request keys in this batch
    reserved_usd REAL NOT NULL,
    state TEXT NOT NULL,            -- 'submitting', 'open', 'collected', 'failed'
    created REAL NOT NULL
);
"""


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Answer:
    content: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class AnswerCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several jobs open one cache at once (an experiment's GRPO runs with an API judge). SQLite's busy timeout does
        # not cover every lock met while opening (a WAL file another process is checkpointing as it closes, switching
        # the journal mode): "database is locked" there is retried, any other error means the file is not sqlite.
        deadline = time.monotonic() + OPEN_PATIENCE_S
        while True:
            try:
                self._db = self._open()
                break
            except sqlite3.DatabaseError as e:
                locked = isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))
                if locked and time.monotonic() < deadline:
                    time.sleep(0.05 + 0.2 * random.random())
                    continue
                raise ConfigError(f"judge cache {self.path}: still locked by another process after {OPEN_PATIENCE_S} s "
                                  f"({e})" if locked else f"judge cache {self.path}: not a usable sqlite file ({e}); "
                                  "move it away to start afresh") from None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        # One connection guarded by a lock: writes are tiny next to an API round trip.
        db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def get_many(self, keys) -> dict[str, Answer]:
        keys, out = list(keys), {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = self._db.execute(
                    f"SELECT key, content, prompt_tokens, completion_tokens, cost_usd FROM answers "
                    f"WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                out.update({k: Answer(c, p, t, cost) for k, c, p, t, cost in rows})
        return out

    def put(self, key: str, request: dict, answer: Answer, via: str = "online") -> None:
        with self._lock:
            # INSERT OR IGNORE: two jobs racing on the same request keep the first answer (both were paid).
            self._db.execute(
                "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, request["model"], json.dumps(request, sort_keys=True, ensure_ascii=False), answer.content,
                 answer.prompt_tokens, answer.completion_tokens, answer.cost_usd, via, time.time()))

    def spent(self) -> float:
        with self._lock:
            answered = self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM answers").fetchone()[0]
            pending = self._db.execute(
                "SELECT COALESCE(SUM(reserved_usd), 0) FROM batches WHERE state IN ('submitting', 'open')").fetchone()[0]
        return float(answered) + float(pending)

    # --- Batch API bookkeeping -------------------------------------------------------------------------
    def add_submission(self, submission: str, keys: list[str], reserved_usd: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO batches VALUES (?, NULL, ?, ?, 'submitting', ?)",
                             (submission, json.dumps(keys), reserved_usd, time.time()))

    def set_batch(self, submission: str, batch_id: str | None, state: str) -> None:
        with self._lock:
            self._db.execute("UPDATE batches SET batch_id = COALESCE(?, batch_id), state = ? WHERE submission = ?",
                             (batch_id, state, submission))

    def open_batches(self) -> list[tuple[str, str | None, list[str]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT submission, batch_id, keys FROM batches WHERE state IN ('submitting', 'open')").fetchall()
        return [(s, b, json.loads(k)) for s, b, k in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
