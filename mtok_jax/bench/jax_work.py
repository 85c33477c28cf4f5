"""The benchmarked work in JAX (mtok_jax.bench): each `what` built as a compiled call on one device.

`build(what, config, preset)` → Work: `call()` runs it once and blocks until done; `flops` is XLA's
cost analysis of the compiled function (the count every backend's record uses). The inputs are random
with the shapes of `config` (30 s waveforms, images of data.image_size, batch preset.batch); the
training steps are train.compile_train_step, exactly what train.py runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtok_jax import config_utils, environment, monitor, sharding
from mtok_jax import sample as sample_lib
from mtok_jax import system as system_lib
from mtok_jax import train
from mtok_jax import tree as tree_lib
from mtok_jax.data import cache as feature_cache
from mtok_jax.data import pipeline
from mtok_jax.models import diffusion


@dataclasses.dataclass
class Work:
    """One benchmarked call: call() runs and blocks; flops per call (None: not a compiled function)."""
    call: Callable[[], Any]
    flops: float | None
    compile_s: float
    device_kind: str
    extra: dict = dataclasses.field(default_factory=dict)


def random_inputs(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{'audio' float32 [B, N] in [-0.5, 0.5], 'image' float32 [B, H, W, 3] in [-1, 1], 'label' int32 [B]}."""
    rng = np.random.default_rng(seed)
    h, w = config_utils.image_hw(config)
    return {"audio": rng.uniform(-0.5, 0.5, (batch, config_utils.clip_samples(config))).astype(np.float32),
            "image": rng.uniform(-1, 1, (batch, h, w, 3)).astype(np.float32),
            "label": (np.arange(batch) % 18).astype(np.int32)}


def _compiled(fn: Callable, *args) -> tuple[Any, float, float | None]:
    """jit(fn) compiled for args → (compiled, compile seconds, FLOPs per call)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start, monitor.compiled_flops(compiled)


def _blocking(compiled, *args) -> Callable[[], Any]:
    return lambda: jax.block_until_ready(compiled(*args))


def build(what: str, config, preset, compiled: bool = False) -> Work:
    """The JAX Work of `what` (mtok_jax.bench.WHATS) for `config` at `preset.batch`."""
    del compiled  # (a torch option)
    if config.train.remat:  # (exp2's config) as train.py's step; before JAX starts
        environment.memory_first_cpu_schedule()
    kind = jax.devices()[0].device_kind
    if what == "input":
        return _input_work(config, preset.batch, kind)
    system, params = system_lib.load_system(config, pipeline.configured_labels(config))
    if system.config.model.dtype == "bfloat16":
        params = tree_lib.cast_floating(params, jnp.bfloat16)
    inputs = random_inputs(config, preset.batch)
    key = jax.random.key(0)
    if what in ("exp1", "exp1-cached", "exp2"):
        store = None
        if what == "exp1-cached":  # the first examples' cached features and moments instead of the clips
            store = feature_cache.ensure(config, system, params)
            n = preset.batch
            inputs = {"features": np.stack([store.features("train", i % store.meta["num_examples"]["train"])
                                            for i in range(n)]),
                      "moments": np.stack([store.moments("train", i % store.meta["num_examples"]["train_images"])
                                           for i in range(n)]),
                      "label": inputs["label"]}
        return _train_work(system, params, inputs, kind, store)
    if what == "sample":
        return _sample_work(system, params, inputs, preset.sample_steps, kind)
    def beats_fn(p, w):
        return system_lib.beats_features(system, {"beats": p}, w, rng=key, train=False)

    if what == "beats":
        fn, args = beats_fn, (params["beats"], inputs["audio"])
    elif what == "embedder":
        feats = jax.eval_shape(beats_fn, params["beats"], inputs["audio"])
        x = jnp.asarray(np.random.default_rng(1).normal(size=feats.shape), feats.dtype)
        fn = lambda p, f: system.embedder.apply({"params": p}, f, deterministic=True,  # noqa: E731
                                                rngs={"dropout": key})
        args = (params["embedder"], x)
    elif what == "unet":
        fn, args = _unet_call(system), (params["unet"], *unet_inputs(system, preset.batch))
    else:
        raise ValueError(f"unknown benchmark {what!r}")
    call, seconds, flops = _compiled(fn, *args)
    return Work(_blocking(call, *args), flops, seconds, kind)


def unet_inputs(system: system_lib.System, batch: int, seed: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noisy latents [B, 4, h, w], timesteps int32 [B], text states [B, 77, D]) of random values."""
    c, h, w = sample_lib.latent_shape(system)
    rng = np.random.default_rng(seed)
    dtype = system_lib.compute_dtype(system.config)
    return (jnp.asarray(rng.normal(size=(batch, c, h, w)), jnp.float32),
            jnp.asarray(rng.integers(0, 1000, batch), jnp.int32),
            jnp.asarray(rng.normal(size=(batch, 77, system.token_dim)), dtype))


