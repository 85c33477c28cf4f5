"""Fault injection on the real entry point: `train.py` processes on the tiny dataset are killed, stopped
by signals, have their newest checkpoint damaged, run out of disk or meet a locked workdir — and every
run that is restarted ends bit-identical (params, optimizer state, `best`, metrics.jsonl) to one that
never was interrupted.

Faults are injected by tests/fault_harness.py (MTOK_FAULT=ACTION@POINT:N). Each process costs ~20 s
(imports, model load, a cached compile), so one lineage carries all the kills, in a seeded order.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtok_jax import checkpoints, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "fault_harness.py"
EPOCHS, STEPS_PER_EPOCH = 4, 3  # 6 train clips, batch 2


def train_args(assets, workdir, *extra) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
            f"--config.model.sd_path={assets['sd']}", f"--config.model.beats_path={assets['beats']}",
            f"--config.data.data_dir={assets['data']}", "--config.data.builder_config=tiny",
            "--config.data.clip_seconds=1.0", "--config.train.trainable=embedder",
            f"--config.train.epochs={EPOCHS}", "--config.train.batch_size=2", "--config.train.val_batch_size=1",
            "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.warmup_steps=0",
            "--config.mesh.data=2", "--config.mesh.fsdp=1",
            "--config.train.sample_every_epochs=0", *extra]  # validation images: tests/test_train.py


def run(assets, workdir, fault: str | None = None, *extra, timeout: int = 300,
        space_check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MTOK_FAULT", None)
    env.pop("MTOK_NO_SPACE_CHECK", None)
    cmd = [sys.executable, str(REPO / "train.py")]
    if fault:
        env["MTOK_FAULT"] = fault
    if not space_check:
        env["MTOK_NO_SPACE_CHECK"] = "1"
    if fault or not space_check:
        cmd = [sys.executable, str(HARNESS)]
    return subprocess.run(cmd + train_args(assets, workdir, *extra), env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def restore_dir(path: pathlib.Path) -> dict:
    """Every array of a committed step (params, opt_state) as numpy, by flattened key."""
    out = {}
    for item in ("params", "opt_state"):
        if (path / item).is_dir():
            tree = ocp.StandardCheckpointer().restore(path / item)
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            out.update({f"{item}{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in leaves})
    return out


def assert_same_run(a: pathlib.Path, b: pathlib.Path) -> None:
    """Same final latest and best checkpoints (bit for bit) and the same metrics.jsonl."""
    for which in ("latest", "best"):
        sa = max(int(p.name) for p in (a / "checkpoints" / which).iterdir() if p.name.isdigit())
        sb = max(int(p.name) for p in (b / "checkpoints" / which).iterdir() if p.name.isdigit())
        assert sa == sb, which
        ta, tb = restore_dir(a / "checkpoints" / which / str(sa)), restore_dir(b / "checkpoints" / which / str(sb))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert np.array_equal(ta[k], tb[k]), (which, k)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = run(tiny_assets, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == EPOCHS * STEPS_PER_EPOCH
    return workdir


# ---------------------------------------------------------------------------------------------------
# Damage done to the newest `latest` step between two processes
# ---------------------------------------------------------------------------------------------------
def newest_latest(workdir: pathlib.Path) -> pathlib.Path:
    return max(((workdir / "checkpoints" / "latest").iterdir()), key=lambda p: int(p.name) if p.name.isdigit() else -1)


def biggest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p) and "params" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(workdir):
    f = biggest_data_file(newest_latest(workdir))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def bitflip(workdir):
    f = biggest_data_file(newest_latest(workdir))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def half_written(workdir):
    """A step directory without orbax's tmp suffix whose files stopped half-way (no atomic rename, e.g. a
    copy or a network file system): the newest step copied to step + 1, its array data cut."""
    src = newest_latest(workdir)
    dst = src.parent / str(int(src.name) + 1)
    shutil.copytree(src, dst)
    (dst / checkpoints.CHECKSUMS).unlink(missing_ok=True)
    f = biggest_data_file(dst)
    f.write_bytes(f.read_bytes()[:10])


DAMAGE = {"truncate": truncate, "bitflip": bitflip, "half_written": half_written}


def lineage_plan(seed: int = 20261201) -> list[tuple[str, str | None]]:
    """(fault, damage before the next start): ≥ 10 kill -9 at seeded moments (steps, during validation,
    between `best` and `latest`, while `latest` is being written, at random times), SIGTERM, SIGINT,
    a double SIGINT, and the three kinds of damaged newest checkpoint."""
    rng = np.random.default_rng(seed)
    n = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    return [
        (f"kill@step:{n(1, 2)}", None),
        ("kill@after_best:1", None),  # best/3 committed, latest/3 not: the old crash loop
        ("kill@after_best:1", None),  # ... and again: best/3 exists when the run reaches step 3
        (f"kill@validation:{n(1, 3)}", None),
        (f"term@step:{n(1, 2)}", None),
        ("kill@latest_inflight:1", None),
        (f"kill@seconds:{n(3, 15)}", None),
        ("kill@latest_committed:1", "truncate"),
        ("kill@latest_committed:1", "bitflip"),  # two checksummed steps: the older one is intact
        (f"int@step:{n(1, 2)}", None),
        ("int2@step:1", None),
        (f"kill@seconds:{n(3, 15)}", "half_written"),
        (f"kill@validation:{n(1, 3)}", None),
    ]


def test_kills_signals_and_damage_resume_bit_identical(tiny_assets, reference, tmp_path):
    workdir = tmp_path / "interrupted"
    outcomes, kills = [], 0
    damage_pending = None
    for fault, damage in lineage_plan():
        proc = run(tiny_assets, workdir, fault)
        fired = f"FAULT {fault}" in proc.stderr
        if damage_pending:  # the process after a damaged checkpoint fell back to the older step
            assert "falling back to latest/" in proc.stderr, (damage_pending, proc.stderr[-3000:])
            assert list((workdir / "checkpoints" / "corrupt").iterdir())
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        action = fault.split("@")[0]
        if not fired:  # the run ended before the fault point: nothing left to interrupt
            assert proc.returncode == 0, proc.stderr[-3000:]
            outcomes.append((fault, "finished"))
            break
        expected = {"kill": -9, "term": 0, "int": 130, "int2": 130}[action]
        assert proc.returncode == expected, (fault, proc.returncode, proc.stderr[-3000:])
        if action in ("term", "int"):
            # Saved at the step boundary: no step lost — latest is the last step that was logged.
            assert "interrupted at step" in proc.stderr and "rerun the same command" in proc.stderr
            last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
            assert int(newest_latest(workdir).name) == last, fault
        if action == "int2":  # the second SIGINT exits at once, without saving
            assert "second SIGINT: exiting now without saving" in proc.stderr
            assert "interrupted at step" not in proc.stderr
        kills += action == "kill"
        resumed = re.search(r"resumed from step (\d+)", proc.stderr)
        outcomes.append((fault, proc.returncode, int(resumed.group(1)) if resumed else 0, damage))
        damage_pending = damage
        if damage:
            DAMAGE[damage](workdir)
    assert kills >= 10, outcomes
    final = run(tiny_assets, workdir)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr
    assert_same_run(workdir, reference)
    print("fault outcomes (fault, exit code, resumed from step, damage done after it):")
    for row in outcomes:
        print("  ", row)


def test_signal_during_the_last_validation_finishes_the_run(tiny_assets, reference, tmp_path):
    """SIGTERM while the last epoch is validated: the run completes (exit 0, "done", no "interrupted …
    rerun" message, as there is nothing left to resume) and equals the uninterrupted one."""
    workdir = tmp_path / "last"
    val_batches = 2  # 3 validation clips in global batches of 2 (lcm of val_batch_size 1 and the 2 devices)
    proc = run(tiny_assets, workdir, f"term@validation:{(EPOCHS - 1) * val_batches + 1}")
    assert "FAULT term@validation" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0 and "done: step" in proc.stderr, proc.stderr[-3000:]
    assert "interrupted at step" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_same_run(workdir, reference)


# ---------------------------------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def two_steps(tiny_assets, tmp_path_factory):
    """A run stopped after step 2 (its `latest/2` saved), copied into each disk-full test's small disk."""
    workdir = tmp_path_factory.mktemp("two_steps") / "run"
    first = run(tiny_assets, workdir, None, "--config.train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("space_check", [True, False], ids=["refused_before_writing", "failing_inside_orbax"])
def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tiny_assets, two_steps, small_tmpfs, space_check):
    """The free-space check refuses a save that cannot fit; without it (a disk filling while orbax writes)
    the failing asynchronous write must end the same way: one line, no tmp dirs, the old step intact."""
    workdir = small_tmpfs / "run"
    shutil.copytree(two_steps, workdir, ignore=shutil.ignore_patterns(".lock"))
    step_dir = workdir / "checkpoints" / "latest" / "2"
    size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    # Leave room for the logs but not for another checkpoint.
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * max(free - size // 3, 0))
    full = run(tiny_assets, workdir, space_check=space_check)
    assert full.returncode != 0
    errors = [line for line in full.stderr.splitlines() if "no space left" in line]
    assert errors and "not saved" in errors[0] and str(workdir) in errors[0], full.stderr[-3000:]
    assert ("MB free" in errors[0]) == space_check, errors[0]  # which of the two paths reported it
    assert "Traceback" not in full.stderr and len(full.stderr.splitlines()) < 200, full.stderr[-3000:]
    assert not [p for p in (workdir / "checkpoints" / "latest").iterdir() if checkpoints.TMP_MARK in p.name]
    assert checkpoints.verify_checksums(str(step_dir))  # the previous checkpoint is intact
    (small_tmpfs / "filler").unlink()
    resumed = run(tiny_assets, workdir, None, "--config.train.max_steps=4")
    assert resumed.returncode == 0 and "resumed from step 2" in resumed.stderr, resumed.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# Workdir lock
# ---------------------------------------------------------------------------------------------------
def test_second_run_on_a_locked_workdir_is_refused(tiny_assets, tmp_path):
    workdir = tmp_path / "locked"
    with workdir_lock.WorkdirLock(workdir):
        proc = run(tiny_assets, workdir, None, timeout=120)
    assert proc.returncode != 0
    assert f"PID {os.getpid()}" in proc.stderr and "in use" in proc.stderr, proc.stderr[-2000:]
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "time": 0}))
    with caplog.at_level("WARNING", logger="mtok_jax.workdir_lock"):
        with workdir_lock.WorkdirLock(tmp_path):
            holder = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
            assert holder["pid"] == os.getpid()
            with pytest.raises(workdir_lock.WorkdirLockedError, match=f"PID {os.getpid()}"):
                workdir_lock.WorkdirLock(tmp_path).acquire()
    assert "stale lock of PID" in caplog.text
    with workdir_lock.WorkdirLock(tmp_path):  # released cleanly: no warning the second time
        pass


