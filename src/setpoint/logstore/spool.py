"""Append-only request-record spool: one `write()` per record, in segment files under `data_dir/spool`.

A record is appended before the client sees the end of its response, so once a response is
acknowledged its record survives `kill -9` (it is in the page cache; the drainer fsyncs each tick
for power loss). Each process owns its segments through an `flock`ed lock file; when a process dies
its lock is released and any other process's drainer claims and drains its segments.

Segment name: `<owner>-<seq:08d>.jsonl`, lock: `<owner>.lock`, owner = `<pid>-<64 random bits, hex>`.
The segment name is the key of its progress in the store, which several hosts may share (one
PostgreSQL for every replica, where pids repeat from container to container): 64 random bits keep
names apart without coordination.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Spool", "segment_owner"]


def segment_owner(path: Path) -> str:
    return path.name.rsplit("-", 1)[0]


class Spool:
    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.owner = f"{os.getpid()}-{secrets.token_hex(8)}"
        self._segment_bytes = segment_bytes
        # Lock first, then publish: a drainer must never see our lock file unlocked.
        tmp = directory / f".{self.owner}.lock.tmp"
        self._lock_fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, directory / f"{self.owner}.lock")
        self._seq = 0
        self._size = 0
        self._mutex = threading.Lock()  # append() may be called from the demo's threads too
        self._fd = self._open_segment()

    def _segment_path(self, seq: int) -> Path:
        return self.directory / f"{self.owner}-{seq:08d}.jsonl"

    def _open_segment(self) -> int:
        return os.open(self._segment_path(self._seq), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)

    @property
    def current_segment(self) -> Path:
        return self._segment_path(self._seq)

    def append(self, record: dict[str, Any]) -> None:
        try:
            line = orjson.dumps(record) + b"\n"
        except TypeError:  # a string that is not UTF-8 (a lone surrogate): kept, with "?" in its place
            line = orjson.dumps(_utf8_safe(record)) + b"\n"
        with self._mutex:
            if self._fd < 0:
                raise RuntimeError("spool is closed")
            written = os.write(self._fd, line)
            while written < len(line):  # short writes are rare (disk full); finish or raise
                written += os.write(self._fd, line[written:])
            self._size += len(line)
            if self._size >= self._segment_bytes:
                os.close(self._fd)
                self._seq += 1
                self._size = 0
                self._fd = self._open_segment()

    def sync(self) -> None:
        """fsync the current segment. The append lock is held only to take a duplicate of the fd,
        not through the disk wait: an fsync can take hundreds of milliseconds on a busy disk, and
        `append` runs on the event loop (holding the lock through it stalled every request)."""
        with self._mutex:
            if self._fd < 0:
                return
            fd = os.dup(self._fd)  # stays valid even if append rotates and closes the original
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def release(self, *, remove_lock: bool = True) -> None:
        """Give up ownership after the last drain. Keep the lock file when segments remain, so
        that another process's drainer claims them."""
        try:
            if remove_lock:
                (self.directory / f"{self.owner}.lock").unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)


def _utf8_safe(value: Any) -> Any:
    """`value` with every string made encodable as UTF-8 (what cannot be is replaced by "?")."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_utf8_safe(k): _utf8_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_utf8_safe(v) for v in value]
    return value
