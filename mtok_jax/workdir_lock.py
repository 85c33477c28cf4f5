"""One training process per workdir: an exclusive `flock` on WORKDIR/.lock holding the owner's PID/host.

The kernel drops the lock when its process dies (kill -9 included), so a lock file that still names a
PID but can be locked was left by a dead run: it is taken over with a warning. A live holder makes a
second run fail at once with `WorkdirLockedError` naming its PID and host.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from mtok_jax import errors

log = logging.getLogger("mtok_jax.workdir_lock")
LOCK_NAME = ".lock"


class WorkdirLockedError(errors.UserError):
    """Another live process trains in this workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` — hold the workdir for this process (re-entrant per process: no)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
        self._fd: int | None = None

    def _owner(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = self._owner()
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by PID {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')} (since {since}): wait for that run to end, stop it, or use another "
                f"--workdir") from None
        stale = self._owner()
        if stale.get("pid") and stale.get("pid") != os.getpid():
            log.warning("taking over the stale lock of PID %s on %s (that process is gone): %s", stale["pid"],
                        stale.get("host", "?"), self.path)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly (no stale-lock warning next time)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
