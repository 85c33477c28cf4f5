"""Graceful stop on SIGTERM / SIGINT: the signal sets a flag that the training loop reads at the next
step boundary (where it saves and exits); a second SIGINT exits at once (code 130).

Preemptible TPU VMs and spot GPU hosts send SIGTERM before they stop a machine; Ctrl-C sends SIGINT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}


class GracefulStop:
    """`with GracefulStop() as stop: ... if stop.requested: save, exit` — `requested` is the signal's
    name ('SIGTERM' | 'SIGINT') once one arrived, else None. Handlers are installed only in the main
    thread and restored on exit."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested == "SIGINT" and name == "SIGINT":
            sys.stderr.write("\nsecond SIGINT: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(130)
        if self.requested is None:
            sys.stderr.write(f"\n{name}: stopping after the current step (checkpoint first; Ctrl-C again to "
                             f"exit at once)\n")
            sys.stderr.flush()
            self.requested = name

    def agreed(self) -> str | None:
        """`requested`, agreed by every process (call it at the same points on all of them: one small
        all-gather when there are several). A signal that reached any process stops them all at the
        same step boundary (preemption signals reach hosts at different moments)."""
        if jax.process_count() == 1:
            return self.requested
        names = (None, *EXIT_CODES)
        codes = multihost_utils.process_allgather(np.int32(names.index(self.requested)))
        agreed = names[int(np.max(codes))]
        self.requested = self.requested or agreed
        return agreed

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
