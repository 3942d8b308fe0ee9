"""Ownership of the embedded ClickHouse store (chDB allows one process per data path).

The owner holds an exclusive ``flock`` on ``<store>.lock`` for as long as it lives and writes
into it where its web endpoint is, so read commands (``metering report``) can ask the owner
instead of opening the store themselves. The kernel drops the lock when the owner dies, even
by SIGKILL, so a stale file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OwnerInfo:
    pid: int
    url: str | None


class StoreLock:
    """An exclusive, non-blocking claim on one embedded store path."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path.with_name(store_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self, url: str | None) -> bool:
        """Claim the store; False if another live process holds it. Records ``url``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "url": url}).encode())
        os.fsync(fd)
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the store up (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def current_owner(store_path: Path) -> OwnerInfo | None:
    """The live process owning ``store_path``, or None when nobody holds it."""
    lock_path = store_path.with_name(store_path.name + ".lock")
    if not lock_path.exists():
        return None
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = lock_path.read_bytes()
            try:
                info = json.loads(raw or b"{}")
            except ValueError:
                info = {}
            return OwnerInfo(pid=int(info.get("pid", 0)), url=info.get("url"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
