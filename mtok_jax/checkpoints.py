"""Orbax checkpoints of a training run: WORKDIR/checkpoints/{latest,best}/<step>/.

* `latest` (resume): the trainable params, the optimizer state and `meta` (step, epoch, the data
  position within the epoch, the best validation loss so far, the trained leaf paths).
* `best` (by validation loss): the trainable params and `meta`.
Frozen weights are never written: they come back from the model folders named in the config.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from mtok_jax import sharding

LATEST = "latest"
BEST = "best"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def _manager(workdir, which: str, max_to_keep: int | None = 1, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only)
    return ocp.CheckpointManager(os.path.join(checkpoint_dir(workdir), which), options=options,
                                 item_names=("params", "opt_state", "meta"))


def _abstract(tree: Any) -> Any:
    """Arrays → ShapeDtypeStructs that keep their sharding (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
    """Writes `latest` and `best` checkpoints of one run; restores `latest` for resuming."""

    def __init__(self, workdir: str | os.PathLike, keep_latest: int = 1):
        self.latest = _manager(workdir, LATEST, keep_latest)
        self.best = _manager(workdir, BEST, 1)

    def save_latest(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any]) -> None:
        self.latest.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(meta))), force=True)

    def save_best(self, step: int, params: Any, meta: Mapping[str, Any]) -> None:
        self.best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta))), force=True)

    def restore_latest(self, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict] | None:
        """→ (params, opt_state, meta) of the newest `latest` checkpoint, placed like the given trees
        (arrays or ShapeDtypeStructs with shardings), or None when there is none."""
        self.latest.wait_until_finished()
        step = self.latest.latest_step()
        if step is None:
            return None
        meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        have = sorted(traverse_util.flatten_dict(sharding._plain(params_like), sep="/"))
        if list(meta["trainable_paths"]) != have:
            raise ValueError(f"{self.latest.directory}/{step} trained {len(meta['trainable_paths'])} leaves, the "
                             f"config trains {len(have)} other ones (train.trainable changed?): use a new workdir")
        out = self.latest.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
            meta=ocp.args.JsonRestore()))
        return out["params"], out["opt_state"], dict(out["meta"])

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_trained(workdir: str | os.PathLike, params: Mapping[str, Any], which: str | int = "best") -> dict:
    """The full params dict with the trained leaves replaced by those of a checkpoint of `workdir`.

    which: 'best' (lowest validation loss), 'latest', or an int step (searched in latest, then best).
    Restored leaves get the dtype and sharding of the leaves they replace.
    """
    candidates = [LATEST, BEST] if isinstance(which, int) else [which]
    if which not in (LATEST, BEST) and not isinstance(which, int):
        raise ValueError(f"checkpoint {which!r}: expected 'best', 'latest' or a step number")
    for name in candidates:
        if not os.path.isdir(os.path.join(checkpoint_dir(workdir), name)):
            continue
        mgr = _manager(workdir, name, None, read_only=True)
        step = mgr.latest_step() if not isinstance(which, int) else which
        if step is None or step not in mgr.all_steps():
            mgr.close()
            continue
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        flat = traverse_util.flatten_dict(sharding._plain(params), sep="/")
        missing = [p for p in meta["trainable_paths"] if p not in flat]
        if missing:
            raise ValueError(f"checkpoint {name}/{step} has leaves the model lacks, e.g. {missing[:3]}")
        target = traverse_util.unflatten_dict({p: flat[p] for p in meta["trainable_paths"]}, sep="/")
        trained = mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target))))["params"]
        mgr.close()
        return sharding.merge_params(trained, params)
    raise FileNotFoundError(f"no {which!r} checkpoint under {checkpoint_dir(workdir)}")
