"""Artifact writing that never leaves a half-written file or folder looking complete.

Everything is written under a temporary sibling name and renamed into place only after it is complete;
a crash leaves at most a `*.tmp-*` entry, which the next run removes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from rlhf.errors import DataError


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Move the old version aside (one rename), put the new one in place (another), then delete the old: a kill
    # between the two renames is the only moment with no `final`, not the whole time a large folder is deleted.
    old = None
    if final.exists():
        old = final.with_name(f"{tmp.name}-old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, final)


def _finite(obj):
    """JSON cannot hold NaN portably; write null so readers never parse a silent NaN as a number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(_finite(row)) + "\n")


def write_json(path: str | Path, obj: dict) -> None:
    with atomic_file(path) as f:
        json.dump(_finite(obj), f, indent=2)
        f.write("\n")


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing input file: {path} (run the stage that produces it first)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: empty dataset (no rows)")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; have {', '.join(rows[0])}")
    return rows


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing input file: {path} (run the stage that produces it first)")
    with open(path) as f:
        return json.load(f)
