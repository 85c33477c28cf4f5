"""Speed, measured against PyTorch in the same run (BENCHMARKS.md).

  python -m mtok_jax.bench [--preset tiny|sd14-256|sd14] [--what all|beats,embedder,unet,exp1,exp2,sample,input]
                           [--reference torch|torch-eager] [--runs 5] [--assets DIR] [--set KEY=VALUE ...]
                           [--markdown]

Presets (PRESETS): `tiny` — the demo models (demo_assets/, written when missing; seconds); `sd14-256` —
SD v1.4 + BEATs iter3+ at their released shapes with random weights (python -m mtok_jax.demo.full_size,
written when missing), 30 s clips, 256 px, batch 1, float32 (minutes on a CPU); `sd14` — the same at
512 px, batch 8, bfloat16 compute with float32 masters (for accelerators).

What is timed (the same work for every backend; torch side: mtok_jax.torch_ref):
  beats     30 s waveforms → BEATs layers 4/8/12 concatenated (eval)
  embedder  those features → audio token
  unet      one UNet forward (noisy latents, t, text states)
  exp1      one training step of configs/exp1.py (the embedder trains), without the feature cache
  exp1-cached  the same step from the feature cache (mtok_jax.data.cache; built into the assets when missing):
            embedder → text encoder → UNet; compared with PyTorch's exp1 step
  exp2      one training step of configs/exp2.py (embedder, BEATs and UNet train)
  sample    audio → image: token, 50 PNDM steps with classifier-free guidance (2 UNet passes each), VAE decode
  input     the training iterator (mtok_jax.data.pipeline.batches): ms per batch, one reader thread

Each (what, backend) runs in a process of its own, one after the other: `jax` (mtok_jax.bench.jax_work);
with `--reference torch` also `torch` (eager, SDPA attention) and, for TORCH_COMPILED, `torch.compile`
(mtok_jax.bench.torch_work; PyTorch gets as many threads as the machine has cores, as XLA:CPU;
`--reference torch-eager`: eager only, as inductor's CPU compile of a training step takes minutes). Each
prints one JSON line: what, preset, backend, device kind, dtype, batch, median/min/max ms over `--runs`
timed runs after one warm-up, compile s (JAX: the AOT compile; torch.compile: the first call less a
timed one), FLOP per call (XLA's cost analysis of our function, used for every backend), achieved
FLOP/s, MFU (against PEAK_FLOPS for accelerators; on a CPU against a matmul measured in that process),
and peak memory (the process's resident set, sampled during the warm-up and timed calls; on
accelerators also the device's peak).
`--markdown` also merges this run into this preset's section of BENCHMARKS.md: its records replace the
earlier ones of the same workloads, the others stay with their run's command, date, commit and versions
(so a slow workload can be measured on its own); the table, and the ratios against PyTorch of the same
run with the issue's targets, are rewritten from the records the section keeps as JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from absl import app, flags

from mtok_jax import cli, config_utils, monitor
from mtok_jax.bench import jax_work
from mtok_jax.demo.data import build_demo_dataset
from mtok_jax.demo.full_size import write_full_size_assets
from mtok_jax.demo.models import write_demo_models

REPO = pathlib.Path(__file__).resolve().parents[2]
WHATS = ("beats", "embedder", "unet", "exp1", "exp1-cached", "exp2", "sample", "input")
REFERENCE_OF = {"exp1-cached": "exp1"}  # the PyTorch scripts have no feature cache: compared with their exp1 step
JAX_ONLY = ("exp1-cached", "input")
BACKENDS = ("jax", "torch", "torch.compile")
TORCH_COMPILED = ("unet", "exp1", "sample")  # where the targets compare against torch.compile
RECORD_PREFIX = "BENCH "  # a child's result line on stdout
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Preset:
    """Shapes and models of one benchmark setting; `assets`: the default folder of its weights and data."""
    models: str  # 'demo' | 'full'
    image_size: int
    batch: int
    clip_seconds: float
    dtype: str
    assets: str
    sample_steps: int = 50
    max_runs: tuple[tuple[str, int], ...] = ()  # (what, at most this many timed runs): the slow ones

    def runs(self, what: str, runs: int) -> int:
        return min(runs, dict(self.max_runs).get(what, runs))


PRESETS = {
    "tiny": Preset("demo", 32, 2, 4.0, "float32", "demo_assets", sample_steps=10),
    # the 50-step sampler takes minutes per call on a CPU: 2 timed runs
    "sd14-256": Preset("full", 256, 1, 30.0, "float32", "full_size_assets", max_runs=(("sample", 2),)),
    "sd14": Preset("full", 512, 8, 30.0, "bfloat16", "full_size_assets"),
}

# Dense peak FLOP/s per device by (device-kind substring, dtype): the MFU denominators (vendor datasheets,
# without sparsity). CPUs are measured instead (matmul_peak).
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12, ("TPU v6", "bfloat16"): 918e12,
}

# The targets: (what, reference backend, minimum ratio reference_ms / our_ms, where).
TARGETS = (
    ("exp1", "torch", 1.2, "cpu"), ("exp1-cached", "torch", 2.0, "cpu"), ("exp2", "torch", 1.2, "cpu"), ("unet", "torch.compile", 1.0, "cpu"),
    ("sample", "torch.compile", 1.0, "cpu"), ("beats", "torch", 1.8, "cpu"),
    ("exp1", "torch", 2.0, "gpu"), ("exp1", "torch.compile", 1.2, "gpu"), ("exp2", "torch", 1.5, "gpu"),
    ("sample", "torch", 1.5, "gpu"),
)


# ===================================================================================================
# Assets and configs
# ===================================================================================================
def ensure_assets(preset: Preset, root: str) -> dict[str, str]:
    """The preset's model folders and dataset under `root`, written when missing → {'sd', 'beats', 'data',
    'builder_config'}."""
    if preset.models == "demo":
        paths = write_demo_models(root)
        build_demo_dataset(root)
        return {**paths, "data": os.path.join(root, "data"), "builder_config": "demo"}
    return write_full_size_assets(root, image_size=preset.image_size, clips_per_label=1)


def bench_config(preset: Preset, what: str, assets: dict[str, str], settings: Sequence[str] = ()):
    """configs/exp2.py for exp2, configs/exp1.py otherwise, at the preset's shapes and on its assets (the
    feature cache only for exp1-cached), then `settings` (`--set KEY=VALUE` overrides)."""
    name = "exp2" if what == "exp2" else "exp1"
    overrides = [f"model.sd_path={assets['sd']}", f"model.beats_path={assets['beats']}",
                 f"data.data_dir={assets['data']}", f"data.builder_config={assets['builder_config']}",
                 f"data.clip_seconds={preset.clip_seconds}", f"data.image_size={preset.image_size}",
                 f"train.batch_size={preset.batch}", "train.grad_accum=1", f"model.dtype={preset.dtype}",
                 "mesh.data=1", "mesh.fsdp=1", f"data.feature_cache={what == 'exp1-cached'}"]
    if preset.models == "demo":  # the demo's BEATs has 4 layers: configs/demo.py's choice of them
        demo = config_utils.load_config(str(REPO / "configs" / "demo.py"))
        overrides.append(f"model.beats_layers={tuple(demo.model.beats_layers)}")
    if what == "exp2" and preset.batch == 1:  # its lower-memory ordering (configs/exp2.py: 24 GiB machines)
        overrides.append("train.update_unet_first=True")
    return config_utils.validate(config_utils.load_config(str(REPO / "configs" / f"{name}.py"),
                                                          [*overrides, *settings]))


# ===================================================================================================
# Timing
# ===================================================================================================
def time_calls(call: Callable[[], Any], runs: int) -> dict[str, float]:
    """One warm-up call, then `runs` timed calls (each must block until its work is done) → ms stats,
    'first_ms' (the warm-up) and 'peak_rss_gib' (the resident set's peak meanwhile)."""
    with RssPeak() as rss:
        first = _seconds(call) * 1e3
        times = [_seconds(call) * 1e3 for _ in range(runs)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs,
            "first_ms": first, "peak_rss_gib": rss.peak / GIB}


class RssPeak:
    """Context manager sampling this process's resident set size every 10 ms (Linux /proc; elsewhere the
    lifetime maximum) → `.peak` bytes."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> "RssPeak":
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def matmul_peak(backend: str) -> float:
    """FLOP/s of a 2048³ float32 matmul on this process's device (best of 5): the CPU's MFU denominator."""
    n = 2048
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), jnp.float32)
        mm = jax.jit(jnp.matmul).lower(a, a).compile()
        call = lambda: mm(a, a).block_until_ready()  # noqa: E731
    else:
        import torch

        a = torch.ones(n, n)
        call = lambda: torch.mm(a, a)  # noqa: E731
    call()
    best = min(_seconds(call) for _ in range(5))
    return 2 * n ** 3 / best


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def peak_flops(device_kind: str, dtype: str, backend: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for MFU."""
    for (kind, dt), value in PEAK_FLOPS.items():
        if kind.lower() in device_kind.lower() and dt == dtype:
            return value, "datasheet"
    if "cpu" in device_kind.lower() or device_kind.lower() in ("", "unknown"):
        return matmul_peak(backend), "measured 2048³ f32 matmul"
    return None, "unknown device"


def peak_device_memory(backend: str) -> dict[str, float]:
    """{'peak_device_gib'}: the accelerator's peak bytes in use where the backend reports it, else {}."""
    if backend == "jax":
        peak = monitor.device_memory().get("memory/peak_bytes_in_use")
    else:
        import torch

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_device_gib": peak / GIB} if peak else {}


# ===================================================================================================
# One measurement (in a process of its own)
# ===================================================================================================
def measure(preset_name: str, what: str, backend: str, assets_root: str, runs: int, flops: float | None = None,
            builder: Callable = jax_work.build, settings: Sequence[str] = ()) -> dict[str, Any]:
    """Build and time one workload → its record (module docstring). builder(what, config, preset, compiled)
    → Work: jax_work.build, or torch_work.build in its own child; `flops`: the count to use when the
    backend is not JAX (the JAX record's); `settings`: config overrides of the JAX side (in the record)."""
    preset = PRESETS[preset_name]
    assets = ensure_assets(preset, assets_root)
    config = bench_config(preset, what, assets, settings if backend == "jax" else ())
    work = builder(what, config, preset, compiled=backend == "torch.compile")
    flops = work.flops if backend == "jax" else flops
    stats = time_calls(work.call, preset.runs(what, runs))
    compile_s = work.compile_s if backend != "torch.compile" else max(stats["first_ms"] - stats["median_ms"], 0) / 1e3
    record = {"what": what, "preset": preset_name, "backend": backend, "device_kind": work.device_kind,
              "dtype": preset.dtype, "batch": preset.batch,
              **{k: round(v, 2) for k, v in stats.items() if k != "peak_rss_gib"},
              "compile_s": round(compile_s, 2), "flops": flops, **work.extra}
    if settings and backend == "jax":
        record["settings"] = list(settings)
    if flops:
        achieved = flops / (stats["median_ms"] / 1e3)
        peak, source = peak_flops(work.device_kind, preset.dtype, backend)
        record.update(flops_per_s=achieved, peak_flops_per_s=peak, peak_source=source,
                      mfu=round(achieved / peak, 4) if peak else None)
    if what == "input":
        record["examples_per_s"] = preset.batch / (stats["median_ms"] / 1e3)
    record["peak_rss_gib"] = round(stats["peak_rss_gib"], 3)
    record.update({k: round(v, 3) for k, v in peak_device_memory(backend).items()})
    return record


# ===================================================================================================
# The run: one child process per (what, backend)
# ===================================================================================================
def run_all(preset_name: str, whats: Sequence[str], backends: Sequence[str], assets_root: str, runs: int,
            emit: Callable[[dict], None] = lambda r: print(json.dumps(r), flush=True),
            timeout_s: float | None = None, settings: Sequence[str] = ()) -> list[dict]:
    """Every (what, backend) in its own child process, JAX first (its FLOP count goes to the others);
    `settings`: config overrides of the JAX side. → the records (a failed child gives a record with 'error')."""
    ensure_assets(PRESETS[preset_name], assets_root)  # once, before the children read them
    records = []
    for what in whats:
        flops = None
        for backend in backends:
            if (what in JAX_ONLY and backend != "jax") or (backend == "torch.compile" and what not in TORCH_COMPILED):
                continue
            record = _run_child(preset_name, what, backend, assets_root, runs, flops, timeout_s, settings)
            if backend == "jax":
                flops = record.get("flops")
            emit(record)
            records.append(record)
    return records


def _run_child(preset_name: str, what: str, backend: str, assets_root: str, runs: int,
               flops: float | None, timeout_s: float | None = None, settings: Sequence[str] = ()) -> dict:
    module = "mtok_jax.bench" if backend == "jax" else "mtok_jax.bench.torch_work"
    cmd = [sys.executable, "-m", module, "--preset", preset_name, "--what", what, "--assets", assets_root,
           "--runs", str(runs), f"--_backend={backend}"]
    if flops:
        cmd.append(f"--_flops={flops}")
    cmd += [f"--set={s}" for s in settings]
    failed = {"what": what, "preset": preset_name, "backend": backend}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(backend),
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout_s:.0f} s (--timeout_s)"}
    for line in proc.stdout.splitlines():
        if line.startswith(RECORD_PREFIX):
            return json.loads(line[len(RECORD_PREFIX):])
    lines = proc.stderr.strip().splitlines() or ["(no output)"]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    tail = (errors or lines)[-1]
    return {**failed, "error": f"exit {proc.returncode}: {tail}"}


