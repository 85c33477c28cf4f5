"""The built-in demo end to end (what `make demo` runs): python demo.py

  python demo.py [--config configs/demo.py] [--workdir DIR] [--skip_eval] [--config.a.b=value ...]

Stages (each idempotent; timings printed per stage):
  1. tiny SD (fitted VAE) / BEATs folders in the real formats  → demo_assets/sd, demo_assets/beats
  2. tiny metric models (CLIP ViT, Inception, Wav2CLIP)         → demo_assets/metrics/
  3. the synthetic `demo` dataset through the TFDS builder      → demo_assets/manual, demo_assets/data
  4. training of configs/demo.py (resumes if already trained)   → runs/demo/{metrics.jsonl,loss.png,checkpoints/}
  5. one image per label from the held-out test audio           → runs/demo/samples/{*.png,grid.png,samples.jsonl}
     (prints how far the images' colours follow their labels: `label_dependence`)
  6. evaluation (AIS / IIS / FID / GIILS) of the best checkpoint → runs/demo/eval/, and of the untrained
     init (checkpoint none) → runs/demo/eval_untrained/; both rows printed side by side (the fitted tiny
     metric models give ≈ 50 for label-blind images). Stages 5–6 load the pipeline, the metric models
     and the reference sets once for both.
"""

from __future__ import annotations

import mtok_jax  # noqa: F401  (first: USE_TF=0)

import glob
import json
import os
import time

import numpy as np
from absl import flags
from PIL import Image

from metrics import evaluate
from metrics.demo_models import write_demo_metric_models
from mtok_jax import cli, config_utils, sample, signals, train
from mtok_jax.demo.data import build_demo_dataset
from mtok_jax.demo.models import write_demo_models


class _Stages:
    def __init__(self):
        self.times: list[tuple[str, float]] = []
        self.start = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times.append((name, time.perf_counter() - t))
        print(f"--- {name}: {self.times[-1][1]:.1f} s", flush=True)
        return out

    def summary(self) -> str:
        lines = [f"  {name:<34s} {sec:7.1f} s" for name, sec in self.times]
        lines.append(f"  {'total':<34s} {time.perf_counter() - self.start:7.1f} s")
        return "\n".join(lines)


