"""Process-wide set-up of the third-party libraries (imported first by ``mtok_jax``): no TensorFlow,
quiet known-noisy loggers, a broken torchvision hidden, XLA:CPU's scheduler chosen per run.

diffusers 0.39 logs "Flax classes are deprecated" from every Flax module's ``setup`` (~120 lines per
UNet trace) through its own non-propagating logger, so ``warnings`` filters cannot reach it; we drop
exactly that message and keep every other diffusers warning. transformers 4.57 prints a one-time
TF/JAX deprecation line for Flax models; same treatment.
"""

import ctypes
import logging
import os

os.environ.setdefault("USE_TF", "0")  # transformers must never import TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"

_DROPPED = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


class _DropDeprecations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(d in msg for d in _DROPPED)


def without_torch_in_transformers() -> None:
    """For processes that never use transformers' PyTorch classes (train.py, sample.py): with torch
    installed, transformers imports it eagerly unless USE_TORCH=0 (`train.py --help` and flag errors:
    ≈10 s → 5 s). diffusers still imports torch once its logging is set up (its distributed_utils does
    so unconditionally), so a full run starts about as fast as before. Our own PyTorch readers import
    torch themselves and still work. Call before transformers is imported; an explicit USE_TORCH is kept."""
    os.environ.setdefault("USE_TORCH", "0")


def memory_first_cpu_schedule() -> bool:
    """Ask XLA:CPU for its memory-minimising HLO scheduler (``--xla_cpu_enable_concurrency_optimized_scheduler=false``)
    → whether it is in effect. Call before the first JAX computation (``train.train_and_evaluate`` and the
    bench's training steps do when ``train.remat`` is on; ``python -m mtok_jax.memory`` always); an explicit
    setting in XLA_FLAGS is kept.

    XLA:CPU's default concurrency-optimised scheduler hoists rematerialised forward ops back next to the
    forward, so ``train.remat`` saves nothing on CPU (a per-block checkpointed chain: 1,396 MiB of
    temporaries with remat vs 1,380 without; memory-minimising: 220 vs 990 MiB). It is also slower where
    there is nothing to save (sd14-256, 2 cores: BEATs 30 s forward 5.7 s vs 4.0 s, UNet forward 2.3 s vs
    1.8 s), so it is not the default. No effect on GPU/TPU (their schedulers are memory-aware)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _CPU_SCHEDULER_FLAG in flags:
        return f"{_CPU_SCHEDULER_FLAG}=false" in flags
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        import jax

        if jax.default_backend() == "cpu":
            logging.getLogger("mtok_jax").warning(
                "train.remat on CPU: XLA already started with its concurrency-optimised scheduler, which "
                "undoes rematerialisation; set XLA_FLAGS=%s=false before the first JAX computation",
                _CPU_SCHEDULER_FLAG)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_SCHEDULER_FLAG}=false".strip()
    return True


def release_free_host_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``): reading weights and compiling
    a large step leave freed memory resident (0.4 GiB after reading exp2's full-size weights), which on
    a CPU backend the training step's own buffers then compete with. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quiet_third_party_loggers() -> None:
    """Attach the filter to the diffusers/transformers loggers and their handlers (idempotent)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.get_logger("diffusers")
    tlog.get_logger("transformers")
    for name in ("diffusers", "transformers"):
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:
            if not any(isinstance(f, _DropDeprecations) for f in target.filters):
                target.addFilter(_DropDeprecations())


def hide_broken_torchvision() -> None:
    """A torchvision whose C ops do not load beside the installed torch (PyPI's build next to the CPU
    torch wheel: "operator torchvision::nms does not exist") breaks ``import diffusers`` Flax classes and
    transformers' image processors. Mark it unavailable for both; a working torchvision is left alone."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        import diffusers.utils.import_utils as diffusers_imports
        import transformers.utils.import_utils as transformers_imports

        diffusers_imports._torchvision_available = False
        transformers_imports._torchvision_available = False
