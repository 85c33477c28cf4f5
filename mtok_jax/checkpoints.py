"""Orbax checkpoints of a training run: WORKDIR/checkpoints/{latest,best}/<step>/.

* `latest` (resume): the trainable params, the optimizer state and `meta` (step, epoch, the data
  position within the epoch, the best validation loss so far, the trained leaf paths). The newest
  two are kept; when the newest cannot be restored (truncated, bit-flipped, half-written) the run
  falls back to the older one with one log line, and the broken step is moved to
  `checkpoints/corrupt/`.
* `best` (by validation loss): the trainable params and `meta`.
Frozen weights are never written: they come back from the model folders named in the config.

Safety rules (what a preempted 30-hour run needs):
* Saving a step that already exists replaces it (a resumed run that reaches a step again, e.g. a
  `best` step written just before a kill, never fails with "step already exists"); saving `best` at
  step S first removes `best` steps ≥ S, which belong to an abandoned continuation.
* Every committed step gets `mtok_checksums.json` (CRC-32 and size of each file), written once its
  asynchronous save has finished; `restore_latest` verifies it, so a corrupted file is detected at
  restore and never trained on. (A step committed by orbax whose checksum file was not yet written —
  a kill in the milliseconds between — is restored unverified: orbax's tmp-dir + rename commit makes
  it complete.)
* Orbax's leftover `*.orbax-checkpoint-tmp*` directories are removed at start. A save the free disk
  space cannot hold is refused before writing; a save that fails anyway (I/O error, a disk filled by
  someone else meanwhile) raises `CheckpointError` with one line, its tmp directory is removed and the
  previous checkpoint stays intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import threading
import time
import zlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from mtok_jax import errors
from mtok_jax import tree as tree_lib

log = logging.getLogger("mtok_jax.checkpoints")

LATEST = "latest"
BEST = "best"
CORRUPT = "corrupt"
CHECKSUMS = "mtok_checksums.json"
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(errors.UserError):
    """A checkpoint could not be written or restored; the message is one line for the user."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def _manager(workdir, which: str, max_to_keep: int | None = 1, read_only: bool = False) -> ocp.CheckpointManager:
    for name in ("absl", "asyncio"):  # orbax logs through absl's logger; its write tasks through asyncio's
        logging.getLogger(name).addFilter(_ORBAX_FILTER)  # (once: addFilter skips a filter already there)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.join(checkpoint_dir(workdir), which), options=options,
                                 item_names=("params", "opt_state", "meta"))


def _abstract(tree: Any) -> Any:
    """Arrays → ShapeDtypeStructs that keep their sharding (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# ------------------------------------------------------------------------------------------ checksums
def _file_digests(step_dir: str) -> dict[str, list[int]]:
    """{relative path: [size in bytes, CRC-32]} of every file below a step directory (checksum file excluded)."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel.startswith(CHECKSUMS):  # the checksum file and its tmp twin
                continue
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            out[rel] = [os.path.getsize(path), crc]
    return out


def write_checksums(step_dir: str) -> None:
    tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_file_digests(step_dir), f, sort_keys=True)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


UNCHECKED = "no checksum file: the run stopped between orbax's commit and the manifest, so its files cannot be checked"


def _checked_first(directory: str, steps) -> list[int]:
    """Steps newest first, those with a checksum file before those without (which are tried last)."""
    has = lambda step: os.path.exists(os.path.join(directory, str(step), CHECKSUMS))  # noqa: E731
    return sorted(steps, key=lambda step: (has(step), step), reverse=True)


