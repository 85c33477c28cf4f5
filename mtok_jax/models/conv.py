"""The UNet's stride-1 convolutions as matrix products on XLA:CPU (`model.conv`).

XLA:CPU's convolution is slow where the channels are many and the image is small, and slower still for
the input gradient that a frozen UNet's backward pass needs (it is lowered to the same convolution with
the kernel flipped and transposed, so writing it that way gains nothing). The same 3×3 convolution as
one matrix product of the 9 shifted copies of the input (im2col) with the [9·Cin, Cout] kernel runs on
XLA:CPU's matmul instead. Measured on 2 cores, float32, batch 2 (ms, XLA conv → im2col):

  | Cin → Cout, size  | forward     | input gradient |
  |-------------------|-------------|----------------|
  | 1280 → 1280, 8×8  | 143 → 118   | 264 → 90       |
  | 1280 → 1280, 4×4  | 79 → 40     | 216 → 26       |
  | 2560 → 1280, 8×8  | 328 → 181   | 572 → 140      |
  | 640 → 640, 16×16  | 104 → 53    | 103 → 47       |
  | 320 → 320, 32×32  | 76 → 110    | 86 → 80        |

Hence ``matmul``: 3×3 convolutions with ≥ ``MATMUL_MIN_CHANNELS`` input channels as im2col products,
1×1 convolutions as plain products, the rest (fewer channels, strided downsampling) as XLA's
convolution. ``auto`` (default): ``matmul`` on a CPU, ``xla`` on GPU/TPU (whose convolutions are fast).
Shapes: x [B, H, W, Cin] (NHWC), kernel [kh, kw, Cin, Cout] (HWIO) → [B, H, W, Cout]; the numbers equal
the convolution's up to float rounding.
"""

import jax
import jax.numpy as jnp

from mtok_jax.constants import CONVS as IMPLEMENTATIONS

MATMUL_MIN_CHANNELS = 640  # input channels from which im2col beats XLA:CPU's 3×3 convolution


def resolve(name: str, backend: str | None = None) -> str:
    """`model.conv` → the implementation used: xla | matmul (``auto`` decided here)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.conv={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if name == "auto":
        return "matmul" if (backend or jax.default_backend()) == "cpu" else "xla"
    return name


def as_matmul(kernel_hw: tuple[int, ...], in_channels: int) -> bool:
    """Whether a stride-1, 'same'-size convolution of this kernel size is computed as a matrix product."""
    return tuple(kernel_hw) == (1, 1) or (tuple(kernel_hw) == (3, 3) and in_channels >= MATMUL_MIN_CHANNELS)


def conv_as_matmul(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """Stride-1 convolution with zero padding (k−1)/2 (output size = input size) for k = 1 or 3:
    x [B, H, W, Cin], kernel [k, k, Cin, Cout] → [B, H, W, Cout]."""
    k = kernel.shape[0]
    if k == 1:
        return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0], precision=precision)
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    columns = jnp.concatenate([padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", columns, kernel.reshape(9 * c, -1), precision=precision)
