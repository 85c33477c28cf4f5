"""Process-wide set-up of the third-party libraries (imported first by ``mtok_jax``): no TensorFlow,
quiet known-noisy loggers, a broken torchvision hidden.

diffusers 0.39 logs "Flax classes are deprecated" from every Flax module's ``setup`` (~120 lines per
UNet trace) through its own non-propagating logger, so ``warnings`` filters cannot reach it; we drop
exactly that message and keep every other diffusers warning. transformers 4.57 prints a one-time
TF/JAX deprecation line for Flax models; same treatment.
"""

import logging
import os

os.environ.setdefault("USE_TF", "0")  # transformers must never import TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
