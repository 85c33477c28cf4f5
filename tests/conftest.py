"""Test-session setup: 8 virtual CPU devices, float32 'highest' matmuls, quiet third-party logs.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test imports jax.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("USE_TF", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import mtok_jax._compat as _compat  # noqa: E402

_compat.quiet_third_party_loggers()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MTOK_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden tensors not found at {GOLDEN} (set MTOK_SHARED)")
    return GOLDEN


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict[str, str]:
    """The tiny demo SD / BEATs folders (``mtok_jax.demo.models.write_demo_models``), written once per
    test session (the VAE fit takes ~1 min) → ``{'sd': path, 'beats': path}``."""
    from mtok_jax.demo.models import write_demo_models

    return write_demo_models(tmp_path_factory.getbasetemp() / "demo_models")


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
    from mtok_jax.data.builder import build, make_config
    from mtok_jax.demo.data import write_demo_sources

    labels = sources.DEFAULT_LABELS[:TINY_LABELS_N]
    root = tmp_path_factory.mktemp("tiny")
    manual = write_demo_sources(root / "manual", per_label={"train": 2, "validation": 1, "test": 1},
                                clip_seconds=TINY_CLIP_SECONDS, labels=labels)
    data_dir = root / "data"
    build(manual, data_dir, make_config("folders", clip_seconds=TINY_CLIP_SECONDS, image_size=32, labels=labels,
                                        name="tiny"), workers=0, progress=False)
    return {"sd": demo_models["sd"], "beats": demo_models["beats"], "data": str(data_dir)}


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random metric models in their real formats → {'clip', 'inception', 'wav2clip'} folders."""
    from metrics.inception import save_random_inception
    from mtok_jax.demo.metric_models import write_tiny_clip
    from mtok_jax.demo.wav2clip import write_tiny_wav2clip

    root = tmp_path_factory.mktemp("metric_models")
    paths = {"clip": str(root / "clip"), "inception": str(root / "inception"), "wav2clip": str(root / "wav2clip")}
    write_tiny_clip(paths["clip"], seed=0)
    save_random_inception(paths["inception"], seed=0)
    write_tiny_wav2clip(paths["wav2clip"], seed=0)
    return paths
