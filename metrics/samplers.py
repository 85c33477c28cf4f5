"""Sampler agreement: the same audio, seeds, guidance and prompt through several samplers, each compared
with a reference sampler (default PNDM at 50 steps, the thesis's setting).

  python -m metrics.samplers [--workdir runs/demo] [--samplers dpm:20,dpm:25,ddim:25,euler:25]
      [--reference pndm:50] [--audio FILE_OR_DIR] [--per_label 1] [--num_images 2] [--guidance G]
      [--seed S] [--checkpoint best|latest|STEP|none] [--out DIR] [--config configs/X.py] [--config.a.b=value ...]

A sampler is `KIND:STEPS` (KIND in mtok_jax.constants.SAMPLERS). Each one's images start from the same
noise as the reference's (the keys depend on the seed only), so their difference is the solvers'
disagreement on one probability-flow ODE: PSNR (dB, per image, averaged) and mean absolute difference
(0–255 pixel levels) against the reference, and the UNet passes per image (the loop length; each pass
evaluates the conditional and unconditional branch as one batch), which sets the sampling time.

Outputs in OUT (default WORKDIR/samplers): samplers.json (a record per sampler), samplers.md (the table)
and grid.png (a row per sampler, the reference first; every column one audio file and seed; each
cell captioned with its PSNR).
The config is the run's own WORKDIR/config.json unless --config is given; the default audio is the
dataset's held-out test audio (as sample.py), `--per_label` files per label.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from mtok_jax import checkpoints, cli, config_utils, errors, sample
from mtok_jax.constants import SAMPLERS
from mtok_jax.models import diffusion

log = logging.getLogger("mtok_jax.samplers")


def parse_sampler(spec: str, flag: str = "--samplers") -> tuple[str, int]:
    """'dpm:20' → ('dpm', 20); a one-line UserError naming `flag` otherwise."""
    kind, _, steps = spec.strip().partition(":")
    if kind not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise errors.UserError(f"{flag}: {spec!r} is not KIND:STEPS with KIND one of {', '.join(SAMPLERS)} "
                               f"and STEPS ≥ 1 (e.g. dpm:20)")
    return kind, int(steps)


IDENTICAL_DB = 100.0  # PSNR reported for identical images (above uint8's one-level 48.1 dB; JSON has no inf)


def psnr_db(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] twice → PSNR per image in dB (peak 255; IDENTICAL_DB where identical)."""
    mse = ((images.astype(np.float64) - reference.astype(np.float64)) ** 2).reshape(len(images), -1).mean(1)
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(255.0 ** 2 / mse), IDENTICAL_DB)


def unet_passes(config, kind: str, steps: int) -> int:
    """Denoising loop length of `kind` at `steps` (PNDM: steps + 1): UNet passes per image."""
    sched, state = diffusion.sampler_from_config(
        diffusion.read_scheduler_config(config.model.sd_path, allow_download=config.model.allow_download), kind)
    return len(sched.set_timesteps(state, steps, (1, 4, 8, 8)).timesteps)


def compare(pipe: sample.Pipeline, waveforms: np.ndarray, seeds: Sequence[int], samplers: Sequence[tuple[str, int]],
            reference: tuple[str, int], *, num_images: int, guidance: float,
            prompt: str | None = None) -> tuple[list[dict[str, Any]], dict[tuple[str, int], np.ndarray]]:
    """Every sampler's images of `waveforms` [B, N] (one seed each) → (records, {(kind, steps): uint8
    [B·num_images, H, W, 3]}); the reference's record comes first. Record: sampler, kind, steps,
    unet_passes, psnr_db (mean; None for the reference), psnr_db_min, psnr_db_images (per image, in
    the images' order; not for the reference), mean_abs_diff."""
    images = {}
    for kind, steps in [reference, *[s for s in samplers if s != reference]]:
        log.info("sampling with %s:%d", kind, steps)
        out = pipe.generate(waveforms, seeds, num_images=num_images, steps=steps, guidance=guidance,
                            scheduler=kind, prompt=prompt)
        images[kind, steps] = out.reshape(-1, *out.shape[2:])
    ref = images[reference]
    records = []
    for (kind, steps), imgs in images.items():
        record = dict(sampler=f"{kind}:{steps}", kind=kind, steps=steps,
                      unet_passes=unet_passes(pipe.config, kind, steps), psnr_db=None, psnr_db_min=None,
                      mean_abs_diff=float(np.abs(imgs.astype(np.int16) - ref.astype(np.int16)).mean()))
        if (kind, steps) != reference:
            db = psnr_db(imgs, ref)
            record.update(psnr_db=float(np.mean(db)), psnr_db_min=float(np.min(db)),
                          psnr_db_images=[round(float(x), 2) for x in db])
        records.append(record)
    return records, images


