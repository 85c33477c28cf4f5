"""Benchmark the music_image build and the training iterator at full size (512×512 images, 30 s clips).

  python scripts/bench_data.py [--clips 64] [--workers 2] [--batch 8] [--epochs 4] [--workdir DIR]

Generates --clips source clips (half 44.1 kHz stereo wav, half 44.1 kHz stereo mp3, 35 s each) and as
many 1024×768 JPEG artworks in 4 label folders, builds them with `mtok_jax.data.music_image.build`
(config 'folders': 30 s, 512×512), then iterates `mtok_jax.data.pipeline.batches('train', ...)`.
Prints the build rate (source files/s), stored bytes per example, and the iterator's examples/s.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mtok_jax  # noqa: F401  (USE_TF=0 first)
import numpy as np


def write_sources(root: Path, clips: int, labels) -> None:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    sr, seconds = 44100, 35.0
    t = np.arange(int(sr * seconds)) / sr
    for i in range(clips):
        label = labels[i % len(labels)]
        (root / "audio" / label).mkdir(parents=True, exist_ok=True)
        (root / "image" / label).mkdir(parents=True, exist_ok=True)
        f0 = 110 * 2 ** (i / 12)
        x = np.stack([0.4 * np.sin(2 * np.pi * f0 * t), 0.3 * np.sin(2 * np.pi * 1.5 * f0 * t)], 1)
        x += 0.05 * rng.standard_normal(x.shape)
        ext = "wav" if i % 2 == 0 else "mp3"
        sf.write(root / "audio" / label / f"clip{i:04d}.{ext}", x.astype(np.float32), sr)
        yy, xx = np.mgrid[0:768, 0:1024]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 10) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "image" / label / f"art{i:04d}.jpg", quality=90)


def main(argv=None) -> int:
    from mtok_jax.data.music_image import build, make_config
    from mtok_jax.data.pipeline import batches, num_examples
    from mtok_jax.data.sources import DEFAULT_LABELS

    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=4, help="decode threads of the iterator")
    p.add_argument("--workdir", default=None, help="kept if given; default: a temp dir, removed")
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    try:
        manual, data_dir = work / "manual", work / "tfds"
        t0 = time.perf_counter()
        if not manual.exists():
            write_sources(manual, a.clips, DEFAULT_LABELS[:4])
        print(f"sources: {a.clips} clips (35 s, 44.1 kHz stereo, wav/mp3) + {a.clips} JPEG 1024x768 "
              f"in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(data_dir, ignore_errors=True)
        cfg = make_config("folders")  # 30 s, 512×512, jpeg
        t0 = time.perf_counter()
        out = build(manual, data_dir, cfg, workers=a.workers, progress=False)
        dt = time.perf_counter() - t0
        n_files = 2 * a.clips
        print(f"build: {n_files} files in {dt:.1f} s = {n_files / dt:.2f} files/s "
              f"({a.workers} worker processes)")
        sizes = {s: num_examples(data_dir, s, cfg.name) for s in
                 ("train", "validation", "test", "train_images", "validation_images", "test_images")}
        total_bytes = sum(f.stat().st_size for f in out.glob("*.array_record*"))
        n_audio = sizes["train"] + sizes["validation"] + sizes["test"]
        print(f"splits: {sizes}")
        print(f"stored: {total_bytes / 1e6:.1f} MB; audio {cfg.clip_samples * 2} bytes/example (int16 PCM); "
              f"{total_bytes / max(1, n_audio) / 1e3:.0f} kB per audio example incl. images")
        n_train = sizes["train"]
        seen, rates, cpu = 0, [], 0.0
        for epoch in range(a.epochs):
            it = batches(data_dir, "train", global_batch_size=a.batch, seed=0, epoch=epoch, process_index=0,
                         process_count=1, config_name=cfg.name, threads=a.threads)
            b = next(it)  # first batch of each epoch excluded (opening sources, starting threads)
            t_epoch, cpu_epoch, n_epoch = time.perf_counter(), time.process_time(), 0
            for b in it:
                n_epoch += b["audio"].shape[0]
            rates.append(n_epoch / (time.perf_counter() - t_epoch))
            cpu += time.process_time() - cpu_epoch
            seen += n_epoch
        print(f"iterator CPU: {1e3 * cpu / seen:.1f} ms per example (all threads; = {1e3 / (1e3 * cpu / seen):.0f} "
              "examples/s per free core)")
        print(f"iterator: {np.mean(rates):.1f} examples/s mean over {a.epochs} epochs (per epoch: "
              f"{', '.join(f'{r:.0f}' for r in rates)}; batch {a.batch}, audio {b['audio'].shape[1]} samples, "
              f"image {b['image'].shape[1:]}, {n_train} train examples per epoch, first batch excluded)")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