def verify_checksums(step_dir: str) -> bool:
    """Raise CheckpointError when a file of the step differs from its recorded size/CRC-32 (or is
    missing). → False when no checksum file was written (unverified), True when verified."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        want = json.load(f)
    have = _file_digests(step_dir)
    for rel, (size, crc) in sorted(want.items()):
        if rel not in have:
            raise CheckpointError(f"{rel} is missing")
        if have[rel][0] != size:
            raise CheckpointError(f"{rel} has {have[rel][0]} bytes, {size} were written")
        if have[rel][1] != crc:
            raise CheckpointError(f"{rel} does not match its checksum (corrupted)")
    return True


def _nbytes(*trees: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for tree in trees for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _is_out_of_space(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text or \
        "RESOURCE_EXHAUSTED" in text


# ------------------------------------------------------------------------------------------ writer
class _Commit:
    """A save in flight: a thread waits for orbax's asynchronous commit and then writes the step's
    checksums at once (so a kill -9 soon after leaves a verifiable newest step)."""

    def __init__(self, mgr: ocp.CheckpointManager, step: int):
        self.mgr, self.step = mgr, step
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.mgr.wait_until_finished()
            if jax.process_index() == 0:
                write_checksums(os.path.join(os.fspath(self.mgr.directory), str(self.step)))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by join()
            self.error = e

    def join(self) -> BaseException | None:
        self._thread.join()
        return self.error


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs each failed write with a traceback (hundreds of lines when a disk fills up); every such
    failure reaches the user once, as CheckpointError's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}"
        if record.levelno == logging.WARNING and orbax in record.pathname:
            # every read-only manager (sampling, evaluation, export) warns that it is read-only
            return not any(m in record.getMessage() for m in _READ_ONLY_WARNINGS)
        if record.levelno < logging.ERROR:
            return True
        if orbax in record.pathname:
            return False
        # asyncio's "Task / _GatheringFuture exception was never retrieved" for orbax's own write tasks when
        # a write fails with others in flight: the task's coroutine or its exception's traceback is orbax's.
        if record.name != "asyncio":
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (orbax in record.getMessage() or _raised_in(exc, orbax))


_READ_ONLY_WARNINGS = ("read_only=True, setting save_interval_steps=0", "Given directory is read only")


def _raised_in(exc: BaseException | None, path_part: str) -> bool:
    """Whether a frame of `exc`'s traceback lies in a file whose path contains `path_part`."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if path_part in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


_ORBAX_FILTER = _DropOrbaxErrors()


def _from_orbax_cleanup(unraisable) -> bool:
    """An exception Python cannot raise anywhere ("Exception ignored in ...") left behind by a failed
    orbax read: its asyncio loop closes with reads still pending, whose coroutines then raise when they are
    garbage-collected and whose tensorstore callbacks hit the closed loop. The read's failure itself
    reaches the caller (restore_latest falls back with one warning)."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_orbax_cleanup() -> None:
    """Install (once) a sys.unraisablehook that drops orbax's clean-up noise and passes the rest on."""
    previous = sys.unraisablehook
    if getattr(previous, "_mtok_orbax", False):
        return

    def hook(unraisable):
        if _from_orbax_cleanup(unraisable):
            log.debug("dropped orbax clean-up error: %r", unraisable.exc_value)
        else:
            previous(unraisable)

    hook._mtok_orbax = True
    sys.unraisablehook = hook


