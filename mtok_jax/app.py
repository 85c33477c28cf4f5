"""A web page for artists: drop in a track, get images (Gradio; the optional `app` extra).

  python -m mtok_jax.app [--config configs/demo.py] [--workdir W | --model DIR] [--checkpoint best]
      [--host 127.0.0.1 --port 7860 --max_upload_mb 100 --upload_dir DIR --keep_uploads]
      [--config.a.b=value ...]

After `make demo` the bare command serves runs/demo. `--model DIR` serves an exported model folder
(`python -m mtok_jax.export`) without a training run. Every image comes from
`mtok_jax.sample.sample_files` — what `sample.py` runs — on a pipeline loaded once, its sampler
compiled and warmed at start-up for the default settings; Gradio's queue runs one request at a time
in a worker thread (never on the event loop). Uploads and results live in one folder (the only one
served); an upload is deleted when another file replaces it, an hour after its tab closed (Gradio
keeps a closed session an hour), and with the folder when the server stops (`--keep_uploads` keeps
everything).
"""

import mtok_jax  # noqa: F401  (first: sets USE_TF=0 before transformers loads)

import dataclasses
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from mtok_jax import checkpoints, cli, config_utils, errors, export, sample
from mtok_jax.audio.io import AudioDecodeError, decode_audio, duration_seconds
from mtok_jax.constants import SAMPLERS

log = logging.getLogger("mtok_jax.app")
MAX_STEPS = 1000  # the schedulers' training timesteps
GUIDANCE_RANGE = (0.0, 50.0)


# ------------------------------------------------------------------------------- request checks
@dataclasses.dataclass(frozen=True)
class Limits:
    max_bytes: int = 100 * 1024 * 1024
    max_images: int = 8


def check_settings(prompt, num_images, steps, guidance, scheduler, seed, placeholder: str,
                   limits: Limits) -> dict:
    """Page inputs → sample_files keyword arguments; a bad value is a UserError saying what is allowed."""
    sample.check_prompt(prompt or "", placeholder)

    def whole(name, value, lo, hi):
        if value is None or not float(value).is_integer() or not lo <= value <= hi:
            raise errors.UserError(f"{name} must be a whole number from {lo} to {hi} (got {value})")
        return int(value)

    out = dict(prompt=prompt, num_images=whole("number of images", num_images, 1, limits.max_images),
               steps=whole("steps", steps, 1, MAX_STEPS), seed=whole("seed", seed, 0, 2**31 - 1))
    lo, hi = GUIDANCE_RANGE
    if guidance is None or not math.isfinite(guidance) or not lo <= guidance <= hi:
        raise errors.UserError(f"guidance must be from {lo:g} to {hi:g} (got {guidance})")
    if scheduler not in SAMPLERS:
        raise errors.UserError(f"scheduler must be one of {', '.join(SAMPLERS)} (got {scheduler!r})")
    return dict(out, guidance=float(guidance), scheduler=scheduler)


def check_audio(path, config, start: float, limits: Limits) -> tuple[np.ndarray, str]:
    """An uploaded file → (the clip the model gets, a note on what was done); UserError for a file too
    large, undecodable, silent, or a start past its end."""
    if not path:
        raise errors.UserError("upload or record some music first")
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise errors.UserError(f"{os.path.basename(path)} is {size / 1e6:.1f} MB; the limit is "
                               f"{limits.max_bytes / 1e6:g} MB (--max_upload_mb)")
    try:
        length = duration_seconds(path)
        clip = sample.load_clip(config, path, start)
    except AudioDecodeError as e:
        raise errors.UserError(unusable(e)) from None
    window = float(config.data.clip_seconds)
    rest = length - start
    if rest >= window:
        note = f"{length:.1f} s track: using {start:g}–{start + window:g} s"
    else:
        note = (f"{length:.2f} s track: the {rest:.2f} s from {start:g} s are repeat-padded to {window:g} s, "
                f"as in training" + (" (shorter than 1 s: little for the model to hear)" if rest < 1 else ""))
    return clip, note


def unusable(e) -> str:
    """The page's message for an AudioDecodeError: file name and reason, no server path."""
    name = os.path.basename(e.path)
    return f"cannot use {name}: {e.reason.replace(e.path, name)}"