def label_dependence(sample_rgb, label_rgb) -> dict[str, float]:
    """How much generated images follow their labels, from mean colours.

    sample_rgb: [N, 3] mean colour of each generated image; label_rgb: [N, 3] mean colour of the training
    images of that image's label (both in any one unit). Returns 'colour_corr', the Pearson correlation of
    the two after removing each one's mean over the N images (0: colours unrelated to the labels, 1: the
    same), and 'spread' / 'label_spread': the mean distance between two images' colours (generated /
    label targets); a spread near 0 means every label got the same picture.
    """
    a, b = np.asarray(sample_rgb, np.float64), np.asarray(label_rgb, np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    corr = float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))

    def spread(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return float(d[np.triu_indices(len(x), 1)].mean()) if len(x) > 1 else 0.0

    return {"colour_corr": corr, "spread": spread(a), "label_spread": spread(b)}


def _sample_label_dependence(records: list[dict], samples_dir: str, manual_dir: str) -> dict[str, float]:
    """label_dependence of sampled PNGs vs the mean colour of each label's images in manual_dir/image/."""
    def mean_rgb(path):
        return np.asarray(Image.open(path).convert("RGB"), np.float64).mean((0, 1)) / 255.0

    targets: dict[str, np.ndarray] = {}
    for label in {r["label"] for r in records}:
        files = sorted(glob.glob(os.path.join(glob.escape(os.path.join(manual_dir, "image", label)), "*")))
        targets[label] = np.mean([mean_rgb(f) for f in files], axis=0)
    return label_dependence([mean_rgb(os.path.join(samples_dir, r["image"])) for r in records],
                            [targets[r["label"]] for r in records])


def comparison_table(reports: dict[str, dict]) -> str:
    """Markdown rows AIS / IIS / FID / GIILS (mean, min–max over labels) per evaluated model
    (`evaluate.score_images` reports keyed by row name)."""
    lines = ["| model | AIS | IIS | FID | GIILS mean (min–max) |", "|---|---|---|---|---|"]
    for name, r in reports.items():
        m = r["metrics"] if "metrics" in r else r
        g = [x["score"] for x in m.get("giils", [])]
        giils = f"{sum(g) / len(g):.2f} ({min(g):.2f}–{max(g):.2f})" if g else "–"
        lines.append(f"| {name} | {m['ais']['score']:.2f} | {m.get('iis', {}).get('score', float('nan')):.2f} | "
                     f"{m.get('fid', float('nan')):.2f} | {giils} |")
    return "\n".join(lines)


def _val_losses(workdir: str) -> list[tuple[int, float]]:
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        for line in open(path):
            rec = json.loads(line)
            if rec.get("val_loss") is not None:
                out.append((rec.get("epoch"), rec["val_loss"]))
    return out


def run(config, workdir: str | None, skip_eval: bool = False) -> dict:
    """The demo's stages for `config` into `workdir` (default runs/<config.workdir_name>) → a summary:
    'records' (sampled images), 'label_dependence', 'reports' (name → evaluation report; empty with
    skip_eval), 'interrupted' (the signal that stopped training, then nothing else is done; else None).
    Prints each stage's time and, at the end, the comparison of trained and untrained."""
    workdir = workdir or cli.default_workdir(config)
    root = os.path.dirname(os.path.normpath(config.data.data_dir))  # demo_assets
    stages = _Stages()

    stages.run("1 demo models (SD, BEATs)", write_demo_models, root)
    stages.run("2 metric models", write_demo_metric_models, os.path.join(root, "metrics"))
    stages.run("3 demo dataset (TFDS)", build_demo_dataset, root)

    trained_run = stages.run(f"4 train → {workdir}", train.train_and_evaluate, config, workdir)
    if trained_run["interrupted"]:  # saved at a step boundary; train logged how to go on
        return {"interrupted": trained_run["interrupted"]}
    # one loaded pipeline: the untrained init, and the trained leaves of `best` on top (shared samplers)
    untrained = stages.run("5 load the pipeline (untrained init)", sample.load_pipeline, config, workdir, None)
    trained = untrained.restored(workdir, "best")

    def sample_per_label():
        audio = sample.held_out_audio(os.path.join(root, "manual"), trained.system.labels, per_label=1)
        s = config.sample
        return sample.sample_files(trained, audio, os.path.join(workdir, "samples"), num_images=s.num_images,
                                   steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, seed=s.seed,
                                   same_seed=True)[0]  # one seed for all labels: images differ by audio only

    records = stages.run("5 sample one image per label", sample_per_label)
    dep = _sample_label_dependence(records, os.path.join(workdir, "samples"), os.path.join(root, "manual"))

    reports = {}
    if not skip_eval:
        m = config.metrics
        def metric_models():
            models = evaluate.MetricModels.load(m.clip_path, m.inception_path, m.wav2clip_path)
            return models, evaluate.reference_embeddings(models, config)

        models, reference = stages.run("6 metric models and reference sets", metric_models)
        for name, pipe, out in (("trained", trained, "eval"), ("untrained", untrained, "eval_untrained")):
            reports[name] = stages.run(f"6 evaluate {name} (AIS/IIS/FID/GIILS)", evaluate.evaluate_checkpoint, config,
                                       workdir, num_images=m.num_images, per_label=m.per_label,
                                       out_dir=os.path.join(workdir, out), pipe=pipe, models=models,
                                       reference=reference)

    val = _val_losses(workdir)
    print("\n=== demo done ===")
    print(stages.summary())
    if val:
        print("validation loss by epoch: " + ", ".join(f"{e}: {v:.4f}" for e, v in val))
    print(f"{len(records)} images → {os.path.join(workdir, 'samples')}/grid.png")
    print(f"images vs labels: mean-colour correlation with the label's training images "
          f"{dep['colour_corr']:.2f} (0 = unrelated); colour distance between two labels' images "
          f"{dep['spread']:.3f} (training images: {dep['label_spread']:.3f})")
    if reports:
        print(f"evaluation → {os.path.join(workdir, 'eval')}/report.md, untrained init → "
              f"{os.path.join(workdir, 'eval_untrained')}/report.md")
        print(comparison_table(reports))
    return {"interrupted": None, "records": records, "label_dependence": dep, "reports": reports}


def main() -> None:
    """`python demo.py`: the flags of train.py (absl; --config, --config.a.b=value, --workdir)."""
    config, workdir = cli.define_run_flags()
    skip_eval = flags.DEFINE_bool("skip_eval", False, "Stop after sampling.")

    def demo():
        cfg = config_utils.validate(config.value)
        cli.setup_logging()
        out = run(cfg, workdir.value, skip_eval.value)
        if out["interrupted"]:
            raise SystemExit(signals.EXIT_CODES[out["interrupted"]])

    cli.run_absl(demo)


if __name__ == "__main__":
    main()