class Checkpointer:
    """Writes `latest` and `best` checkpoints of one run (asynchronously); restores `latest`."""

    def __init__(self, workdir: str | os.PathLike, keep_latest: int = 2):
        _quiet_orbax_cleanup()
        self.workdir = os.path.abspath(os.fspath(workdir))
        self._remove_leftover_tmp()
        self.latest = _manager(workdir, LATEST, keep_latest)
        self.best = _manager(workdir, BEST, 1)
        self._pending: _Commit | None = None  # the save in flight

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; while another exception propagates, a save error is logged, not raised (the first
        error is the one the user needs to see)."""
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as e:
            log.error("%s", e)

    def has_latest(self) -> bool:
        """Whether any `latest` step exists (restorable or not: restore_latest decides)."""
        return bool(self.latest.all_steps())

    # -------------------------------------------------------------------- saving
    def save_latest(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any]) -> None:
        self._save(self.latest, step, _nbytes(params, opt_state), ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(meta))))

    def save_best(self, step: int, params: Any, meta: Mapping[str, Any]) -> None:
        self.wait()
        for old in self.best.all_steps():
            if old >= step:  # from a continuation that was abandoned (killed before its `latest`)
                self.best.delete(old)
        self._save(self.best, step, _nbytes(params), ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta))))

    def _save(self, mgr: ocp.CheckpointManager, step: int, nbytes: int, args: ocp.args.Composite) -> None:
        self.wait()  # one save in flight at a time
        if step in mgr.all_steps():
            mgr.delete(step)
        self._check_space(mgr, step, nbytes)
        try:
            mgr.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise ValueError, OSError, ...
            self._fail(mgr, step, e)
        self._pending = _Commit(mgr, step)

    def wait(self) -> None:
        """Block until the save in flight is committed and checksummed.
        Raises CheckpointError (one line) when it failed."""
        pending, self._pending = self._pending, None
        if pending is not None and (error := pending.join()) is not None:
            self._fail(pending.mgr, pending.step, error)

    def _check_space(self, mgr: ocp.CheckpointManager, step: int, nbytes: int) -> None:
        """Refuse a save the disk cannot hold before orbax starts writing (a write failing half-way makes
        orbax's and tensorstore's background threads print their own tracebacks)."""
        need = int(nbytes * 1.05) + (256 << 10)  # the arrays + metadata
        free = shutil.disk_usage(self.workdir).free
        if jax.process_index() == 0 and free < need:
            kept = mgr.latest_step()
            kept_text = f"; {os.path.basename(os.fspath(mgr.directory))}/{kept} is intact" if kept is not None else ""
            raise CheckpointError(f"{os.path.basename(os.fspath(mgr.directory))} checkpoint {step} not saved: no space "
                                  f"left on {self.workdir} (needs ≈{need / 2 ** 20:.1f} MB, {free / 2 ** 20:.1f} MB "
                                  f"free){kept_text}")

    def _fail(self, mgr: ocp.CheckpointManager, step: int, error: BaseException):
        """Remove what the failed save left, raise one line saying why and what it needed."""
        try:  # let orbax's other writes of this save end before their files are removed
            mgr.wait_until_finished()
        except Exception:  # noqa: BLE001 - the same failure again
            pass
        directory = os.fspath(mgr.directory)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            if name.startswith(f"{step}{TMP_MARK}"):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        mgr.reload()
        kept = mgr.latest_step()
        kept_text = f"; {os.path.basename(directory)}/{kept} is intact" if kept is not None else ""
        which = f"{os.path.basename(directory)} checkpoint {step}"
        if _is_out_of_space(error):
            sizes = [_dir_bytes(os.path.join(directory, str(s))) for s in mgr.all_steps()]
            need = f" (needs ≈{max(sizes) / 2 ** 20:.1f} MB)" if sizes else ""
            raise CheckpointError(f"{which} not saved: no space left on {self.workdir}{need}{kept_text}") from error
        raise CheckpointError(f"{which} not saved: {_one_line(error)}{kept_text}") from error

    # -------------------------------------------------------------------- restoring
    def latest_step(self) -> int | None:
        """Newest `latest` step on disk (after the saves in flight are committed)."""
        return self.latest.latest_step()

    def restore_latest(self, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict] | None:
        """→ (params, opt_state, meta) of the newest restorable `latest` checkpoint, placed like the given
        trees (arrays or ShapeDtypeStructs with shardings), or None when there is none.

        A step that fails its checksum or cannot be read is moved to checkpoints/corrupt/ (one warning)
        and the next older one is tried; CheckpointError when steps exist but none restores. A step
        without its checksum file (killed after orbax's commit, before the manifest) counts as unfinished
        while an older checksummed step exists: its files cannot be checked, so it is tried last."""
        self.wait()
        directory = os.fspath(self.latest.directory)
        steps = _checked_first(directory, self.latest.all_steps())
        problems = []
        for step in steps:
            step_dir = os.path.join(directory, str(step))
            try:
                verified = verify_checksums(step_dir)
                meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - unreadable or corrupted step
                problems.append((step, e))
                continue
            self._check_paths(meta, params_like, step)
            try:
                out = self.latest.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(_abstract(params_like)),
                    opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                problems.append((step, e))
                continue
            tried = {s for s, _ in problems}
            problems += [(s, CheckpointError(UNCHECKED)) for s in steps if s > step and s not in tried]
            for bad, e in sorted(problems, key=lambda problem: -problem[0]):
                log.warning("checkpoint latest/%d cannot be restored (%s); falling back to latest/%d", bad,
                            _one_line(e), step)
                self._quarantine(bad)
            if not verified:
                log.warning("checkpoint latest/%d has no checksum file (killed right after its commit) and no "
                            "older step is restorable: restored unverified", step)
            return out["params"], out["opt_state"], dict(out["meta"])
        if problems:
            listed = "; ".join(f"latest/{s}: {_one_line(e)}" for s, e in problems)
            raise CheckpointError(f"no checkpoint under {self.latest.directory} can be restored ({listed}); "
                                  f"move {checkpoint_dir(self.workdir)} away to start over")
        return None

    def _check_paths(self, meta: Mapping, params_like: Any, step: int) -> None:
        have = sorted(tree_lib.flatten(params_like))
        if list(meta["trainable_paths"]) != have:
            raise CheckpointError(f"{self.latest.directory}/{step} trained {len(meta['trainable_paths'])} leaves, "
                                  f"the config trains {len(have)} other ones (train.trainable changed?): use a "
                                  f"new workdir")

    def _quarantine(self, step: int) -> None:
        """Move a broken `latest` step out of orbax's sight (kept for inspection)."""
        if jax.process_index() != 0:
            return
        target = os.path.join(checkpoint_dir(self.workdir), CORRUPT, f"latest_{step}_{int(time.time())}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(os.fspath(self.latest.directory), str(step)), target)
        self.latest.reload()

    def _remove_leftover_tmp(self) -> None:
        """Orbax's uncommitted `<step>.orbax-checkpoint-tmp-*` directories from an interrupted save."""
        if jax.process_index() != 0:
            return
        for which in (LATEST, BEST):
            directory = os.path.join(checkpoint_dir(self.workdir), which)
            for name in os.listdir(directory) if os.path.isdir(directory) else ():
                if TMP_MARK in name:
                    log.info("removing unfinished checkpoint %s/%s", which, name)
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    def close(self) -> None:
        """Commit what is in flight (errors are raised) and release the managers."""
        try:
            self.wait()
        finally:
            for mgr in (self.latest, self.best):
                try:
                    mgr.close()
                except Exception as e:  # noqa: BLE001 - a failed save was already reported by wait()
                    log.debug("closing %s: %s", mgr.directory, _one_line(e))


def saved_steps(workdir: str | os.PathLike) -> dict[str, list[int]]:
    """{'best': [steps], 'latest': [steps]}: the step folders on disk (read without orbax or any model)."""
    out = {}
    for name in (BEST, LATEST):
        folder = os.path.join(checkpoint_dir(workdir), name)
        out[name] = sorted(int(n) for n in (os.listdir(folder) if os.path.isdir(folder) else ()) if n.isdigit())
    return out


def select(workdir: str | os.PathLike, value: str | None) -> str | int | None:
    """The checkpoint a `--checkpoint` value names, checked on disk before any model loads.

    value: None or '' (default: `best`, else `latest` with a log line), 'best', 'latest', a step, or
    'none' (→ None, the untrained model). One-line CheckpointError naming what exists when it is missing."""
    value = (value or "").strip().lower()
    if value == "none":
        return None
    if value not in ("", BEST, LATEST) and not value.isdigit():
        raise CheckpointError(f"--checkpoint={value}: expected best, latest, a step number or none")
    have = saved_steps(workdir)
    which = int(value) if value.isdigit() else value
    if which == "" and not have[BEST] and have[LATEST]:
        log.info("no best checkpoint yet (no validation has finished) in %s: using latest/%d",
                 workdir, have[LATEST][-1])
        return LATEST
    which = which or BEST
    if (have[which] if isinstance(which, str) else which in have[BEST] + have[LATEST]):
        return which
    exist = "; ".join(f"{name}: {', '.join(map(str, steps))}" for name, steps in have.items() if steps)
    hint = f"exist: {exist}" if exist else "none exist (train it first, or --checkpoint none for the untrained model)"
    raise CheckpointError(f"no {which if isinstance(which, str) else f'step {which}'} checkpoint in "
                          f"{checkpoint_dir(workdir)}; {hint}")


def _verified_step(mgr: ocp.CheckpointManager, name: str, which: str | int) -> int | None:
    """The step of `mgr` that `which` names, its files checked against their checksums; None when it has
    none. `latest` falls back to the older kept step (a warning) when the newest is damaged; a damaged
    `best` or explicit step is a one-line CheckpointError (never sampled from silently). A `latest` step
    without its checksum file is used only when no older checksummed one is readable."""
    directory = os.fspath(mgr.directory)
    steps = _checked_first(directory, mgr.all_steps())
    if isinstance(which, int):
        steps = [which] if which in steps else []
    elif name == BEST:
        steps = steps[:1]
    problems, damaged = [], set()
    for step in steps:
        try:
            verified = verify_checksums(os.path.join(directory, str(step)))
        except CheckpointError as e:
            problems.append(f"{name}/{step}: {e}")
            damaged.add(step)
            continue
        problems += [f"{name}/{s}: {UNCHECKED}" for s in steps if s > step and s not in damaged]
        for problem in problems:
            log.warning("checkpoint %s; using %s/%d", problem, name, step)
        if not verified:
            log.warning("checkpoint %s/%d has no checksum file: its files are not checked", name, step)
        return step
    if problems:
        raise CheckpointError(f"checkpoint {'; '.join(problems)} (under {mgr.directory}): choose another with "
                              f"--checkpoint best|latest|STEP")
    return None


def restore_trained(workdir: str | os.PathLike, params: Mapping[str, Any], which: str | int = "best") -> dict:
    """The full params dict with the trained leaves replaced by those of a checkpoint of `workdir`.

    which: 'best' (lowest validation loss), 'latest', or an int step (searched in latest, then best).
    Restored leaves get the dtype and sharding of the leaves they replace. The step's files are checked
    against their checksums first (`_verified_step`).
    """
    candidates = [LATEST, BEST] if isinstance(which, int) else [which]
    if which not in (LATEST, BEST) and not isinstance(which, int):
        raise ValueError(f"checkpoint {which!r}: expected 'best', 'latest' or a step number")
    for name in candidates:
        if not os.path.isdir(os.path.join(checkpoint_dir(workdir), name)):
            continue
        mgr = _manager(workdir, name, None, read_only=True)
        try:  # closed also when the step is damaged or does not fit the model
            step = _verified_step(mgr, name, which)
            if step is None:
                continue
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            flat = tree_lib.flatten(params)
            missing = [p for p in meta["trainable_paths"] if p not in flat]
            if missing:
                raise ValueError(f"checkpoint {name}/{step} has leaves the model lacks, e.g. {missing[:3]}")
            target = traverse_util.unflatten_dict({p: flat[p] for p in meta["trainable_paths"]}, sep="/")
            trained = mgr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(target))))["params"]
        finally:
            mgr.close()
        return tree_lib.merge_params(trained, params)
    raise FileNotFoundError(f"no {which!r} checkpoint under {checkpoint_dir(workdir)}")