# ------------------------------------------------------------------------------- page helpers
def waveform_image(path, start: float, window: float, width: int = 900, height: int = 140) -> np.ndarray:
    """RGB preview of a track's waveform with the window the model hears highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, sr = decode_audio(path)
    mono = x.mean(axis=1)
    t = np.arange(mono.shape[0]) / sr
    step = max(1, mono.shape[0] // 4000)
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
    ax.plot(t[::step], mono[::step], lw=0.5, color="#555")
    ax.axvspan(start, min(start + window, t[-1] if len(t) else window), color="#f90", alpha=0.35,
               label=f"the {window:g} s the model hears")
    ax.set_xlim(0, max(t[-1] if len(t) else 0, window))
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def run_facts(pipe, config, config_path: str) -> str:
    """Markdown: config, checkpoint and its step, last validation loss of the run."""
    lines = [f"**config** `{config_path}` ({config.workdir_name})", f"**checkpoint** {pipe.checkpoint}"]
    if pipe.checkpoint is None and config.model.embedder_path:
        lines.append(f"**embedder** `{config.model.embedder_path}`")
    metrics = os.path.join(pipe.workdir or "", "metrics.jsonl")
    if pipe.workdir and os.path.exists(metrics):
        recs = [json.loads(l) for l in open(metrics) if l.strip()]
        val = [r for r in recs if r.get("val_loss") is not None]
        if recs:
            lines.append(f"**trained steps** {max(r.get('step') or 0 for r in recs)}")
        if val:
            best = min(val, key=lambda r: r["val_loss"])
            lines.append(f"**validation loss** {val[-1]['val_loss']:.4f} (last), {best['val_loss']:.4f} "
                         f"(best, step {best.get('step')})")
        lines.append(f"**run** `{pipe.workdir}`")
    return "  \n".join(lines)


def sample_command(config_path: str, overrides, workdir, checkpoint, record: dict, audio: str,
                   model: str | None = None) -> str:
    """The `sample.py` command that writes the same PNGs and samples.jsonl settings as `record`
    (`model`: an exported model folder, served without config file, workdir or checkpoint)."""
    if model:
        args = ["python", "sample.py", "--model", model, *overrides]
    else:
        args = ["python", "sample.py", "--config", config_path, *overrides]
        if workdir:
            args += ["--workdir", workdir]
        args += ["--checkpoint", "none" if checkpoint is None else str(checkpoint)]
    args += ["--audio", audio,
             "--num_images", str(record["num_images"]), "--steps", str(record["steps"]),
             "--guidance", repr(record["guidance"]), "--scheduler", record["scheduler"],
             "--seed", str(record["seed"]), "--prompt", record["prompt"],
             "--negative_prompt", record["negative_prompt"], "--start", repr(record["start"])]
    return shlex.join(args)


# ------------------------------------------------------------------------------- the server
class Server:
    """The loaded pipeline + the one-at-a-time generation the page calls."""

    def __init__(self, pipe, config, config_path: str, overrides, upload_dir: str, limits: Limits,
                 keep_uploads: bool, model: str | None = None):
        self.pipe, self.config, self.config_path, self.overrides = pipe, config, config_path, list(overrides)
        self.model = model  # an exported model folder served instead of a run
        self.upload_dir, self.limits, self.keep_uploads = upload_dir, limits, keep_uploads
        self.lock = threading.Lock()  # one generation at a time, whatever the web layer does

    def warm_up(self) -> float:
        """Compile the sampler for the default settings (one image of noise); seconds taken."""
        s = self.config.sample
        t = time.perf_counter()
        n = config_utils.clip_samples(self.config)
        wave = np.random.RandomState(0).uniform(-0.1, 0.1, (1, n)).astype(np.float32)
        self.pipe.generate(wave, [0], num_images=int(s.num_images), steps=int(s.steps), guidance=float(s.guidance),
                           scheduler=s.scheduler)
        return time.perf_counter() - t

    def generate(self, audio_path: str, start: float, settings: dict, negative_prompt: str, progress=None):
        """One request → (records, output folder, clip note). Raises UserError for bad input."""
        if not 0 <= float(start):
            raise errors.UserError(f"start must be ≥ 0 s (got {start})")
        _, note = check_audio(audio_path, self.config, float(start), self.limits)
        out = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=os.path.join(self.upload_dir, "results"))
        with self.lock:
            records, _ = sample.sample_files(self.pipe, [audio_path], out, negative_prompt=negative_prompt or "",
                                          start=float(start), progress=progress, **settings)
        return records, out, note

    def forget(self, path) -> None:
        """Delete one upload (unless --keep_uploads); only files inside the upload folder."""
        if path and not self.keep_uploads and _inside(path, self.upload_dir) and os.path.isfile(path):
            os.remove(path)


def _inside(path, folder) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)


def build_page(server: Server):
    """The Gradio Blocks page."""
    import gradio as gr

    config, s = server.config, server.config.sample
    window = float(config.data.clip_seconds)

    def slider(length: float = 0.0):
        room = round(length - window, 1)  # where the window can start
        return gr.update(value=0, maximum=max(room, 0.1), interactive=room > 0)

    def on_audio(upload, recorded, previous):
        path = upload or recorded
        if previous and previous != path:
            server.forget(previous)
        if not path:
            return slider(), None, "", path
        try:
            length = duration_seconds(path)
            preview = waveform_image(path, 0.0, window)
            return slider(length), preview, f"{os.path.basename(path)}: {length:.1f} s", path
        except AudioDecodeError as e:  # the reason without the server's path
            return slider(), None, f"⚠ {unusable(e)}", path

    def on_start(path, start):
        try:
            return waveform_image(path, float(start), window) if path else None
        except Exception:  # noqa: BLE001
            return None

    def on_generate(upload, recorded, start, prompt, negative, num_images, steps, guidance, scheduler, seed,
                    random_seed, progress=gr.Progress()):
        path = upload or recorded
        try:
            if random_seed:
                seed = secrets.randbelow(2**31)
            settings = check_settings(prompt, num_images, steps, guidance, scheduler, seed,
                                      config.prompt.placeholder, server.limits)

            def step(k, n):
                progress((k, n), desc=f"denoising step {k}/{n}")

            t = time.perf_counter()
            records, out, note = server.generate(path, start, settings, negative, progress=step)
            seconds = time.perf_counter() - t
        except errors.UserError as e:
            return gr.update(), gr.update(), f"⚠ {e}", gr.update(), gr.update()
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            log.exception("generation failed")
            return gr.update(), gr.update(), f"⚠ internal error ({type(e).__name__}: {e})", gr.update(), gr.update()
        items, files = [], []
        for r in records:
            png = os.path.join(out, r["image"])
            items.append((png, f"seed {r['seed']} · image {r['index']} · {r['scheduler']} {r['steps']} steps · "
                               f"guidance {r['guidance']:g} · “{r['prompt']}”"
                               + (f" · not “{r['negative_prompt']}”" if r['negative_prompt'] else "")))
            files.append(png)
        files.append(os.path.join(out, "samples.jsonl"))
        cmd = sample_command(server.config_path, server.overrides, server.pipe.workdir, server.pipe.checkpoint,
                             records[0], os.path.basename(path), model=server.model)
        status = (f"{len(records)} images in {seconds:.1f} s ({note}). Same images from the command line:\n\n"
                  f"```\n{cmd}\n```")
        return items, files, status, settings["seed"], settings["seed"]

    with gr.Blocks(title="mtok: music → images", delete_cache=None if server.keep_uploads else (600, 3600)) as page:
        gr.Markdown("# Music → images\nDrop in a track (or record one), choose where the "
                    f"{window:g} s the model listens to start, and paint.")
        previous = gr.State(None, delete_callback=server.forget)  # the session's upload; deleted with it
        last_seed = gr.State(int(s.seed))
        with gr.Row():
            with gr.Column(scale=3):
                upload = gr.File(label="Music file", file_types=["audio"], elem_id="upload")
                recorded = gr.Audio(sources=["microphone"], type="filepath", format=None, label="…or record")
                info = gr.Markdown(elem_id="audio_info")
                start = gr.Slider(0, 0.1, value=0, step=0.1, label="start (s)", interactive=False, elem_id="start")
                preview = gr.Image(label="the window the model hears", interactive=False, elem_id="preview")
                prompt = gr.Textbox(config.prompt.inference, label=f"prompt ({config.prompt.placeholder} is the music)",
                                    elem_id="prompt")
                negative = gr.Textbox("", label="negative prompt", elem_id="negative")
                with gr.Row():
                    num_images = gr.Number(int(s.num_images), label=f"images (1–{server.limits.max_images})",
                                           precision=0, elem_id="num_images")
                    steps = gr.Number(int(s.steps), label=f"steps (1–{MAX_STEPS})", precision=0, elem_id="steps")
                    guidance = gr.Number(float(s.guidance), label="guidance", elem_id="guidance")
                    scheduler = gr.Dropdown(list(SAMPLERS), value=s.scheduler, label="scheduler",
                                            elem_id="scheduler")
                with gr.Row():
                    seed = gr.Number(int(s.seed), label="seed", precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(False, label="random seed", elem_id="random_seed")
                    reuse = gr.Button("reuse last seed", elem_id="reuse")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=4):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="results", columns=4, elem_id="gallery", format="png")
                downloads = gr.File(label="downloads (PNG, samples.jsonl)", file_count="multiple",
                                    elem_id="downloads")
                with gr.Accordion("this model", open=True):
                    gr.Markdown(run_facts(server.pipe, config, server.config_path), elem_id="facts")
                    loss_png = os.path.join(server.pipe.workdir or "", "loss.png")
                    if server.pipe.workdir and os.path.exists(loss_png):
                        from PIL import Image

                        gr.Image(np.asarray(Image.open(loss_png).convert("RGB")), label="loss",
                                 interactive=False, elem_id="loss")
        for source in (upload, recorded):
            source.change(on_audio, [upload, recorded, previous], [start, preview, info, previous])
        start.release(on_start, [previous, start], preview)
        reuse.click(lambda x: x, last_seed, seed)
        go.click(on_generate, [upload, recorded, start, prompt, negative, num_images, steps, guidance, scheduler,
                               seed, random_seed], [gallery, downloads, status, seed, last_seed])
    return page


def main():
    if _HOST.value not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {_HOST.value} makes the page reachable from other machines: anyone who can "
              f"reach port {_PORT.value} can upload files and use this machine's accelerator", file=sys.stderr)
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    model = os.path.abspath(_MODEL.value) if _MODEL.value else None
    # An exported model folder (python -m mtok_jax.export) brings its config; else --config / the run's.
    config = export.load_model_config(model, overrides) if model else config_utils.validate(_CONFIG.value)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cli.setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    t0 = time.perf_counter()
    upload_dir = os.path.abspath(_UPLOAD_DIR.value or tempfile.mkdtemp(prefix="mtok_app_"))
    os.makedirs(os.path.join(upload_dir, "results"), exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = upload_dir  # before gradio loads: uploads land here
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise errors.UserError("the web app needs the optional extra: pip install -e '.[app]'") from None
    workdir = None if _MODEL.value else (_WORKDIR.value or cli.default_workdir(config))
    checkpoint = None if _MODEL.value else checkpoints.select(workdir, _CHECKPOINT.value)
    pipe = sample.load_pipeline(config, workdir, checkpoint)
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    server = Server(pipe, config, config_path, overrides, upload_dir,
                    Limits(max_bytes=int(_MAX_MB.value * 1e6), max_images=_MAX_IMAGES.value), _KEEP.value, model)
    loaded = time.perf_counter() - t0
    warm = server.warm_up()
    page = build_page(server)
    page.queue(default_concurrency_limit=1)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops like Ctrl-C: the finally below cleans up
    try:
        # _frontend=False skips Gradio's own 3 s HEAD self-check, which fails (and aborts) on a busy CPU
        page.launch(server_name=_HOST.value, server_port=_PORT.value, max_file_size=int(_MAX_MB.value * 1e6),
                    allowed_paths=[], show_error=True, quiet=True, prevent_thread_lock=True, _frontend=False)
        print(f"loaded in {loaded:.1f} s, sampler warmed in {warm:.1f} s, page up after "
              f"{time.perf_counter() - t0:.1f} s; serving {workdir or _MODEL.value} (checkpoint {checkpoint}) "
              f"on http://{_HOST.value}:{page.server_port}", flush=True)
        page.block_thread()
    finally:
        if not _KEEP.value:
            shutil.rmtree(upload_dir, ignore_errors=True)


def define_flags() -> None:
    """The command line (absl flags, as sample.py); defined only when run as a program."""
    global _CONFIG, _WORKDIR, _MODEL, _CHECKPOINT, _HOST, _PORT, _MAX_MB, _UPLOAD_DIR, _KEEP, _MAX_IMAGES
    _CONFIG, _WORKDIR = cli.define_run_flags("Training run to serve (default: runs/<config.workdir_name>).")
    _MODEL = flags.DEFINE_string("model", None, "An exported model folder (python -m mtok_jax.export) to serve "
                                                "instead of a run: its config.json and weights, no checkpoint.")
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, cli.CHECKPOINT_HELP)
    _HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes the page to the network).")
    _PORT = flags.DEFINE_integer("port", 7860, "Port.", lower_bound=0)
    _MAX_MB = flags.DEFINE_float("max_upload_mb", 100.0, "Largest audio upload in MB.", lower_bound=0.001)
    _UPLOAD_DIR = flags.DEFINE_string("upload_dir", None, "Folder for uploads and results, the only one served "
                                                          "(default: a new temporary folder).")
    _KEEP = flags.DEFINE_bool("keep_uploads", False, "Keep uploads and results (default: deleted after use).")
    _MAX_IMAGES = flags.DEFINE_integer("max_images", 8, "Most images per request.", lower_bound=1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    define_flags()
    cli.run_absl(main)
