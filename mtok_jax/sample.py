"""Images from music: trained audio token → CLIP text states → guided denoising → VAE decode.

  pipe = load_pipeline(config, workdir, checkpoint='best')
  images = pipe.generate(waveforms [B, N], seeds [B], num_images=4, steps=50, guidance=7.5,
                         scheduler='pndm')                     # uint8 [B, num_images, H, W, 3]
  # optional: prompt='a painting of <*>', negative_prompt='blurry', progress=lambda k, n: ...

One jit per (scheduler, steps): audio token (embedder dropout per the config), text states of the
prompt (default: the config's inference prompt; the tokenized prompt is an argument, so another prompt
needs no recompile), the unconditional states of the negative prompt (default "") for classifier-free
guidance, initial noise, the whole denoising loop (`lax.fori_loop`, mtok_jax.models.diffusion.denoise_latents)
and the VAE decode. It is compiled for one batch shape only, `config.sample.images_per_device`
(default 1) images per device, the example axis sharded over the mesh (`config.mesh`); `max_batch`
only sets how many such calls are dispatched per host round trip. Image j of an audio with seed s
uses the key fold_in(key(s), j) for both its audio-token dropout and its noise, so an image depends
only on (audio, seed, j, settings), never on the batch it was generated in or on `max_batch` (XLA's
float summation order follows the compiled shape, so another shape changes ≈1e-4 of the uint8 values
by one LSB). With 1 image per device: measured byte-identical for max_batch 1/3/8 and 1 vs 8 devices
(CPU); cost on the shared 2-core CPU demo (18 images, 20 steps, interleaved runs) 9.4–9.6 s vs
6.2–9.6 s with 8 per device. On an accelerator a larger `images_per_device` fills the chip better;
images then depend on that value (recorded in samples.jsonl) but still not on `max_batch` or the
device count. Every denoising step reports to the host (`jax.debug.callback`) for `progress(k, n)`.

`sample_files` adds file handling: audio decode (any format `mtok_jax.audio.io` reads), labels from
the folder names, PNG per image, a captioned grid and `samples.jsonl` (one line per image with the
audio path, label, seed, index and every setting needed to regenerate it). A file that cannot be
decoded (unreadable, empty, too short, silent) is logged as `path: reason` and skipped; the others are
still generated, and `skipped.jsonl` beside `samples.jsonl` lists the skipped files, one
`{"audio": path, "reason": ...}` per line (empty when none). File i keeps seed + i whether or not an
earlier file was skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import textwrap
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mtok_jax import checkpoints, config_utils, errors, sharding
from mtok_jax import tree as tree_lib
from mtok_jax import system as system_lib
from mtok_jax.audio.io import AudioDecodeError, load_audio
from mtok_jax.data import pipeline
from mtok_jax.data.sources import AUDIO_EXTS, normalize_label, scan
from mtok_jax.models import diffusion
from mtok_jax.models import text as text_lib

log = logging.getLogger("mtok_jax.sample")


class NoImages(errors.UserError, ValueError):
    """`sample_files` could decode none of its audio files (each is listed in skipped.jsonl)."""


def check_prompt(prompt: str, placeholder: str) -> str:
    """`prompt` if it holds `placeholder` (the audio token, `<*>`) exactly once, else UserError."""
    if prompt.count(placeholder) != 1:
        raise errors.UserError(f"the prompt must contain {placeholder} exactly once, where the music goes "
                               f"(found {prompt.count(placeholder)}): {prompt!r}")
    return prompt


def prompt_ids(system: system_lib.System, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """A prompt template with exactly one placeholder (`<*>`) → (ids int32 [1, 77], position int32 [1])."""
    placeholder = system.config.prompt.placeholder
    check_prompt(prompt, placeholder)
    ids, pos = text_lib.tokenize_prompts(system.tokenizer, [prompt], placeholder)
    return np.asarray(ids, np.int32), np.asarray(pos, np.int32)


def latent_shape(system: system_lib.System) -> tuple[int, int, int]:
    """(C, h, w) of the UNet latents for the sampled image size (system_lib.sample_hw)."""
    h, w = config_utils.sample_hw(system.config)
    factor = 2 ** (len(system.vae.block_out_channels) - 1)
    return int(system.unet.in_channels), h // factor, w // factor


def generate_images(system: system_lib.System, params: Mapping[str, Any], uncond: jax.Array,
                    waveforms: jax.Array, key_data: jax.Array, guidance: jax.Array, *, scheduler, state,
                    steps: int, prompt: tuple[jax.Array, jax.Array] | None = None, on_step=None) -> jax.Array:
    """The jittable core: waveforms [N, S], raw keys uint32 [N, 2] → uint8 images [N, H, W, 3].

    uncond: [1, 77, D] unconditional states; guidance: scalar; prompt: `prompt_ids` of the prompt
    (default: the config's inference prompt); on_step: host function of the step index (progress).
    Pure function of its arguments. The weights are cast to the compute dtype once, before the loop
    (with model.dtype=bfloat16 the denoising steps read bfloat16 weights, as training's frozen ones).
    """
    params = tree_lib.cast_floating(params, system_lib.compute_dtype(system.config))
    keys = jax.random.wrap_key_data(key_data)
    token_keys, noise_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    token = system_lib.audio_token(system, params, waveforms, rng=token_keys, train=False)
    cond = system_lib.text_states(system, params, token, prompt or "inference").astype(jnp.float32)
    uncond = jnp.broadcast_to(uncond, cond.shape)
    shape = latent_shape(system)
    latents = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(noise_keys)
    latents = diffusion.denoise_latents(system.unet, params["unet"], scheduler, state, cond, uncond, latents,
                                        num_steps=steps, guidance=guidance, on_step=on_step,
                                        attention=system.attention, conv=system.conv)
    return diffusion.images_to_uint8(diffusion.decode_images(system.vae, params["vae"], latents))


def image_keys(seeds: Sequence[int], num_images: int) -> np.ndarray:
    """uint32 [B·num_images, 2]: key of image j of audio b = fold_in(key(seeds[b]), j)."""
    def one(seed, j):
        return jax.random.key_data(jax.random.fold_in(jax.random.key(int(seed)), j))

    return np.stack([np.asarray(one(s, j)) for s in seeds for j in range(num_images)]).astype(np.uint32)


@dataclasses.dataclass
class Pipeline:
    """A loaded system with trained params placed on the mesh; `generate` runs the jitted sampler."""

    system: system_lib.System
    params: dict[str, Any]
    mesh: jax.sharding.Mesh
    config: Any
    checkpoint: str | int | None = None
    workdir: str | None = None
    max_batch: int = 8  # images dispatched per host round trip (no effect on the images)
    _uncond: dict = dataclasses.field(default_factory=dict)  # negative prompt → states [1, 77, D]
    _plain_states: Any = None
    _compiled: dict = dataclasses.field(default_factory=dict)
    _progress: list = dataclasses.field(default_factory=lambda: [None])  # [the running call's step hook],
    # one holder shared with every with_params copy, whose calls run the samplers compiled with this one's

    def _step_done(self, i, n) -> None:
        """Host side of the per-step callback; an error here would abort XLA, so it is only logged."""
        if self._progress[0] is not None:
            try:
                self._progress[0](int(i), int(n))
            except Exception as e:  # noqa: BLE001
                log.warning("progress callback failed (%s: %s); progress reports stop", type(e).__name__, e)
                self._progress[0] = None

    def _sampler(self, kind: str, steps: int):
        """(jitted generate_images for sample.images_per_device × devices images, scheduler state)."""
        key = (kind, steps)
        if key not in self._compiled:
            sched, state = diffusion.sampler_from_config(
                diffusion.read_scheduler_config(self.config.model.sd_path,
                                                allow_download=self.config.model.allow_download), kind)
            data = sharding.batch_sharding(self.mesh)
            fn = functools.partial(generate_images, self.system, scheduler=sched, steps=steps,
                                   on_step=self._step_done)
            self._compiled[key] = (jax.jit(fn, out_shardings=data), state)
        return self._compiled[key]

    def with_params(self, params: Mapping[str, Any]) -> "Pipeline":
        """The same pipeline (sharing its compiled samplers) with other params, e.g. the current
        training params for validation images."""
        return dataclasses.replace(self, params=params, _uncond={})  # states of the new text params

    def restored(self, workdir: str | os.PathLike, checkpoint: str | int) -> "Pipeline":
        """The same pipeline with the trained leaves of `workdir`'s checkpoint ('best' | 'latest' | step)
        in place of its own (e.g. the untrained init loaded once, then each checkpoint to compare)."""
        params = checkpoints.restore_trained(workdir, self.params, checkpoint)
        return dataclasses.replace(self.with_params(params), checkpoint=checkpoint, workdir=os.path.abspath(workdir))

    def negative_states(self, negative_prompt: str = system_lib.UNCONDITIONAL_PROMPT) -> jax.Array:
        """Unconditional states [1, 77, D] of `negative_prompt` (one jit for every prompt; cached)."""
        if negative_prompt not in self._uncond:
            if self._plain_states is None:
                self._plain_states = jax.jit(functools.partial(system_lib.unconditional_states, self.system))
            ids = np.asarray(system_lib.negative_prompt_ids(self.system, negative_prompt))
            self._uncond[negative_prompt] = self._plain_states(self.params["text"], ids)
        return self._uncond[negative_prompt]

    def generate(self, waveforms, seeds: Sequence[int], *, num_images: int, steps: int, guidance: float,
                 scheduler: str = "pndm", prompt: str | None = None,
                 negative_prompt: str = system_lib.UNCONDITIONAL_PROMPT, progress=None) -> np.ndarray:
        """waveforms float32 [B, N] (16 kHz, [-1, 1]), one seed per waveform → uint8 [B, num_images, H, W, 3].

        prompt: template with one `<*>` (default: config.prompt.inference); negative_prompt: the
        unconditional branch of guidance; progress(k, n): called at denoising step k of n (all jit
        calls of this request together; PNDM takes steps + 1)."""
        waveforms = np.asarray(waveforms, np.float32)
        if waveforms.ndim != 2 or len(seeds) != waveforms.shape[0]:
            raise ValueError(f"waveforms {waveforms.shape} need shape [B, N] and one seed each (got {len(seeds)})")
        ids = tuple(np.asarray(a) for a in prompt_ids(self.system, self.config.prompt.inference
                                                       if prompt is None else prompt))
        uncond = self.negative_states(negative_prompt)
        waves = np.repeat(waveforms, num_images, axis=0)
        keys = image_keys(seeds, num_images)
        total = waves.shape[0]
        # The one compiled batch shape (XLA picks its blocking, hence float summation order, from it).
        chunk = int(self.config.sample.images_per_device) * sharding.num_batch_shards(self.mesh)
        fn, state = self._sampler(scheduler, int(steps))
        data = sharding.batch_sharding(self.mesh)
        idx = np.minimum(np.arange(int(math.ceil(total / chunk)) * chunk), total - 1)  # pad by repetition
        # With a progress hook every call is waited for (the hook knows which call reports); without,
        # up to max_batch images are dispatched per host round trip.
        per_trip = 1 if progress is not None else max(1, int(math.ceil(self.max_batch / chunk)))
        calls = len(idx) // chunk
        out = []
        for first in range(0, calls, per_trip):
            self._progress[0] = None if progress is None else _once_per_step(progress, first, calls)
            try:
                # every process holds all inputs and computes its devices' share; all get the images
                pending = [fn(self.params, uncond, sharding.put(waves[idx[c * chunk:(c + 1) * chunk]], data),
                              sharding.put(keys[idx[c * chunk:(c + 1) * chunk]], data), jnp.float32(guidance),
                              state=state, prompt=ids)
                           for c in range(first, min(first + per_trip, calls))]
                out.extend(sharding.to_host(x) for x in pending)
            finally:
                self._progress[0] = None
        images = np.concatenate(out)[:total]
        return images.reshape(waveforms.shape[0], num_images, *images.shape[1:])


def _once_per_step(progress, call: int, calls: int):
    """Step hook for jit call `call` of `calls` (n loop steps each): progress(call·n + i + 1, calls·n)
    the first time step i reports."""
    seen = [-1]

    def hook(i: int, n: int) -> None:
        if i > seen[0]:
            seen[0] = i
            progress(call * n + i + 1, calls * n)

    return hook


def load_pipeline(config, workdir: str | os.PathLike | None, checkpoint: str | int | None = "best",
                  max_batch: int = 8, labels: Sequence[str] | None = None) -> Pipeline:
    """Load the system of `config`, replace its trained leaves by `workdir`'s checkpoint
    ('best' | 'latest' | step; None = no checkpoint, the untrained init) and place params on the mesh.
    `labels` (output file names, held-out audio) default: the configured dataset's, none if it is not built."""
    labels = pipeline.configured_labels(config) if labels is None else labels
    system, params = system_lib.load_system(config, labels)
    mesh = sharding.make_mesh(config.mesh)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    placement = sharding.param_shardings(mesh, shapes, shard=mesh.shape["fsdp"] > 1,
                                         min_size=config.train.fsdp_min_size)
    pipe = Pipeline(system=system, params=sharding.put(params, placement), mesh=mesh, config=config,
                    max_batch=max_batch)
    return pipe if checkpoint is None else pipe.restored(workdir, checkpoint)


# ------------------------------------------------------------------------------------------ files
def find_audio(path: str | os.PathLike) -> list[str]:
    """A file, or every audio file below a folder (sorted; extensions of `mtok_jax.data.sources`)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--audio {path}: no such file or folder")
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                   if os.path.splitext(f)[1].lower() in AUDIO_EXTS and not f.startswith("."))
    if not found:
        raise FileNotFoundError(f"--audio {path}: no audio files ({' '.join(sorted(AUDIO_EXTS))})")
    return found


def label_of(path: str, labels: Sequence[str]) -> str | None:
    """The label named by one of the file's parent folders (`audio/<label>/…` layout), else None."""
    known = {normalize_label(l): l for l in labels}
    for part in reversed(os.path.normpath(os.path.dirname(path)).split(os.sep)):
        if normalize_label(part) in known:
            return known[normalize_label(part)]
    return None


def manual_dir(config) -> str:
    """<data_dir>/../manual, the dataset's source folders (where the default held-out audio is); a
    one-line UserError when it is missing."""
    path = os.path.join(os.path.dirname(os.path.normpath(config.data.data_dir)), "manual")
    if not os.path.isdir(path):
        raise errors.UserError(f"no --audio given and no demo manual dir at {path} (run `make demo`)")
    return path


def load_clips(config, paths: Sequence[str], start: float = 0.0) -> tuple[list[int], list[np.ndarray], list[dict]]:
    """`load_clip` of each file → (indices of the decoded files, their clips, skip records {'audio',
    'reason'}); an undecodable file is logged and skipped."""
    kept, waves, skipped = [], [], []
    for i, path in enumerate(paths):
        try:
            waves.append(load_clip(config, path, start))
            kept.append(i)
        except (AudioDecodeError, OSError) as e:
            reason = e.reason if isinstance(e, AudioDecodeError) else f"{type(e).__name__}: {e}"
            log.warning("%s: %s (skipped)", path, reason)
            skipped.append(dict(audio=os.path.abspath(path), reason=reason))
    return kept, waves, skipped


def held_out_audio(manual_dir: str | os.PathLike, labels: Sequence[str], per_label: int = 0) -> list[str]:
    """Held-out test audio of a `folders`-layout manual dir (the split rule of the dataset builder);
    per_label > 0 keeps the first `per_label` files of each label."""
    audio, _, _ = scan(manual_dir, "folders", labels)
    chosen, count = [], {}
    for f in sorted(audio, key=lambda f: (f.label, f.rel)):
        if f.split != "test" or (per_label and count.get(f.label, 0) >= per_label):
            continue
        count[f.label] = count.get(f.label, 0) + 1
        chosen.append(os.path.join(os.fspath(manual_dir), f.rel))
    return chosen


def load_clip(config, path: str | os.PathLike, start: float = 0.0) -> np.ndarray:
    """The model's input from an audio file: `config.data.clip_seconds` from `start` seconds on, mono,
    resampled, a shorter rest repeat-padded as in training (also under 1 s; silence and undecodable
    files raise `AudioDecodeError`)."""
    return load_audio(path, config_utils.sample_rate(config), config.data.clip_seconds, start_seconds=float(start),
                      min_seconds=0.0, stereo=config.data.stereo)


def _caption_cell(image: np.ndarray, caption: str, side: int):
    from PIL import Image, ImageDraw

    cell = Image.fromarray(image).resize((side, side), Image.NEAREST)
    lines = textwrap.wrap(caption, max(4, side // 6))[:2]
    canvas = Image.new("RGB", (side, side + 26), "white")
    canvas.paste(cell, (0, 0))
    ImageDraw.Draw(canvas).multiline_text((2, side + 1), "\n".join(lines), fill="black", spacing=1)
    return canvas


def write_grid(path: str, images: np.ndarray, captions: Sequence[str], columns: int | None = None) -> None:
    """uint8 [K, H, W, 3] → one PNG grid, each cell upscaled to ≥128 px with its caption below."""
    from PIL import Image

    k, h = images.shape[0], images.shape[1]
    columns = columns or int(math.ceil(math.sqrt(k)))
    side = max(h, 128)
    cells = [_caption_cell(img, cap, side) for img, cap in zip(images, captions)]
    rows = int(math.ceil(k / columns))
    grid = Image.new("RGB", (columns * side, rows * cells[0].height), "white")
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * side, (i // columns) * cell.height))
    grid.save(path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:60] or "x"


def _write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def sample_files(pipe: Pipeline, audio_paths: Sequence[str], out_dir: str | os.PathLike, *, num_images: int,
                 steps: int, guidance: float, scheduler: str, seed: int, same_seed: bool = False,
                 prompt: str | None = None, negative_prompt: str = system_lib.UNCONDITIONAL_PROMPT,
                 start: float = 0.0, progress=None) -> tuple[list[dict], list[dict]]:
    """Generate for each audio file (seed + i for the i-th file; `same_seed`: `seed` for all, so images
    differ only through the audio) → PNGs, grid.png, samples.jsonl and skipped.jsonl in `out_dir`;
    returns (the image records of samples.jsonl, the skip records {'audio', 'reason'} of skipped.jsonl).
    prompt (one `<*>`; default config.prompt.inference), negative_prompt and start (seconds into each
    file: which clip window is used), progress as in `generate`. Undecodable files are skipped
    (logged); with none left, `NoImages` is raised (no image, no grid). Under several processes each
    reads every file and computes its devices' share; process 0 writes the files."""
    from PIL import Image

    config = pipe.config
    writes = jax.process_index() == 0
    prompt = config.prompt.inference if prompt is None else prompt
    prompt_ids(pipe.system, prompt)  # a bad template fails before any decoding
    os.makedirs(out_dir, exist_ok=True)
    seeds = [int(seed) + (0 if same_seed else i) for i in range(len(audio_paths))]
    kept, waves, skipped = load_clips(config, audio_paths, start)
    if writes:
        _write_jsonl(os.path.join(out_dir, "skipped.jsonl"), skipped)
    if not kept:
        if writes:
            _write_jsonl(os.path.join(out_dir, "samples.jsonl"), [])
        raise NoImages(f"no image made: all {len(audio_paths)} audio files were skipped (reasons in "
                       f"{os.path.join(out_dir, 'skipped.jsonl')})")
    t0 = time.time()
    bar = None
    if progress is None and writes:  # a terminal bar over the denoising steps of all images
        bar = tqdm.tqdm(total=1, unit="step", desc=f"{len(kept) * num_images} images", dynamic_ncols=True)

        def progress(k: int, n: int) -> None:
            bar.total, bar.n = n, k
            bar.refresh()
    try:
        images = pipe.generate(np.stack(waves), [seeds[i] for i in kept], num_images=num_images, steps=steps,
                               guidance=guidance, scheduler=scheduler, prompt=prompt,
                               negative_prompt=negative_prompt, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    settings = dict(scheduler=scheduler, steps=int(steps), guidance=float(guidance), num_images=int(num_images),
                    images_per_device=int(config.sample.images_per_device),
                    prompt=prompt, negative_prompt=negative_prompt, start=float(start),
                    image_size=list(config_utils.sample_hw(config)), checkpoint=pipe.checkpoint,
                    sd_path=config.model.sd_path, beats_path=config.model.beats_path,
                    unary_dropout_at_inference=bool(config.model.unary_dropout_at_inference),
                    dtype=config.model.dtype, config=config.workdir_name, workdir=pipe.workdir)
    records, captions = [], []
    for k, b in enumerate(kept):
        path = audio_paths[b]
        label = label_of(path, pipe.system.labels)
        stem = _slug(os.path.splitext(os.path.basename(path))[0])
        for j in range(num_images):
            name = f"{b:04d}_{_slug(label or 'unlabeled')}_{stem}_s{seeds[b]}_{j}.png"
            if writes:
                Image.fromarray(images[k, j]).save(os.path.join(out_dir, name))
            records.append(dict(image=name, audio=os.path.abspath(path), label=label, seed=seeds[b], index=j,
                                **settings))
            captions.append(label or stem)
    if writes:
        write_grid(os.path.join(out_dir, "grid.png"), images.reshape(-1, *images.shape[2:]), captions,
                   columns=num_images if num_images > 1 else None)
        _write_jsonl(os.path.join(out_dir, "samples.jsonl"), records)
    log.info("%d images from %d audio files in %.1f s (incl. compile) → %s%s", len(records), len(kept), seconds,
             out_dir, f"; {len(skipped)} skipped (skipped.jsonl)" if skipped else "")
    return records, skipped
