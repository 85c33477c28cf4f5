"""Test-session setup: 8 virtual CPU devices, float32 'highest' matmuls, quiet third-party logs.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test imports jax.
"""

import json
import os
import pathlib
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("USE_TF", "0")
# One persistent XLA compilation cache for the run, shared by the xdist workers and every train.py /
# sample.py process the tests start (test_faults.py alone starts ~20 that compile the same programs:
# ≈12 s saved per process). Set in the controller before its workers start, so all inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtok-test-xla-cache-")
    os.environ["MTOK_TEST_OWNS_XLA_CACHE"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import mtok_jax.environment as environment  # noqa: E402

# train.remat's tests (and test_memory) measure what remat saves, which XLA:CPU's default scheduler
# undoes; in XLA_FLAGS, so the train.py processes the tests start get it too.
environment.memory_first_cpu_schedule()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

environment.quiet_third_party_loggers()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MTOK_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden tensors not found at {GOLDEN} (set MTOK_SHARED)")
    return GOLDEN


def golden_arrays(golden_dir: pathlib.Path, name: str) -> dict:
    """Every array of the golden file `name` (e.g. 'beats_small.npz'), loaded."""
    with np.load(golden_dir / name) as d:
        return {k: d[k] for k in d.files}


def golden_state_dict(golden: dict) -> dict:
    """The reference module's state dict stored under 'sd/…' in a golden file."""
    return {k[len("sd/"):]: v for k, v in golden.items() if k.startswith("sd/")}


def xla_flags(devices: int) -> str:
    """This session's XLA_FLAGS (its optimisation level, scheduler flags) with `devices` host devices: the
    environment of a test's child process."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()


def built_once(tmp_path_factory, name: str, build) -> dict[str, str]:
    """A session asset built once for the whole run, also under pytest-xdist (its workers share the parent
    of their temp dirs; a file lock makes one build it, the others wait) → build(folder)'s dict of paths."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            paths = {k: str(v) for k, v in build(root / name).items()}
            done.write_text(json.dumps(paths))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict[str, str]:
    """The tiny demo SD / BEATs folders (``mtok_jax.demo.models.write_demo_models``), written once per
    test run (the VAE fit takes ~1 min) → ``{'sd': path, 'beats': path}``."""
    from mtok_jax.demo.models import write_demo_models

    return built_once(tmp_path_factory, "demo_models", write_demo_models)


def torch_or_skip():
    """Import torch or skip the calling test (torch is the optional `torch` extra).

    Torch runs on one thread: on this 2-core machine its default threading competes with XLA's pool
    and makes tiny reference forwards 100x slower."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


TINY_LABELS_N = 3  # labels of the tiny dataset
TINY_CLIP_SECONDS = 1.0


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, demo_models) -> dict[str, str]:
    """Tiny demo models (real formats) + a 3-label, 1 s, 32 px dataset built by the real TFDS builder:
    6 train / 3 validation / 3 test clips → {'sd', 'beats', 'data'} (builder config 'tiny')."""
    from mtok_jax.data import sources
    from mtok_jax.data.music_image import build, make_config
    from mtok_jax.demo.data import write_demo_sources

    def make(root: pathlib.Path) -> dict:
        labels = sources.DEFAULT_LABELS[:TINY_LABELS_N]
        manual = write_demo_sources(root / "manual", per_label={"train": 2, "validation": 1, "test": 1},
                                    clip_seconds=TINY_CLIP_SECONDS, labels=labels)
        build(manual, root / "data", make_config("folders", clip_seconds=TINY_CLIP_SECONDS, image_size=32,
                                                 labels=labels, name="tiny"), workers=0, progress=False)
        return {"data": root / "data"}

    return {"sd": demo_models["sd"], "beats": demo_models["beats"],
            **built_once(tmp_path_factory, "tiny", make)}


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random metric models in their real formats → {'clip', 'inception', 'wav2clip'} folders."""
    from metrics.inception import save_random_inception
    from metrics.demo_models import write_tiny_clip, write_tiny_wav2clip

    def make(root: pathlib.Path) -> dict:
        paths = {"clip": root / "clip", "inception": root / "inception", "wav2clip": root / "wav2clip"}
        write_tiny_clip(str(paths["clip"]), seed=0)
        save_random_inception(str(paths["inception"]), seed=0)
        write_tiny_wav2clip(str(paths["wav2clip"]), seed=0)
        return paths

    return built_once(tmp_path_factory, "metric_models", make)


# The slowest test files first, so that pytest-xdist's workers finish together (make test passes
# --no-loadscope-reorder: xdist would otherwise order files by their number of tests).
SLOWEST_FIRST = ("test_faults.py", "test_export.py", "test_distributed.py", "test_bench.py", "test_evaluate.py",
                 "test_train.py", "test_app.py", "test_feature_cache.py", "test_readme.py", "test_sample.py",
                 "test_torch_work.py", "test_demo_metric_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


def pytest_unconfigure(config):
    """The process that made the run's compilation cache removes it."""
    if os.environ.get("MTOK_TEST_OWNS_XLA_CACHE") == str(os.getpid()):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