def test_step_without_its_checksum_file_is_tried_last(tmp_path, caplog):
    """A kill between orbax's commit and the checksum manifest leaves a newest step whose files cannot be
    checked (a bit flipped in it afterwards would go unseen): restore falls back to the older checksummed
    step and quarantines it; it is restored (with a warning) only when nothing older is readable."""
    tree = lambda v: {"w": np.full((4, 3), v, np.float32)}  # noqa: E731
    ckpt = checkpoints.Checkpointer(tmp_path)
    for step in (1, 2):
        ckpt.save_latest(step, tree(step), tree(-step), {"trainable_paths": ["w"]})
    ckpt.close()
    latest = tmp_path / "checkpoints" / "latest"
    (latest / "2" / checkpoints.CHECKSUMS).unlink()
    with caplog.at_level("WARNING", logger="mtok_jax.checkpoints"):  # sampling's reader prefers step 1 too
        assert checkpoints.restore_trained(tmp_path, tree(0), "latest")["w"][0, 0] == 1
    assert "latest/2: no checksum file" in caplog.text and "using latest/1" in caplog.text
    caplog.clear()
    ckpt = checkpoints.Checkpointer(tmp_path)
    with caplog.at_level("WARNING", logger="mtok_jax.checkpoints"):
        params, opt_state, _ = ckpt.restore_latest(tree(0), tree(0))
    assert params["w"][0, 0] == 1 and opt_state["w"][0, 0] == -1
    assert "latest/2 cannot be restored (CheckpointError: no checksum file" in caplog.text and "falling back to latest/1" in caplog.text
    assert sorted(p.name for p in latest.iterdir() if p.name.isdigit()) == ["1"]
    (latest / "1" / checkpoints.CHECKSUMS).unlink()  # now the only step, unchecked: still restored
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtok_jax.checkpoints"):
        params, _, _ = ckpt.restore_latest(tree(0), tree(0))
    ckpt.close()
    assert params["w"][0, 0] == 1 and "restored unverified" in caplog.text


