"""Watching a run: TensorBoard scalars and images, validation images, profiler trace, ETA.

Everything here only observes training: nothing reads or advances the training RNG, and the train
step's inputs are never donated to or modified by it, so params are bit-identical with or without it.

  WORKDIR/tensorboard/events.out.tfevents.*   (tensorboardX, no TensorFlow; process 0 only)
     train/{loss,mse,l1,l2,cosine,grad_norm,lr}          per `train.log_every` steps
     perf/{step_seconds,examples_per_second,flops_per_second}, memory/{bytes_in_use,peak_bytes_in_use}
     epoch/{train_loss,val_loss}, validation/images (the grid)          per epoch
  WORKDIR/samples/epoch_K/grid.png             one held-out clip per label, sampled with the current params
  WORKDIR/profile/                             jax.profiler trace of steps [start, stop) (TensorBoard / Perfetto)
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from mtok_jax import sample, sharding
from mtok_jax.data import pipeline

log = logging.getLogger("mtok_jax.monitor")

REPORTERS = ("jsonl", "tensorboard")


# ===================================================================================================
# TensorBoard
# ===================================================================================================
class TensorBoard:
    """Scalars and images into WORKDIR/tensorboard/ (tensorboardX); a no-op when disabled. A resumed
    run rewrites the steps after its checkpoint; TensorBoard shows the newest point of each step."""

    def __init__(self, workdir: str, enabled: bool):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.writer.add_scalar(tag, float(v), step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """image: uint8 [H, W, 3]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled jax function (XLA's cost analysis; None when not reported)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (backends without cost analysis)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def device_memory() -> dict[str, float]:
    """Bytes in use / peak on the first local device (accelerators; {} where memory_stats() is missing)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        return {}
    return {f"memory/{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


class Throughput:
    """Wall time per step between calls of `tick` (step time, examples/s, FLOP/s) and the whole-run ETA."""

    def __init__(self, examples_per_step: int, flops_per_step: float | None):
        self.examples_per_step, self.flops = examples_per_step, flops_per_step
        self.last = self.start = time.perf_counter()
        self.steps = 0

    def tick(self) -> dict[str, float]:
        now = time.perf_counter()
        dt, self.last, self.steps = now - self.last, now, self.steps + 1
        out = {"perf/step_seconds": dt, "perf/examples_per_second": self.examples_per_step / max(dt, 1e-9)}
        if self.flops:
            out["perf/flops_per_second"] = self.flops / max(dt, 1e-9)
        return out

    def exclude_since_last(self) -> None:
        """Start the next step's clock now (epoch-end work is not step time; the ETA still counts it)."""
        self.last = time.perf_counter()

    def eta(self, steps_left: int) -> str:
        """Remaining time of the run, "H:MM:SS", from the mean wall time per step so far (validation and
        validation images included)."""
        if not self.steps:
            return "?"
        seconds = int(round((time.perf_counter() - self.start) / self.steps * max(steps_left, 0)))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ===================================================================================================
# Profiler
# ===================================================================================================
class Profile:
    """A jax.profiler trace into WORKDIR/profile/ from step `start` to step `stop` (0-based step
    counts before the step; (0, 0) or start ≥ stop = off)."""

    def __init__(self, workdir: str, steps: tuple[int, int], enabled: bool):
        self.dir = os.path.join(workdir, "profile")
        self.start, self.stop = (int(s) for s in steps)
        self.enabled = enabled and self.stop > self.start
        self.active = False

    def before(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step < self.stop:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, outputs: Any = None) -> None:
        """step: steps done; stops the trace once `stop` steps are done (after `outputs` are ready)."""
        if self.active and step >= self.stop:
            jax.block_until_ready(outputs)
            self.end()

    def end(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d–%d → %s", self.start, self.stop, self.dir)


# ===================================================================================================
# Validation images
# ===================================================================================================
def held_out_clips(config) -> tuple[np.ndarray, list[str]] | None:
    """The first clip of each label in the test split (else the validation split) → (waveforms float32
    [L, N], label names [L]); None when neither split has audio."""
    d = config.data
    ds = pipeline.open_dataset(d.data_dir, d.builder_config or None)
    for split in ("test", "validation"):
        labels = np.asarray(ds.labels(split))
        if labels.shape[0] == 0:
            continue
        first = [int(np.flatnonzero(labels == lab)[0]) for lab in np.unique(labels)]
        src = ds.source(split)
        waves = np.stack([np.asarray(src[i]["audio"], np.int16) for i in first]).astype(np.float32) / 32768.0
        return waves, [ds.label_names[int(labels[i])] for i in first]
    return None


class ValidationImages:
    """One image per held-out clip (one per label, seed `sample.seed` for all, `train.sample_steps`
    denoising steps) from the current params through `sample.Pipeline.generate`, all in one jitted call
    (`sample.images_per_device` raised to cover them) → WORKDIR/samples/epoch_K/grid.png + TensorBoard."""

    def __init__(self, config, system, mesh, workdir: str, enabled: bool):
        self.every = int(config.train.sample_every_epochs)
        self.workdir, self.pipe, self.clips = workdir, None, None
        if not (enabled and self.every > 0):
            return
        self.clips = held_out_clips(config)
        if self.clips is None:
            log.warning("validation images off: the dataset has no test or validation audio")
            return
        vconfig = config.copy_and_resolve_references()
        vconfig.sample.images_per_device = -(-len(self.clips[1]) // sharding.num_batch_shards(mesh))
        self.pipe = sample.Pipeline(system=system, params={}, mesh=mesh, config=vconfig, checkpoint="training")

    def due(self, epoch: int) -> bool:
        return self.pipe is not None and epoch % self.every == 0

    def write(self, epoch: int, step: int, params: Mapping[str, Any], tb: TensorBoard) -> str:
        """epoch: epochs done; params: the full (merged) params → the grid's path."""
        from PIL import Image

        s, t = self.pipe.config.sample, self.pipe.config.train
        waves, names = self.clips
        started = time.perf_counter()
        images = self.pipe.with_params(params).generate(waves, [int(s.seed)] * len(names), num_images=1,
                                                        steps=int(t.sample_steps), guidance=float(s.guidance),
                                                        scheduler=s.scheduler)
        out = os.path.join(self.workdir, "samples", f"epoch_{epoch}")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "grid.png")
        sample.write_grid(path, images[:, 0], names)
        tb.image("validation/images", step, np.asarray(Image.open(path).convert("RGB")))
        log.info("epoch %d: %d validation images in %.1f s → %s", epoch, len(names), time.perf_counter() - started,
                 path)
        return path