# ===================================================================================================
# BENCHMARKS.md
# ===================================================================================================
def device_class(records: Sequence[dict]) -> str:
    kinds = {r.get("device_kind", "") for r in records if r.get("backend") == "jax" and "device_kind" in r}
    return "cpu" if not kinds or any("cpu" in k.lower() for k in kinds) else "gpu"


def ratios(records: Sequence[dict]) -> list[dict]:
    """Per what and reference backend of the same run: reference median / ours (≥ 1: we are faster)."""
    by = {(r.get("run"), r["what"], r["backend"]): r for r in records if "median_ms" in r}
    out = []
    for (run, what, backend), ours in by.items():
        if backend != "jax":
            continue
        for reference in BACKENDS[1:]:
            ref = by.get((run, REFERENCE_OF.get(what, what), reference))
            if ref:
                out.append({"what": what, "reference": reference, "ours_ms": ours["median_ms"],
                            "reference_ms": ref["median_ms"], "ratio": ref["median_ms"] / ours["median_ms"],
                            "run": run})
    return out


def merge_runs(previous: dict, records: Sequence[dict], run: dict) -> dict:
    """A section's {'runs': [run dicts], 'records': [...]} after a run: this run's records (tagged with its
    number) replace every earlier record of the same workloads; runs no record refers to any more are
    dropped and the rest renumbered from 1 in order. Records are ordered as WHATS, then BACKENDS."""
    whats = {r["what"] for r in records}
    kept = [r for r in previous.get("records", []) if r["what"] not in whats]
    number = max([r["run"] for r in kept], default=0) + 1
    merged = kept + [dict(r, run=number) for r in records]
    runs = {**{i + 1: x for i, x in enumerate(previous.get("runs", []))}, number: run}
    used = sorted({r["run"] for r in merged})
    renumber = {old: new for new, old in enumerate(used, 1)}
    merged = [dict(r, run=renumber[r["run"]]) for r in merged]
    order = {w: i for i, w in enumerate(WHATS)}
    merged.sort(key=lambda r: (order.get(r["what"], len(order)), BACKENDS.index(r["backend"])
                               if r["backend"] in BACKENDS else len(BACKENDS)))
    return {"runs": [runs[old] for old in used], "records": merged}