def markdown(records: Sequence[dict[str, Any]], reference: str) -> str:
    rows = [f"| sampler | UNet passes | PSNR vs {reference} (dB, mean / min) | mean abs diff (0–255) |",
            "|---|---:|---:|---:|"]
    for r in records:
        psnr = "reference" if r["psnr_db"] is None else f"{r['psnr_db']:.1f} / {r['psnr_db_min']:.1f}"
        rows.append(f"| {r['sampler']} | {r['unet_passes']} | {psnr} | {r['mean_abs_diff']:.2f} |")
    return "\n".join(rows)


def write_outputs(out_dir: str, records: Sequence[dict], images: dict[tuple[str, int], np.ndarray],
                  settings: dict[str, Any]) -> None:
    """samplers.json, samplers.md and grid.png (rows in record order) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samplers.json"), "w") as f:
        json.dump(dict(settings, samplers=list(records)), f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "samplers.md"), "w") as f:
        f.write(markdown(records, records[0]["sampler"]) + "\n")
    rows = [images[r["kind"], r["steps"]] for r in records]
    captions = [r["sampler"] if r["psnr_db"] is None else f"{r['sampler']} {r['psnr_db_images'][i]:.1f} dB"
                for r in records for i in range(len(rows[0]))]
    sample.write_grid(os.path.join(out_dir, "grid.png"), np.concatenate(rows), captions, columns=len(rows[0]))


# ------------------------------------------------------------------------------------------ CLI
def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    cli.define_config_file("config", None, "experiment config file (configs/*.py); default with --workdir: the "
                           "run's config.json", argv, flag_values=fv)
    define = cli.definer(fv)
    define("string", "workdir", None, "training workdir (default runs/<config.workdir_name>)")
    define("string", "checkpoint", None, cli.CHECKPOINT_HELP)
    define("string", "samplers", "dpm:20,dpm:25,ddim:25,euler:25", "comma-separated KIND:STEPS to compare")
    define("string", "reference", "pndm:50", "KIND:STEPS the others are compared with")
    define("string", "audio", None, "audio file or folder (default: the dataset's held-out test audio)")
    define("integer", "per_label", 1, "with the default audio: files per label (0 = all)")
    define("integer", "num_images", 1, "images per audio file")
    define("float", "guidance", None, "classifier-free guidance scale (default config.sample.guidance)")
    define("integer", "seed", None, "seed of the first audio file, + i for file i (default config.sample.seed)")
    define("string", "out", None, "output folder (default WORKDIR/samplers)")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    fv, _ = cli.parse_command("python -m metrics.samplers", __doc__, _define, argv)
    cli.setup_logging()
    if fv.config is None:
        raise app.UsageError("needs --workdir with its config.json, or --config")
    config = config_utils.validate(fv.config)
    reference = parse_sampler(fv.reference, "--reference")
    samplers = [parse_sampler(s) for s in fv.samplers.split(",") if s.strip()]
    workdir = fv.workdir or cli.default_workdir(config)
    checkpoint = checkpoints.select(workdir, fv.checkpoint)  # before any model loads
    audio = sample.find_audio(fv.audio) if fv.audio else None
    manual = None if audio else sample.manual_dir(config)  # (checked before the models load)
    pipe = sample.load_pipeline(config, workdir, checkpoint)
    if audio is None:
        audio = sample.held_out_audio(manual, pipe.system.labels, fv.per_label)
    kept, waves, skipped = sample.load_clips(config, audio)
    if not waves:
        raise sample.NoImages(f"no image made: all {len(audio)} audio files were skipped (see the log)")
    audio = [audio[i] for i in kept]
    seed = config.sample.seed if fv.seed is None else fv.seed
    guidance = config.sample.guidance if fv.guidance is None else fv.guidance
    records, images = compare(pipe, np.stack(waves), [seed + i for i in range(len(audio))], samplers, reference,
                              num_images=fv.num_images, guidance=guidance)
    if skipped:
        log.warning("%d of %d audio files skipped (undecodable)", len(skipped), len(skipped) + len(audio))
    out = fv.out or os.path.join(workdir, "samplers")
    write_outputs(out, records, images, dict(audio=[os.path.abspath(a) for a in audio], seed=seed,
                                             guidance=float(guidance), num_images=fv.num_images,
                                             checkpoint=checkpoint, workdir=os.path.abspath(workdir)))
    print(markdown(records, fv.reference))
    print(f"\nwrote {out}/ (samplers.json, samplers.md, grid.png)", file=sys.stderr)
    return records


if __name__ == "__main__":
    cli.run(main)
