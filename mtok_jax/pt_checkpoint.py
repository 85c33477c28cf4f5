"""Reading PyTorch checkpoints for the converters: tensors only, unless the user trusts the file.

``torch.load(weights_only=False)`` unpickles arbitrary objects, i.e. runs whatever code a crafted file
names. :func:`load` reads with ``weights_only=True`` (tensors, dicts, lists, numbers, strings); a file
that holds other objects (e.g. an ``argparse.Namespace`` of training args) is refused with
:class:`UntrustedCheckpoint` unless ``trusted=True`` (the converters' ``--trusted`` flag).
torch (the optional ``torch`` extra) is imported only when a checkpoint is read.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

from mtok_jax import errors


class UntrustedCheckpoint(errors.UserError, ValueError):
    """A checkpoint that ``weights_only=True`` refuses; ``str(err)`` is one line naming the file."""


def load(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """``torch.load`` on CPU. Full unpickling only with ``trusted``; otherwise a file with non-tensor
    objects raises :class:`UntrustedCheckpoint` (nothing from it is executed)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("reading a PyTorch checkpoint needs torch: pip install 'mtok_jax[torch]'") from e
    path = os.fspath(path)
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler met a global it does not allow
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UntrustedCheckpoint(
            f"{path}: holds non-tensor objects{what}, refused (unpickling them could run code from the file); "
            f"rerun with --trusted only if you trust its source") from None