def markdown_section(preset_name: str, data: dict) -> str:
    """The section of (preset, device class) from merge_runs' {'runs', 'records'} (Markdown)."""
    records = data["records"]
    kinds = sorted({r["device_kind"] for r in records if "device_kind" in r})
    lines = [f"## `{preset_name}` on {', '.join(kinds) or 'unknown device'}", ""]
    for i, run in enumerate(data["runs"], 1):
        lines += [f"- run {i}: `{run['command']}`", f"  - date: {run['date']}, commit {run['commit']}",
                  f"  - versions: {run['versions']}", f"  - machine: {run['machine']}"]
    lines += ["", "| what | backend | run | dtype | batch | runs | median ms | min ms | max ms | compile s | GFLOP "
              "| GFLOP/s | MFU | peak RSS GiB | peak device GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['what']} | {r['backend']} | {r['run']} | failed: {r['error']} ||||||||||||")
            continue
        gflop = f"{r['flops'] / 1e9:.1f}" if r.get("flops") else "–"
        rate = f"{r['flops_per_s'] / 1e9:.1f}" if r.get("flops_per_s") else "–"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "–"
        device_gib = f"{r['peak_device_gib']:.2f}" if "peak_device_gib" in r else "–"
        lines.append(f"| {r['what']} | {r['backend']} | {r['run']} | {r['dtype']} | {r['batch']} | {r['runs']} | "
                     f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | {r['compile_s']:.1f} | "
                     f"{gflop} | {rate} | {mfu} | {r['peak_rss_gib']:.2f} | {device_gib} |")
    for r in records:
        if r.get("what") == "input" and "examples_per_s" in r:
            lines += ["", f"Input pipeline (run {r['run']}): {r['examples_per_s']:.2f} examples/s with one reader "
                          f"thread ({r['examples_per_s_all_threads']:.2f} with {r['threads']})."]
    pairs = ratios(records)
    if not pairs:  # (no PyTorch figure of the same run: no ratios table)
        return "\n".join(lines) + "\n"
    lines += ["", "Ratios (PyTorch median / ours, both from the same run; > 1: mtok_jax is faster) and the targets:",
              "", "| what | against | run | ours ms | PyTorch ms | ratio | target | met |",
              "|---|---|---|---|---|---|---|---|"]
    targets = {(w, ref): t for w, ref, t, where in TARGETS if where == device_class(records)}
    for r in pairs:
        t = targets.get((r["what"], r["reference"]))
        met = "–" if t is None else ("yes" if r["ratio"] >= t else "**no**")
        lines.append(f"| {r['what']} | {r['reference']} | {r['run']} | {r['ours_ms']:.1f} | {r['reference_ms']:.1f} | "
                     f"{r['ratio']:.2f}× | {f'≥ {t}×' if t else '–'} | {met} |")
    return "\n".join(lines) + "\n"