def _unet_call(system: system_lib.System) -> Callable:
    return lambda p, x, t, s: diffusion.unet_noise(system.unet, p, x, t, s, attention=system.attention,
                                                   conv=system.conv)


def _train_work(system: system_lib.System, params: dict, inputs: dict, kind: str, store=None) -> Work:
    """train.py's compiled step on one device (from the feature cache `store` when given); each call
    continues from the previous call's state."""
    config = system.config
    schedule = train.learning_rate(config.train, 1000)
    optimizer = train.make_optimizer(config.train, schedule)
    state = train.create_state(config, params, sharding.make_mesh({"data": 1, "fsdp": 1}), optimizer)
    sh, trainable, opt_state, frozen = state.sh, state.trainable, state.opt_state, state.frozen
    start = time.perf_counter()
    step = train.compile_train_step(system, optimizer, schedule, sh, trainable, opt_state, frozen, store)
    seconds = time.perf_counter() - start
    batch = pipeline.to_global({k: v[None] for k, v in inputs.items()}, sh.train_batch)
    root_key = sharding.put(jax.random.key(config.seed), sh.replicated)
    state = {"trainable": trainable, "opt_state": opt_state, "step": 0}

    def call():
        tr, opt, metrics = step(state["trainable"], state["opt_state"], frozen, batch, jnp.int32(state["step"]),
                                root_key)
        state.update(trainable=tr, opt_state=opt, step=state["step"] + 1)
        jax.block_until_ready((tr, metrics))

    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return Work(call, monitor.compiled_flops(step), seconds, kind, {"trainable_params": n})


def _sample_work(system: system_lib.System, params: dict, inputs: dict, steps: int, kind: str) -> Work:
    """sample.generate_images (the jitted sampler of sample.py): PNDM, guidance 7.5, `steps` steps."""
    config = system.config
    sched, state = diffusion.sampler_from_config(
        diffusion.read_scheduler_config(config.model.sd_path, allow_download=False), "pndm")
    uncond = jax.jit(functools.partial(system_lib.unconditional_states, system))(params["text"])
    n = inputs["audio"].shape[0]
    keys = sample_lib.image_keys(list(range(n)), 1)
    fn = functools.partial(sample_lib.generate_images, system, scheduler=sched, steps=steps)
    args = (params, uncond, jnp.asarray(inputs["audio"]), jnp.asarray(keys), jnp.float32(7.5))
    start = time.perf_counter()
    compiled = jax.jit(lambda *a, state: fn(*a, state=state)).lower(*args, state=state).compile()
    seconds = time.perf_counter() - start
    return Work(lambda: jax.block_until_ready(compiled(*args, state=state)), monitor.compiled_flops(compiled),
                seconds, kind, {"steps": steps, "scheduler": "pndm", "guidance": 7.5})


def _input_work(config, batch: int, kind: str) -> Work:
    """Batches of the training iterator with one reader thread and no prefetch (its own rate); the
    default threads' rate goes into `extra`."""
    def reader(threads: int):
        epoch = 0
        while True:
            yield from pipeline.batches(config.data.data_dir, "train", global_batch_size=batch, seed=0, epoch=epoch,
                                        config_name=config.data.builder_config, prefetch=0, threads=threads)
            epoch += 1

    one = reader(1)
    threads = 4
    many = reader(threads)
    next(many)
    start, count = time.perf_counter(), 0
    while count < 5 or time.perf_counter() - start < 1.0:
        next(many)
        count += 1
    rate_all = count * batch / (time.perf_counter() - start)
    return Work(lambda: next(one), None, 0.0, kind, {"threads": threads, "examples_per_s_all_threads": rate_all})
