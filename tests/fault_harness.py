"""Run train.py with one injected fault (for tests/test_faults.py).

  MTOK_FAULT=ACTION@POINT:N python tests/fault_harness.py <train.py flags>

ACTION: kill (SIGKILL), term (SIGTERM), int (SIGINT), int2 (two SIGINTs at once) — sent to this process
the N-th time POINT is reached:
  step               after the N-th training step's metrics line (log_every=1)
  validation         while the N-th validation batch is being read
  after_best         after a `best` checkpoint is committed, before `latest` of the same step
  latest_inflight    right after a `latest` save started (its files are being written)
  latest_committed   after a `latest` save is committed
  seconds            N/10 seconds after the first training step (a moment anywhere in the run)
Before acting it prints `FAULT ACTION@POINT:N` to stderr, so the test knows the fault fired.

  MTOK_NO_SPACE_CHECK=1 python tests/fault_harness.py <train.py flags>

turns off the checkpointer's free-space check before a save, so that a full disk fails inside orbax's
own (asynchronous) writes; MTOK_FAULT may then be left out.
"""

import os
import runpy
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtok_jax import environment  # noqa: E402

environment.without_torch_in_transformers()  # as train.py does
from mtok_jax import checkpoints, train  # noqa: E402
from mtok_jax.data import pipeline  # noqa: E402

ACTION, _, WHERE = os.environ.get("MTOK_FAULT", "none@none:0").partition("@")
POINT, _, COUNT = WHERE.partition(":")
COUNT = int(COUNT)
SIGNALS = {"kill": [signal.SIGKILL], "term": [signal.SIGTERM], "int": [signal.SIGINT],
           "int2": [signal.SIGINT, signal.SIGINT], "none": []}[ACTION]
hits = {"n": 0}


def fire() -> None:
    sys.stderr.write(f"FAULT {os.environ['MTOK_FAULT']}\n")
    sys.stderr.flush()
    for sig in SIGNALS:
        os.kill(os.getpid(), sig)


def reached(point: str) -> None:
    if point == POINT:
        hits["n"] += 1
        if hits["n"] == COUNT:
            fire()


real_write = train.MetricsLog.write


def write(self, **record):
    real_write(self, **record)
    if record.get("kind") == "step":
        if POINT == "seconds" and hits["n"] == 0:
            hits["n"] = 1
            threading.Timer(COUNT / 10, fire).start()
        reached("step")


real_batches = pipeline.batches


def batches(data_dir, split, *args, **kwargs):
    for batch in real_batches(data_dir, split, *args, **kwargs):
        if split == "validation":
            reached("validation")
        yield batch


real_save_best = checkpoints.Checkpointer.save_best
real_save_latest = checkpoints.Checkpointer.save_latest


def save_best(self, *args, **kwargs):
    real_save_best(self, *args, **kwargs)
    self.wait()
    reached("after_best")


def save_latest(self, *args, **kwargs):
    real_save_latest(self, *args, **kwargs)
    reached("latest_inflight")
    if POINT == "latest_committed":
        self.wait()
        reached("latest_committed")


if os.environ.get("MTOK_NO_SPACE_CHECK") == "1":
    checkpoints.Checkpointer._check_space = lambda self, mgr, step, nbytes: None

train.MetricsLog.write = write
pipeline.batches = batches
checkpoints.Checkpointer.save_best = save_best
checkpoints.Checkpointer.save_latest = save_latest

sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
runpy.run_path(str(REPO / "train.py"), run_name="__main__")