_DATA_BEGIN, _DATA_END = "<!-- bench-data\n", "\n-->\n"


def write_markdown(path: pathlib.Path, preset_name: str, records: Sequence[dict], command: str) -> None:
    """Merge this run's `records` into the section of (preset, device class) in `path` (merge_runs; the
    section keeps its records as JSON in an HTML comment) and rewrite it, keeping the other sections."""
    device = device_class(records)
    begin, end = f"<!-- bench:{preset_name}:{device} -->", f"<!-- /bench:{preset_name}:{device} -->"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nRegenerated by `python -m mtok_jax.bench --preset PRESET --what all --reference torch "
        "--markdown` (one section per preset and device class; see the module docstring of mtok_jax/bench.py).\n")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    found = pattern.search(text)
    previous = {}
    if found and _DATA_BEGIN in found.group(0):
        blob = found.group(0).split(_DATA_BEGIN, 1)[1].split(_DATA_END, 1)[0]
        previous = json.loads(blob)
    run = {"command": command, "date": datetime.date.today().isoformat(), "commit": _commit(),
           "versions": _versions(), "machine": _machine()}
    data = merge_runs(previous, records, run)
    lines = lambda xs: ",\n".join(json.dumps(x) for x in xs)  # noqa: E731 (one record a line)
    blob = f'{{"runs": [\n{lines(data["runs"])}],\n"records": [\n{lines(data["records"])}]}}'
    blob = blob.replace("--", "-\\u002d")  # (JSON's escape of "-": a "--" in a comment is not well-formed)
    block = f"{begin}\n{markdown_section(preset_name, data)}{_DATA_BEGIN}{blob}{_DATA_END}{end}"
    text = pattern.sub(lambda _: block, text) if found else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _child_env(backend: str) -> dict[str, str]:
    """This environment without a forced host device count (a CPU measurement runs on the one CPU device
    with all cores; virtual devices would split them), without a persistent compilation cache (the
    compile time measured is a compile, not a cache read), and for the PyTorch children without
    USE_TORCH=0 (they use transformers' torch classes; the JAX ones never load torch)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "XLA_FLAGS": " ".join(kept)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if backend != "jax" and env.get("USE_TORCH") == "0":
        del env["USE_TORCH"]
    return env


def _commit() -> str:
    """HEAD's short hash, or MTOK_BENCH_COMMIT where set (a copy of the tree without .git: a device machine)."""
    if os.environ.get("MTOK_BENCH_COMMIT"):
        return os.environ["MTOK_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one), its architecture and core count."""
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {platform.machine()}, {os.cpu_count()} cores"


def _versions() -> str:
    from importlib import metadata

    parts = []
    for name in ("jax", "jaxlib", "flax", "diffusers", "transformers", "torch"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(parts) + f", Python {platform.python_version()}"


# ===================================================================================================
# CLI
# ===================================================================================================
def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_enum("preset", "sd14-256", list(PRESETS), "shapes and models (module docstring)", flag_values=fv)
    flags.DEFINE_string("what", "all", f"comma-separated of {', '.join(WHATS)}, or all", flag_values=fv)
    flags.DEFINE_enum("reference", None, ["torch", "torch-eager"],
                      "also time PyTorch eager (SDPA) and torch.compile (torch) or eager only (torch-eager)",
                      flag_values=fv)
    flags.DEFINE_integer("runs", 5, "timed runs after one warm-up", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("assets", None, "weights and data folder (default: the preset's, written when missing)",
                        flag_values=fv)
    flags.DEFINE_float("timeout_s", 3600, "a measurement still running after this long is recorded as failed",
                       flag_values=fv)
    flags.DEFINE_multi_string("set", [], "config override of our side, KEY=VALUE (e.g. model.conv=xla); "
                              "repeatable, recorded in each JAX record", flag_values=fv)
    flags.DEFINE_bool("markdown", False, "merge this run into this preset's section of BENCHMARKS.md", flag_values=fv)
    flags.DEFINE_enum("_backend", None, list(BACKENDS), "(internal) run one measurement in this process",
                      flag_values=fv)
    flags.DEFINE_float("_flops", None, "(internal) FLOP count of the JAX record", flag_values=fv)


def parse_whats(text: str) -> list[str]:
    whats = list(WHATS) if text == "all" else [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in whats if w not in WHATS]
    if unknown or not whats:
        raise app.UsageError(f"--what {text!r}: choose from {', '.join(WHATS)} or all")
    return whats


def main(argv: Sequence[str] | None = None, builder: Callable = jax_work.build) -> list[dict] | None:
    """The CLI (module docstring) → the records; in a child (`--_backend`), one measurement with `builder`."""
    cli.setup_logging()
    args = sys.argv[1:] if argv is None else list(argv)
    fv, _ = cli.parse_command("python -m mtok_jax.bench", __doc__, _define, args)
    whats = parse_whats(fv.what)
    assets = fv.assets or PRESETS[fv.preset].assets
    if fv._backend:  # a child: one measurement, one result line
        (what,) = whats
        record = measure(fv.preset, what, fv._backend, assets, fv.runs, fv._flops, builder, fv.set)
        print(RECORD_PREFIX + json.dumps(record), flush=True)
        return None
    backends = {"torch": ["jax", "torch", "torch.compile"], "torch-eager": ["jax", "torch"]}.get(fv.reference, ["jax"])
    records = run_all(fv.preset, whats, backends, assets, fv.runs, timeout_s=fv.timeout_s, settings=fv.set)
    if fv.markdown:
        command = "python -m mtok_jax.bench " + " ".join(args)
        write_markdown(REPO / "BENCHMARKS.md", fv.preset, records, command)
    failed = [r for r in records if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(records)} measurements failed: "
                         + "; ".join(f"{r['what']}/{r['backend']}: {r['error']}" for r in failed))
    return records