UNRAISABLE = """
import gc, os, sys
from mtok_jax import checkpoints
checkpoints.Checkpointer(sys.argv[1]).close()  # installs the hook

class Pending:
    def __await__(self):
        yield

SRC = ("async def read():\\n    try:\\n        await Pending()\\n"
       "    except BaseException as e:\\n        raise Exception('read failed in ' + __file__) from e\\n")
for filename in (os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py"),
                 os.path.join(os.sep, "project", "mine.py")):
    ns = {"Pending": Pending, "__file__": filename}
    exec(compile(SRC, filename, "exec"), ns)
    coro = ns["read"]()
    coro.send(None)  # suspended inside the read, as when orbax's loop closed under it
    del coro
    gc.collect()
"""


def test_orbax_clean_up_noise_is_dropped_and_other_unraisables_pass(tmp_path):
    """A failed orbax read leaves coroutines that raise when garbage-collected ("Exception ignored in
    <coroutine ...>", dozens of tracebacks): they are dropped; any other unraisable still prints."""
    proc = subprocess.run([sys.executable, "-c", UNRAISABLE, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read failed in /project/mine.py" in proc.stderr
    assert "orbax" not in proc.stderr.replace("orbax.checkpoint", ""), proc.stderr[-3000:]


def test_asyncio_errors_of_orbax_write_tasks_are_dropped_and_others_pass():
    """asyncio's 'Task / _GatheringFuture exception was never retrieved' records whose task is orbax's
    (coroutine defined under /orbax/, or the exception raised there) are dropped; other asyncio errors
    and orbax warnings pass."""
    import logging

    def exc_raised_in(filename):
        namespace = {}
        exec(compile("def write():\n    raise ValueError('RESOURCE_EXHAUSTED: No space left on device')\n",
                     filename, "exec"), namespace)
        try:
            namespace["write"]()
        except ValueError as e:
            return e

    def record(msg, exc=None, level=logging.ERROR, name="asyncio"):
        info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        return logging.LogRecord(name, level, "/usr/lib/python3.11/asyncio/base_events.py", 1771, msg, (), info)

    keep = checkpoints._ORBAX_FILTER.filter
    orbax_file = f"{os.sep}venv{os.sep}orbax{os.sep}checkpoint{os.sep}serialization.py"
    assert not keep(record("_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished "
                           "exception=ValueError('RESOURCE_EXHAUSTED')>", exc_raised_in(orbax_file)))
    assert not keep(record(f"Task exception was never retrieved\nfuture: <Task finished coro=<write() done, "
                           f"defined at {orbax_file}:188>>"))
    assert keep(record("Task exception was never retrieved", exc_raised_in(f"{os.sep}project{os.sep}mine.py")))
    assert keep(record("orbax: slow write", level=logging.WARNING))
    # the warnings every read-only manager (sample, evaluate, export) gives are dropped; others pass
    said = [logging.LogRecord("absl", logging.WARNING, f"{os.sep}site{orbax_file}", 452, msg, (), None)
            for msg in ("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
                        "Given directory is read only=/runs/demo/checkpoints/best", "orbax: slow write")]
    assert [keep(r) for r in said] == [False, False, True]
