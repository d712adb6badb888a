"""Durable cache of paid API answers: a folder of append-only JSON-lines shards, one per process that writes.

Every answer is one line in the writing process's own shard, flushed and fsynced as it arrives; a rerun (or any other
job of the experiment) reads every shard of the folder and never sends an answered request again. A killed process
loses at most the requests it had in flight; a line cut short by the kill is ignored.

Why not one shared SQLite file (this cache's first form): the jobs that share it (labeling, evaluations, every GRPO run
with an API judge) run concurrently on different nodes of a cluster, whose results folder is a network filesystem, and
SQLite documents that its WAL mode "does not work over a network filesystem" (sqlite.org/wal.html) while its rollback
journal relies on POSIX locks that many network filesystems do not honour. Here no file has two writers: each process
appends to a shard named after its host, process id and a random suffix, and reads the others' complete lines.
Two jobs that ask the same question both pay and both keep their answer (the spend counts both); the first one read is
used. A cache made by an earlier release (`<folder>.sqlite` beside the folder) is read too, never written.

Lines: {"answer": key, "model", "request", "content", "prompt_tokens", "completion_tokens", "cost_usd", "via",
"created"} and Batch API bookkeeping {"batch": submission, "batch_id", "keys", "reserved_usd", "state", "created"}
(the latest line of a submission, by time, is its state).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Answer:
    content: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


def cache_folder(path: str | Path) -> Path:
    """The shard folder of a configured cache path (an earlier release's `x.sqlite` names folder `x`)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix == ".sqlite" else path


class AnswerCache:
    def __init__(self, path: str | Path):
        self.path = cache_folder(path)
        if self.path.is_file():
            raise ConfigError(f"judge cache {self.path}: a file where the cache's folder of shards belongs; move it away "
                              "(an earlier release's cache is read from <folder>.sqlite)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._where: dict[str, tuple[Path, int, int] | Answer] = {}  # key -> (shard, offset, length) or a legacy answer
        self._read_to: dict[Path, int] = {}   # bytes of each shard already read
        self._spent = 0.0                     # every answer line's cost (duplicates were paid twice)
        self._batches: dict[str, dict] = {}   # submission -> its latest line
        self._own: Path | None = None         # this process's shard, made on the first write
        self._fd: int | None = None
        self._read_legacy(self.path.with_suffix(".sqlite"))
        self._refresh()

    # --- reading -----------------------------------------------------------------------------------------
    def _read_legacy(self, db: Path) -> None:
        if not db.is_file():
            return
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
            for key, content, p, t, cost in con.execute(
                    "SELECT key, content, prompt_tokens, completion_tokens, cost_usd FROM answers"):
                self._where.setdefault(key, Answer(content, p, t, cost))
                self._spent += cost
            con.close()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"judge cache {db}: not a usable sqlite file ({e}); move it away to start afresh") from None

    def _refresh(self) -> None:
        """Read the complete lines every shard has gained since the last call (other processes keep appending)."""
        for shard in sorted(self.path.glob("*.jsonl")):
            start = self._read_to.get(shard, 0)
            size = shard.stat().st_size
            if size <= start:
                continue
            with open(shard, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
            end = data.rfind(b"\n") + 1  # a line without its newline is still being written, or was cut by a kill
            offset = start
            for line in data[:end].splitlines(keepends=True):
                self._index(shard, offset, line)
                offset += len(line)
            self._read_to[shard] = start + end

    def _index(self, shard: Path, offset: int, line: bytes) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return  # a damaged line: its answer is asked again
        if "answer" in row:
            self._where.setdefault(row["answer"], (shard, offset, len(line)))
            self._spent += float(row["cost_usd"])
        elif "batch" in row:
            known = self._batches.get(row["batch"])
            if known is None or row["created"] >= known["created"]:
                self._batches[row["batch"]] = row

    def _load(self, where) -> Answer:
        if isinstance(where, Answer):
            return where
        shard, offset, length = where
        with open(shard, "rb") as f:
            f.seek(offset)
            row = json.loads(f.read(length))
        return Answer(row["content"], row["prompt_tokens"], row["completion_tokens"], row["cost_usd"])

    def get_many(self, keys) -> dict[str, Answer]:
        with self._lock:
            self._refresh()
            return {k: self._load(self._where[k]) for k in keys if k in self._where}

    def spent(self) -> float:
        """Every recorded answer's cost plus what open batches have reserved."""
        with self._lock:
            self._refresh()
            pending = sum(b["reserved_usd"] for b in self._batches.values() if b["state"] in ("submitting", "open"))
            return self._spent + pending

    def answers(self) -> list[dict]:
        """Every answer line of every shard (duplicates included), for inspection and tests."""
        with self._lock:
            self._refresh()
            return [json.loads(line) for shard in sorted(self._read_to) for line in
                    shard.read_bytes()[:self._read_to[shard]].splitlines() if b'"answer"' in line]

    # --- writing -----------------------------------------------------------------------------------------
    def _append(self, row: dict) -> None:
        """One line in this process's shard, on disk before returning (caller holds the lock)."""
        if self._fd is None:
            self._own = self.path / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._fd = os.open(self._own, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        os.write(self._fd, line)
        os.fsync(self._fd)
        if self._read_to.get(self._own, 0) == offset:  # nothing unread before it: index it now, not on refresh
            self._index(self._own, offset, line)
            self._read_to[self._own] = offset + len(line)

    def put(self, key: str, request: dict, answer: Answer, via: str = "online") -> None:
        with self._lock:
            self._append({"answer": key, "model": request["model"], "request": request, "content": answer.content,
                          "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                          "cost_usd": answer.cost_usd, "via": via, "created": time.time()})

    # --- Batch API bookkeeping -------------------------------------------------------------------------
    def _batch_line(self, submission: str, **fields) -> None:
        known = self._batches.get(submission, {})
        self._append({**known, "batch": submission, **fields, "created": time.time()})

    def add_submission(self, submission: str, keys: list[str], reserved_usd: float) -> None:
        with self._lock:
            self._batch_line(submission, batch_id=None, keys=keys, reserved_usd=reserved_usd, state="submitting")

    def set_batch(self, submission: str, batch_id: str | None, state: str, reason: str | None = None) -> None:
        with self._lock:
            self._refresh()
            known = self._batches.get(submission, {})
            self._batch_line(submission, batch_id=batch_id or known.get("batch_id"), state=state,
                             **({"reason": reason} if reason else {}))

    def failed_batches(self) -> dict[frozenset, tuple[str | None, str]]:
        """The request sets of batches the API failed as a whole (key set -> (batch id, its reason))."""
        with self._lock:
            self._refresh()
            return {frozenset(b["keys"]): (b["batch_id"], b["reason"]) for b in self._batches.values()
                    if b["state"] == "failed" and b.get("reason")}

    def open_batches(self) -> list[tuple[str, str | None, list[str]]]:
        with self._lock:
            self._refresh()
            return [(s, b["batch_id"], b["keys"]) for s, b in self._batches.items()
                    if b["state"] in ("submitting", "open")]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
