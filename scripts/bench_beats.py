"""Benchmark the full-size BEATs forward (iter3+ AS2M cfg, random weights) on one clip.

  .venv/bin/python scripts/bench_beats.py [--seconds 30] [--runs 5] [--dtypes float32,bfloat16] [--grouped]

Prints a matmul machine check (the box is shared: compare against it), then per compute dtype: tokens, AOT lower+compile time, steady-state ms per clip (median of --runs
after one warm-up) for waveform → fbank → BEATs features, and the fbank alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mtok_jax  # noqa: F401  (environment setup first)

import jax
import jax.numpy as jnp
import numpy as np

from mtok_jax.audio import kaldi_fbank
from mtok_jax.models.beats import BEATS_ITER3_PLUS_AS2M_CFG, BEATs, init_params


def _median_ms(fn, runs: int) -> tuple[float, list[float]]:
    jax.block_until_ready(fn())                                   # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), [round(x, 1) for x in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="clip length at 16 kHz (30 s → 1,496 tokens)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per setting (median is reported)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    ap.add_argument("--grouped", action="store_true", help="grouped conv-pos instead of the split form")
    args = ap.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ×{jax.device_count()}, "
          f"matmul precision {jax.config.jax_default_matmul_precision or 'default'}")
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(jnp.matmul).lower(a, a).compile()
    ms, _ = _median_ms(lambda: mm(a, a), 3)
    print(f"machine check: 2048³ f32 matmul {2 * 2048 ** 3 / ms / 1e6:.0f} GFLOP/s "
          f"(quiet 2-core anchor ≈ 400, docs/design.md §5)")
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, (1, int(args.seconds * 16000))).astype(np.float32)
    t = time.perf_counter()
    params = jax.block_until_ready(init_params(BEATS_ITER3_PLUS_AS2M_CFG, jax.random.PRNGKey(0)))
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"random full-size params: {n / 1e6:.1f} M ({time.perf_counter() - t:.1f} s to init)")

    fb = jax.jit(kaldi_fbank).lower(wav).compile()
    ms, all_ms = _median_ms(lambda: fb(wav), args.runs)
    print(f"fbank only: {ms:.1f} ms/clip {all_ms}")

    for name in args.dtypes.split(","):
        model = BEATs(BEATS_ITER3_PLUS_AS2M_CFG, dtype=jnp.dtype(name), split_conv_pos=not args.grouped)
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x).features)
        t = time.perf_counter()
        compiled = fwd.lower(params, wav).compile()
        compile_s = time.perf_counter() - t
        tokens = jax.eval_shape(fwd, params, wav).shape[1]
        ms, all_ms = _median_ms(lambda: compiled(params, wav), args.runs)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        gflop = float(cost.get("flops", float("nan"))) / 1e9
        print(f"BEATs {name:8s} {'grouped' if args.grouped else 'split'} conv-pos: {args.seconds:g} s clip → "
              f"{tokens} tokens; compile {compile_s:.1f} s; {ms:.0f} ms/clip (median of {args.runs}: {all_ms}); "
              f"{gflop:.0f} GFLOP (XLA) → {gflop / ms * 1e3:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
