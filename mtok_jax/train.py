"""Training loop: `train_and_evaluate(config, workdir)` (docs/design.md §1, §2.6, §3).

`_train` reads top to bottom: `prepare` (mesh → data plan → models and feature cache → `create_state`,
restored from the latest checkpoint → `compile_train_step`), then one flat loop over global steps
(`epoch, batch = divmod(step, steps_per_epoch)`) that pulls metrics at log/checkpoint steps and ends each
epoch with validation and checkpoints (`_end_of_epoch`). One path from 1 CPU to a pod: `jax.jit` with NamedSharding over a ('data', 'fsdp') mesh, the
batch split over both axes, frozen params passed as arguments (never closed over), gradients only for
the trainable tree (a regex in the config), AdamW, gradient accumulation inside the step (a scan over
micro-batches; the update equals the big batch's), `fold_in(rng, step)` randomness drawn per example
(so a batch split into micro-batches or over devices draws the same numbers), orbax checkpoints that
resume with the data order continuing where it stopped.

Workdir contents: config.json, metrics.jsonl (one object per log step and per epoch: kind, epoch,
step, train_loss, val_loss, lr; cut back to the resumed step at every start, so it always equals an
uninterrupted run's), loss.png (train/val loss per epoch, like thesis Fig. 5.1),
checkpoints/{latest,best}/<step>/ (mtok_jax.checkpoints: newest two `latest` kept, checksummed,
fallback to the older), checkpoints/corrupt/ (steps that failed to restore), .lock (the running
process's PID and host), tensorboard/ (TensorBoard event files: losses, lr, grad norm, step time,
examples/s, FLOP/s, device memory, validation images; `train.report_to`), samples/epoch_K/grid.png
(validation images every `train.sample_every_epochs`), profile/ (`train.profile_steps`); see
mtok_jax.monitor. Timing goes to TensorBoard only: metrics.jsonl holds no wall-clock values. SIGTERM / SIGINT stop the run at the next step boundary after saving `latest`
(mtok_jax.signals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from mtok_jax import checkpoints, config_utils, environment, losses, monitor, sharding, signals, workdir_lock
from mtok_jax import tree as tree_lib
from mtok_jax import system as system_lib
from mtok_jax.data import cache as feature_cache
from mtok_jax.data import features as features_lib
from mtok_jax.data import pipeline
from mtok_jax.models import diffusion

log = logging.getLogger("mtok_jax.train")

EVAL_SEED = 0x5EED  # folded into the root key for validation noise (the same every epoch)


# ===================================================================================================
# Optimizer
# ===================================================================================================
def learning_rate(train_config, steps_per_epoch: int) -> optax.Schedule:
    """lr of optimizer update k (optax's count; diffusers' LambdaLR after k scheduler steps).

    `cosine`: linear warm-up 0 → peak over `warmup_steps`, then cosine decay to 0 at the end of the run
    (diffusers' get_cosine_schedule_with_warmup). `constant`: the peak, after a linear warm-up when
    `warmup_steps` > 0 (diffusers' `constant` ignores its warm-up: the thesis configs set 0 there).
    With `scale_lr` the base lr is multiplied by the examples per update (global batch × accumulation),
    which is the reference's lr × per-device batch × accumulation × devices.
    `schedule_sized_in_micro_batches` (prelim2's script): warm-up and length are counted in micro-batches
    (× grad_accum) while the schedule advances once per update, so the cosine never finishes.
    """
    t = train_config
    peak = t.lr * (t.batch_size * t.grad_accum if t.scale_lr else 1)
    scale = t.grad_accum if t.get("schedule_sized_in_micro_batches", False) else 1
    total = max(t.epochs * steps_per_epoch, 1) * scale
    warmup = min(t.warmup_steps * scale, total - 1)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0) if warmup else \
            optax.cosine_decay_schedule(peak, total)
    if t.schedule == "constant":
        if warmup:
            return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                        [warmup])
        return optax.constant_schedule(peak)
    raise ValueError(f"unknown schedule {t.schedule!r}")


def make_optimizer(train_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on every trainable leaf (torch.optim.AdamW semantics)."""
    t = train_config
    return optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)


# ===================================================================================================
# The loss of one batch on the real system
# ===================================================================================================
def system_front(system: system_lib.System, trainable: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array],
                 keys: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """The audio branch (docs/design.md §1): audio → audio token → text states, with classifier-free
    guidance dropout in training. keys [B]: one key per example. → {'token' [B, D], 'states' [B, 77, D]}."""
    params = tree_lib.merge_params(trainable, frozen)
    token = system_lib.batch_audio_token(system, params, batch, rng=system_lib.split_example_keys(keys)["token"],
                                         train=train)
    states = system_lib.text_states(system, params, token, "train")
    p_uncond = float(system.config.train.uncond_prob)
    if train and p_uncond > 0:  # classifier-free guidance dropout: the empty prompt's states instead
        uncond = system_lib.unconditional_states(system, params["text"]).astype(states.dtype)
        drop = jax.vmap(lambda key: jax.random.bernoulli(jax.random.fold_in(key, 4), p_uncond))(keys)
        states = jnp.where(drop[:, None, None], uncond, states)
    return {"token": token, "states": states}


def system_back(system: system_lib.System, trainable: Mapping, frozen: Mapping, front: Mapping[str, jax.Array],
                batch: Mapping[str, jax.Array], keys: jax.Array) -> dict[str, jax.Array]:
    """The image branch given `front` (system_front's outputs): image (or its cached posterior 'moments')
    → VAE latents; DDPM noise at t ~ U{0..T−1}; UNet(noisy, t, states).
    → {'pred', 'target' [B, C, h, w], 'token', 'tau' [B, D]}."""
    params = tree_lib.merge_params(trainable, frozen)
    k = system_lib.split_example_keys(keys)
    if "moments" in batch:
        latents = jax.vmap(lambda m, key: diffusion.latents_from_moments(system.vae, m[None], key)[0])(
            batch["moments"], k["vae"])
    else:
        latents = jax.vmap(lambda img, key: diffusion.encode_latents(system.vae, params["vae"], img[None], key)[0])(
            batch["image"], k["vae"])
    noise = jax.vmap(lambda key: jax.random.normal(key, latents.shape[1:], latents.dtype))(k["noise"])
    num_t = system.noise_scheduler.config.num_train_timesteps
    t = jax.vmap(lambda key: jax.random.randint(key, (), 0, num_t))(k["timestep"])
    noisy, target = diffusion.noisy_latents_and_target(system.noise_scheduler, system.noise_state, latents, noise, t)
    pred = diffusion.unet_noise(system.unet, params["unet"], noisy, t, front["states"],
                                attention=system.attention, conv=system.conv, remat=system.config.train.remat)
    return {"pred": pred, "target": target, "token": front["token"], "tau": system.label_targets[batch["label"]]}


def system_outputs(system: system_lib.System, trainable: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array],
                   keys: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """One batch through the whole model: system_back(system_front(...)). keys [B]: one key per example."""
    front = system_front(system, trainable, frozen, batch, keys, train=train)
    return system_back(system, trainable, frozen, front, batch, keys)


def loss_weights(config) -> losses.Weights:
    return losses.Weights(config.train.lambda_l1, config.train.lambda_l2, config.train.lambda_cl)


def _outputs_loss(system: system_lib.System, out: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                  batch_mean_cos: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    return losses.total_loss(out["pred"], out["target"], out["token"], out["tau"], loss_weights(system.config),
                             batch.get("mask"), batch_mean_cos)


def system_loss(system: system_lib.System, trainable: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array],
                keys: jax.Array, batch_mean_cos: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss of one (micro-)batch → (loss, terms) (mtok_jax.losses.total_loss)."""
    return _outputs_loss(system, system_outputs(system, trainable, frozen, batch, keys, train=True), batch,
                         batch_mean_cos)


@dataclasses.dataclass(frozen=True)
class LossStages:
    """A loss written as back(back_params, frozen, front(front_params, frozen, batch, keys), batch, keys,
    batch_mean_cos) → (loss, terms), where back_params are the trainable params under `back_keys` (top-level
    keys) and front_params the rest: the training step then updates back_params before it runs the
    front's backward pass (make_train_step)."""
    back_keys: tuple[str, ...]
    front: Callable
    back: Callable


def system_loss_stages(system: system_lib.System) -> LossStages:
    """system_loss as LossStages (`train.update_unet_first`): the UNet is the back (its 3.2 GiB of gradients
    are consumed by the optimizer before BEATs' backward pass starts), the audio branch the front."""
    return LossStages(
        back_keys=("unet",),
        front=lambda tr, fr, b, k: system_front(system, tr, fr, b, k, train=True),
        back=lambda tr, fr, front, b, k, mean_cos: _outputs_loss(system, system_back(system, tr, fr, front, b, k), b,
                                                                 mean_cos))


def system_cosines(system: system_lib.System, trainable: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array],
                   keys: jax.Array) -> jax.Array:
    """cos(audio token, label target) per example [B], with the randomness of system_loss."""
    params = tree_lib.merge_params(trainable, frozen)
    token_keys = system_lib.split_example_keys(keys)["token"]
    token = system_lib.batch_audio_token(system, params, batch, rng=token_keys, train=True)
    return losses.cosine_similarity(token, system.label_targets[batch["label"]])


def system_eval_loss(system: system_lib.System, trainable: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array],
                     keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Validation loss of a padded batch [B] in groups of `train.val_batch_size` consecutive examples
    (the reference's validation batches) → (Σ_groups loss_g · n_g, Σ n_g), n_g = real examples."""
    out = system_outputs(system, trainable, frozen, batch, keys, train=False)
    vb = int(system.config.train.val_batch_size)
    grouped = {k: v.reshape(-1, vb, *v.shape[1:]) for k, v in {**out, "mask": batch["mask"]}.items()}
    weights = loss_weights(system.config)
    group_loss = jax.vmap(lambda g: losses.total_loss(g["pred"], g["target"], g["token"], g["tau"], weights,
                                                      g["mask"])[0])(grouped)
    counts = jnp.sum(grouped["mask"].astype(jnp.float32), axis=1)
    return jnp.sum(group_loss * counts), jnp.sum(counts)


# ===================================================================================================
# Steps
# ===================================================================================================
def make_train_step(loss_fn: Callable, cosine_fn: Callable | None, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, faithful_accumulation: bool = False, stages: LossStages | None = None):
    """train_step(trainable, opt_state, frozen, batch, step, root_key) → (trainable, opt_state, metrics).

    batch: arrays [accum, B, ...] (micro-batches on the leading axis). The gradient is the mean of the
    micro-batch gradients, i.e. the big batch's: every loss term is a mean over examples except the
    cosine term (1 − mean cos)², which is nonlinear in the batch mean; with more than one micro-batch
    (and `cosine_fn` given) a forward pre-pass computes the big batch's mean cosine and each
    micro-batch uses the exact linearisation around it (losses.label_cosine_term).
    loss_fn(trainable, frozen, micro_batch, keys [B], batch_mean_cos) → (loss, terms);
    cosine_fn(trainable, frozen, batch, keys [B]) → cos [B].
    faithful_accumulation (the reference's `loss.backward()` per micro-batch): the gradient is the *sum*
    of the micro-batch gradients, each with its own cosine term, i.e. of Σᵢ Lᵢ (with batch 1 × 4 the
    cosine part is Σᵢ (1 − cosᵢ)²); no pre-pass, no division by the accumulation count.
    stages (`loss_fn` written as LossStages; optimizer elementwise, like AdamW): without accumulation, the
    back params are updated before the front's backward pass runs, so their gradients are freed before
    it (the same numbers). Less memory where gradients dominate (exp2, 256 px, batch 1, one device: 6.8 →
    4.6 GB of temporaries), more where activations do (512 px, batch 8 over 8 devices: 5.7 → 7.4 GiB).
    """

    def train_step(trainable, opt_state, frozen, batch, step, root_key):
        accum, micro = jax.tree.leaves(batch)[0].shape[:2]
        keys = system_lib.example_keys(jax.random.fold_in(root_key, step), accum * micro)
        mean_cos = None
        if cosine_fn is not None and accum > 1 and not faithful_accumulation:
            flat = jax.tree.map(lambda x: x.reshape(accum * micro, *x.shape[2:]), batch)
            mean_cos = jnp.mean(cosine_fn(trainable, frozen, flat, keys))

        def micro_step(grad_sum, xs):
            mb, mb_keys = xs
            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, mb, mb_keys, mean_cos)
            return jax.tree.map(jnp.add, grad_sum, grads), (loss, terms)

        if accum == 1 and _staged(stages, trainable):
            mb = jax.tree.map(lambda x: x[0], batch)
            trainable, opt_state, loss, terms, grad_norm = _staged_update(stages, optimizer, trainable, opt_state,
                                                                          frozen, mb, keys)
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step), **terms}
            return trainable, opt_state, metrics
        if accum == 1:  # no scan: its carry would hold a second copy of the gradients (exp2: 3.6 GiB)
            (loss, terms), grad_sum = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, frozen, jax.tree.map(lambda x: x[0], batch), keys, mean_cos)
            loss, terms = loss[None], jax.tree.map(lambda v: v[None], terms)
        else:
            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grad_sum, (loss, terms) = jax.lax.scan(micro_step, zeros, (batch, keys.reshape(accum, micro)))
        grads = grad_sum if faithful_accumulation else jax.tree.map(lambda g: g / accum, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": jnp.mean(loss), "grad_norm": optax.tree.norm(grads), "lr": schedule(step),
                   **{k: jnp.mean(v) for k, v in terms.items()}}
        if mean_cos is not None:  # the big batch's term, not the mean of linearised values
            metrics["cosine"] = jnp.square(1.0 - mean_cos)
        return trainable, opt_state, metrics

    return train_step


def _staged(stages: LossStages | None, trainable: Mapping) -> bool:
    return stages is not None and any(k in trainable for k in stages.back_keys) and any(
        k not in stages.back_keys for k in trainable)


def _split_state(opt_state: Any, keep: Callable[[str], bool]) -> Any:
    """The optimizer state of the params under the top-level keys `keep` accepts: every dict in an optax
    state is a parameter-shaped tree (moments); counts are shared."""
    return jax.tree.map(lambda x: {k: v for k, v in x.items() if keep(k)} if isinstance(x, dict) else x, opt_state,
                        is_leaf=lambda x: isinstance(x, dict))


def _merge_state(first: Any, second: Any) -> Any:
    """Inverse of two _split_state calls on complementary keys (counts: the first's, equal to the second's)."""
    return jax.tree.map(lambda a, b: {**a, **b} if isinstance(a, dict) else a, first, second,
                        is_leaf=lambda x: isinstance(x, dict))


def _staged_update(stages: LossStages, optimizer: optax.GradientTransformation, trainable: Mapping, opt_state: Any,
                   frozen: Mapping, batch: Mapping[str, jax.Array], keys: jax.Array):
    """One micro-batch: forward, the back's backward pass, its gradient norm and update, then the front's
    backward pass and update. → (trainable, opt_state, loss, terms, grad_norm)."""
    is_back = lambda k: k in stages.back_keys  # noqa: E731
    back = {k: v for k, v in trainable.items() if is_back(k)}
    front = {k: v for k, v in trainable.items() if not is_back(k)}
    front_out, front_vjp = jax.vjp(lambda p: stages.front(p, frozen, batch, keys), front)
    (loss, terms), (back_grads, out_grads) = jax.value_and_grad(
        lambda p, out: stages.back(p, frozen, out, batch, keys, None), argnums=(0, 1), has_aux=True)(back, front_out)
    back_updates, back_state = optimizer.update(back_grads, _split_state(opt_state, is_back), back)
    back = optax.apply_updates(back, back_updates)
    back_sq = jnp.square(optax.tree.norm(back_grads))
    # The front's backward pass must wait for the back's gradient norm and updates (the last reads of its
    # gradients). XLA:CPU drops optimisation barriers before it schedules, so the order is a data
    # dependence: 0 · tanh(the norm + Σ of each updated leaf), NaN only where the update already is.
    # (XLA:CPU may still recompute the sums from the moments and run the parameter writes late: measured
    # on exp2 at 256 px, 4.6 GB of temporaries instead of 6.8.)
    done = back_sq + sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(back))
    out_grads = jax.tree.map(lambda g: g + (0.0 * jnp.tanh(done)).astype(g.dtype), out_grads)
    (front_grads,) = front_vjp(out_grads)
    front_updates, front_state = optimizer.update(front_grads, _split_state(opt_state, lambda k: not is_back(k)),
                                                  front)
    front = optax.apply_updates(front, front_updates)
    grad_norm = jnp.sqrt(back_sq + jnp.square(optax.tree.norm(front_grads)))
    return ({**front, **back}, _merge_state(front_state, back_state), loss, terms, grad_norm)


def make_eval_step(eval_loss_fn: Callable):
    """eval_step(trainable, frozen, batch, first_index, key) → (Σ loss·n, Σ n).

    Example i of the split gets key fold_in(key, i): its noise depends neither on padding nor on
    the batch size, and is the same every epoch (so epochs are compared on the same noise)."""

    def eval_step(trainable, frozen, batch, first_index, key):
        keys = system_lib.example_keys(key, batch["mask"].shape[0], first_index)
        return eval_loss_fn(trainable, frozen, batch, keys)

    return eval_step


# ===================================================================================================
# Logs
# ===================================================================================================
class MetricsLog:
    """Appends JSON lines to WORKDIR/metrics.jsonl and redraws loss.png from its epoch lines."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.plot_path = os.path.join(workdir, "loss.png")
        self.enabled = enabled

    def write(self, **record) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                space = "no space left on the device" if e.errno == errno.ENOSPC else e.strerror
                raise checkpoints.CheckpointError(f"cannot write {self.path}: {space}") from e

    def truncate_after(self, step: int) -> None:
        """Keep only lines of steps ≤ `step` (called at every start with the resumed step, 0 when fresh:
        lines a killed run wrote after its last checkpoint are repeated by this run). A torn last line
        (killed mid-write) is dropped."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def epochs(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == "epoch"]

    def plot(self) -> None:
        """Train and validation loss per epoch (thesis Figure 5.1)."""
        rows = self.epochs()
        if not (self.enabled and rows):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in rows]
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
        ax.plot(epochs, [r["val_loss"] for r in rows], "s-", label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path)
        plt.close(fig)


class PendingMetrics:
    """Metrics of the steps since the last pull, left on the device (dispatching the next step does not
    wait for the previous one's loss)."""

    def __init__(self):
        self._items: list[tuple] = []

    def add(self, step: int, epoch: int, batch_in_epoch: int, metrics: Mapping[str, jax.Array],
            perf: Mapping[str, float]) -> None:
        self._items.append((step, epoch, batch_in_epoch, metrics, perf))

    def pull(self) -> list[tuple[int, int, int, dict[str, float], Mapping[str, float]]]:
        """→ [(step, epoch, batch_in_epoch, {name: float}, perf)] in step order (one device → host transfer)."""
        items, self._items = self._items, []
        values = jax.device_get([m for _, _, _, m, _ in items])
        return [(s, e, b, {k: float(v) for k, v in host.items()}, perf)
                for (s, e, b, _, perf), host in zip(items, values)]


def _progress(total: int, initial: int, unit_per_step: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total * unit_per_step, initial=initial * unit_per_step, unit="ex", unit_scale=False,
                desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


# ===================================================================================================
# train_and_evaluate: prepare (data plan, models, state, compiled steps), then one flat loop over steps
# ===================================================================================================
def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train per `config` into `workdir`, resuming from its latest restorable checkpoint when there is one.

    → {'step', 'epoch', 'best_val_loss', 'val_losses' (this call's epochs), 'trainable' (final params),
    'interrupted' (None, or 'SIGTERM' / 'SIGINT' when a signal stopped the run after saving `latest`)}.
    The workdir is locked for the run (workdir_lock.WorkdirLockedError when another process holds it).
    """
    config_utils.validate(config)
    workdir = os.path.abspath(workdir)
    if config.train.remat:
        environment.memory_first_cpu_schedule()  # before JAX starts (a no-op off CPU)
    sharding.initialize_distributed(config)  # (a no-op when the entry point started it)
    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(workdir_lock.WorkdirLock(workdir))
        stop = stack.enter_context(signals.GracefulStop())
        ckpt = stack.enter_context(checkpoints.Checkpointer(workdir))
        return _train(config, workdir, stop, ckpt)


def _train(config, workdir: str, stop: signals.GracefulStop, ckpt: checkpoints.Checkpointer) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    t = config.train
    run = prepare(config, ckpt, progress=is_main)
    plan, sh, state = run.plan, run.state.sh, run.state
    trainable, opt_state, frozen = state.trainable, state.opt_state, state.frozen
    progress = Progress.resumed(state.saved)
    report = Reporter(config, workdir, run, is_main)
    report.metrics_log.truncate_after(progress.step)  # equal to an uninterrupted run's log up to here
    pending, val_losses, interrupted = PendingMetrics(), [], None
    batches = pipeline.on_devices(plan.train_batches(progress.step), sh.train_batch)
    try:
        for step in range(progress.step, plan.total_steps):
            epoch, batch_in_epoch = divmod(step, plan.steps_per_epoch)
            report.step_starts(step, epoch, batch_in_epoch)
            trainable, opt_state, metrics = run.train_step(trainable, opt_state, frozen, next(batches),
                                                           jnp.int32(step), run.root_key)
            progress.step = done = step + 1
            report.step_ends(done, trainable)
            pending.add(done, epoch, batch_in_epoch + 1, metrics, report.speed.tick())  # stays on the device
            epoch_end, last = done % plan.steps_per_epoch == 0, done == plan.total_steps
            due = done % t.log_every == 0 or done % t.checkpoint_every == 0 or epoch_end or last
            if due:
                report.drain(pending, progress, ckpt)  # the host waits for the device here, not every step
            # one process: the signal flag is a read; several: an all-gather, so at the pull points only.
            # After the drain: a signal that came while the host waited stops at this step.
            interrupted = (due or jax.process_count() == 1) and stop.agreed() or None
            if interrupted and not due:
                report.drain(pending, progress, ckpt)
            if epoch_end:  # validation, best and latest checkpoints, images (a signal waits for them)
                val_losses.append(_end_of_epoch(run, report, progress, ckpt, trainable, opt_state, frozen))
                interrupted = None if last else stop.agreed()  # a signal in the last validation: nothing left
            elif interrupted or last or done % t.checkpoint_every == 0:
                ckpt.save_latest(done, trainable, opt_state, run.meta(progress))
            if interrupted:
                break
        ckpt.wait()
    finally:
        getattr(batches, "close", lambda: None)()  # stops the input threads
        report.close()
    epoch, batch_in_epoch = divmod(progress.step, plan.steps_per_epoch)
    if interrupted:
        where = f"epoch {epoch + 1}, batch {batch_in_epoch}/{plan.steps_per_epoch}" if batch_in_epoch else \
            f"end of epoch {epoch}"
        log.warning("interrupted at step %d (%s); saved checkpoint %d — rerun the same command to resume",
                    progress.step, where, progress.step)
    return {"step": progress.step, "epoch": epoch, "best_val_loss": progress.best_val_loss,
            "val_losses": val_losses, "trainable": trainable, "interrupted": interrupted}


def _end_of_epoch(run: "Prepared", report: "Reporter", progress: "Progress", ckpt: checkpoints.Checkpointer,
                  trainable: Any, opt_state: Any, frozen: Any) -> float:
    """Validation loss, the epoch's log line and plot, `best` (when it improved) and `latest`
    checkpoints, then validation images (after the saves: a kill there loses no training) → val loss."""
    step = progress.step
    epoch = step // run.plan.steps_per_epoch
    val_loss = run.evaluate(trainable, frozen)
    train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_n, 1)
    progress.epoch_loss_sum, progress.epoch_loss_n = 0.0, 0
    report.metrics_log.write(kind="epoch", epoch=epoch, step=step, train_loss=train_loss, val_loss=val_loss,
                             lr=float(run.schedule(step)))
    report.metrics_log.plot()
    report.tb.scalars(step, {"epoch/train_loss": train_loss, "epoch/val_loss": val_loss, "epoch/epoch": epoch})
    log.info("epoch %d: train loss %.5f, validation loss %.5f", epoch, train_loss, val_loss)
    if val_loss < progress.best_val_loss:
        progress.best_val_loss = val_loss
        ckpt.save_best(step, trainable, {**run.meta(progress), "val_loss": val_loss})
    ckpt.save_latest(step, trainable, opt_state, run.meta(progress))
    if report.validation_images.due(epoch):
        report.validation_images.write(epoch, step, tree_lib.merge_params(trainable, frozen), report.tb)
    report.speed.exclude_since_last()  # the next step time leaves out validation and its images
    return val_loss


@dataclasses.dataclass
class Progress:
    """What the loop accumulates and a checkpoint carries: steps done, best validation loss, the
    current epoch's training-loss sum and count."""
    step: int = 0
    best_val_loss: float = math.inf
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0

    @classmethod
    def resumed(cls, saved: Mapping | None) -> "Progress":
        if saved is None:
            return cls()
        log.info("resumed from step %d (epoch %d, batch %d)", saved["step"], saved["epoch"], saved["batch_in_epoch"])
        return cls(int(saved["step"]), float(saved["best_val_loss"]), float(saved["epoch_loss_sum"]),
                   int(saved["epoch_loss_n"]))


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """How the run walks its dataset: steps per epoch, the step count, which rows of each global batch
    this process loads, and the pipeline options."""
    config: Any
    steps_per_epoch: int
    total_steps: int  # min(train.max_steps, epochs · steps_per_epoch)
    examples_per_step: int
    val_batch: int  # padded + masked, the loss summed in groups of train.val_batch_size
    train_rows: np.ndarray
    val_rows: np.ndarray
    label_names: list[str]
    options: dict  # pipeline.batches keywords: builder config, bgr, prefetch, feature store

    def train_batches(self, first_step: int) -> Iterator[dict]:
        """This process's micro-batched training batches [accum, B/processes, ...] of global steps
        first_step … total_steps - 1, epoch after epoch (each epoch in its own shuffled order)."""
        t, d = self.config.train, self.config.data
        spe = self.steps_per_epoch
        for epoch in range(first_step // spe, -(-self.total_steps // spe)):
            start = max(first_step - epoch * spe, 0)
            count = min(spe, self.total_steps - epoch * spe) - start
            host = pipeline.batches(d.data_dir, "train", global_batch_size=self.examples_per_step, seed=d.seed,
                                    epoch=epoch, start_batch=start, rows=self.train_rows,
                                    micro_batches=t.grad_accum, **self.options)
            try:
                for _, b in zip(range(count), host):
                    yield {k: v.reshape(t.grad_accum, -1, *v.shape[1:]) for k, v in b.items()}
            finally:
                getattr(host, "close", lambda: None)()  # stop its prefetch thread

    def validation_batches(self) -> Iterator[dict]:
        d = self.config.data
        return pipeline.batches(d.data_dir, "validation", global_batch_size=self.val_batch, seed=d.seed, epoch=0,
                                shuffle=False, drop_remainder=False, rows=self.val_rows, **self.options)


def plan_data(config, mesh) -> DataPlan:
    """The DataPlan of `config` on `mesh` (the dataset checked against the config's shapes; no feature
    store yet)."""
    t, d = config.train, config.data
    shards = sharding.num_batch_shards(mesh)
    if t.batch_size % shards:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the {shards} devices of the "
                         f"mesh (set --config.mesh.data / --config.mesh.fsdp)")
    dataset = _check_dataset(config)
    builder_config = dataset.path.parent.name
    num_train = pipeline.num_examples(d.data_dir, "train", builder_config)
    num_val = pipeline.num_examples(d.data_dir, "validation", builder_config)
    examples_per_step = t.batch_size * t.grad_accum
    steps_per_epoch = pipeline.num_batches(num_train, examples_per_step)
    if steps_per_epoch == 0:
        raise ValueError(f"{num_train} training examples give no full batch of {examples_per_step}")
    log.info("%d train / %d validation examples, %d steps per epoch", num_train, num_val, steps_per_epoch)
    total = t.epochs * steps_per_epoch if t.max_steps < 0 else min(t.max_steps, t.epochs * steps_per_epoch)
    val_batch = math.lcm(t.val_batch_size, shards)
    batch_sh, eval_sh = sharding.batch_sharding(mesh, leading=1), sharding.batch_sharding(mesh)
    return DataPlan(config, steps_per_epoch, total, examples_per_step, val_batch,
                    sharding.process_rows(batch_sh, (t.grad_accum, t.batch_size), axis=1),
                    sharding.process_rows(eval_sh, (val_batch,)), list(dataset.label_names),
                    dict(config_name=builder_config, bgr=d.bgr, prefetch=d.prefetch))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything the loop runs with: the data plan, the system, the state as created or restored, the
    learning-rate schedule, the compiled training step and the validation pass."""
    config: Any
    plan: DataPlan
    system: system_lib.System
    mesh: Any
    state: "TrainState"
    schedule: optax.Schedule
    train_step: jax.stages.Compiled
    eval_step: Callable
    root_key: jax.Array
    eval_key: jax.Array

    def evaluate(self, trainable: Any, frozen: Any) -> float:
        """Mean validation loss (the same noise every epoch)."""
        total, count = jnp.zeros(()), jnp.zeros(())
        for i, host_batch in enumerate(self.plan.validation_batches()):
            batch = pipeline.to_global(host_batch, self.state.sh.eval_batch)
            s, n = self.eval_step(trainable, frozen, batch, jnp.uint32(i * self.plan.val_batch), self.eval_key)
            total, count = total + s, count + n
        return float(total / jnp.maximum(count, 1.0))

    def meta(self, progress: Progress) -> dict:
        """A checkpoint's meta at `progress`."""
        epoch, batch_in_epoch = divmod(progress.step, self.plan.steps_per_epoch)
        return {"step": progress.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "best_val_loss": progress.best_val_loss, "epoch_loss_sum": progress.epoch_loss_sum,
                "epoch_loss_n": progress.epoch_loss_n, "trainable_paths": self.state.paths,
                "examples_per_step": self.plan.examples_per_step, "seed": self.config.seed}


def prepare(config, ckpt: checkpoints.Checkpointer | None = None, progress: bool = True) -> Prepared:
    """Mesh → data plan → models (feature cache built or checked when it applies) → state (restored
    from `ckpt` when it has a `latest`) → the compiled training step and the jitted validation step."""
    mesh = sharding.make_mesh(config.mesh)
    log.info("mesh %s over %d devices", dict(mesh.shape), sharding.num_batch_shards(mesh))
    plan = plan_data(config, mesh)
    system, params = system_lib.load_system(config, plan.label_names)
    feature_store = None
    off = feature_cache.disabled_reason(config, params)
    if off is None:
        feature_store = feature_cache.ensure(config, system, params, progress=progress)
        plan = dataclasses.replace(plan, options={**plan.options, "features": feature_store})
        log.info("feature cache %s: the step starts at the embedder", feature_store.path)
    elif config.data.feature_cache:
        log.info("feature cache not used: %s", off)
    schedule = learning_rate(config.train, plan.steps_per_epoch)
    optimizer = make_optimizer(config.train, schedule)
    if ckpt is not None and ckpt.has_latest():  # the checkpoint replaces the loaded trainable values
        trainable, frozen = tree_lib.split_params(params, config.train.trainable)
        params = tree_lib.merge_params(jax.eval_shape(lambda x: x, trainable), frozen)
        del trainable, frozen
    state = create_state(config, params, mesh, optimizer, ckpt)
    del params
    environment.release_free_host_memory()  # what loading left behind
    started = time.perf_counter()
    train_step = compile_train_step(system, optimizer, schedule, state.sh, state.trainable, state.opt_state,
                                    state.frozen, feature_store)
    log.info("train step compiled in %.1f s", time.perf_counter() - started)
    environment.release_free_host_memory()  # what the compiler left behind
    sh = state.sh
    eval_step = jax.jit(make_eval_step(lambda *a: system_eval_loss(system, *a)),
                        in_shardings=(sh.trainable, sh.frozen, sh.eval_batch, sh.replicated, sh.replicated),
                        out_shardings=(sh.replicated, sh.replicated))
    root_key = sharding.put(jax.random.key(config.seed), sh.replicated)
    eval_key = sharding.put(jax.random.fold_in(jax.random.key(config.seed), EVAL_SEED), sh.replicated)
    return Prepared(config, plan, system, mesh, state, schedule, train_step, eval_step, root_key, eval_key)


class Reporter:
    """The run's outputs besides checkpoints: metrics.jsonl + loss.png, TensorBoard, the progress bar
    (one per epoch), throughput, validation images and the profiler window."""

    def __init__(self, config, workdir: str, run: Prepared, is_main: bool):
        t = config.train
        self.config, self.plan, self.is_main = config, run.plan, is_main
        self.metrics_log = MetricsLog(workdir, enabled=is_main and "jsonl" in t.report_to)
        self.tb = monitor.TensorBoard(workdir, enabled=is_main and "tensorboard" in t.report_to)
        self.validation_images = monitor.ValidationImages(config, run.system, run.mesh, workdir, enabled=is_main)
        self.profile = monitor.Profile(workdir, tuple(t.profile_steps), enabled=is_main)
        self.speed = monitor.Throughput(run.plan.examples_per_step, monitor.compiled_flops(run.train_step))
        self.bar = None

    def step_starts(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        if self.bar is None or batch_in_epoch == 0:
            self.close_bar()
            self.bar = _progress(self.plan.steps_per_epoch, batch_in_epoch, self.plan.examples_per_step,
                                 f"epoch {epoch + 1}/{self.config.train.epochs}", self.is_main)
        self.profile.before(step)

    def step_ends(self, done: int, outputs: Any) -> None:
        self.profile.after(done, outputs)
        self.bar.update(self.plan.examples_per_step)

    def drain(self, pending: PendingMetrics, progress: Progress, ckpt: checkpoints.Checkpointer) -> None:
        """Pull the steps' metrics since the last pull (one transfer): NaN guard (the first bad step of the
        interval), epoch loss, metrics.jsonl / TensorBoard lines of the log steps, progress bar."""
        t, spe = self.config.train, self.plan.steps_per_epoch
        for done, at_epoch, at_batch, m, perf in pending.pull():
            loss = m["loss"]
            if not math.isfinite(loss):
                ckpt.wait()
                raise FloatingPointError(
                    f"non-finite training loss {loss} at step {done} (epoch {at_epoch + 1}, batch {at_batch}); "
                    f"last good checkpoint: {ckpt.latest_step()}")
            progress.epoch_loss_sum, progress.epoch_loss_n = progress.epoch_loss_sum + loss, progress.epoch_loss_n + 1
            if done % t.log_every == 0:
                terms = {k: m[k] for k in ("mse", "l1", "l2", "cosine", "grad_norm")}
                self.metrics_log.write(kind="step", epoch=at_epoch + at_batch / spe, step=done, train_loss=loss,
                                       val_loss=None, lr=m["lr"], **terms)
                self.tb.scalars(done, {"train/loss": loss, "train/lr": m["lr"],
                                       **{f"train/{k}": v for k, v in terms.items()}, **perf,
                                       **monitor.device_memory()})
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{m['lr']:.2e}",
                                 run_eta=self.speed.eta(self.plan.total_steps - done))

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        self.close_bar()
        self.profile.end()
        self.tb.close()


# ===================================================================================================
# The training state and the compiled step (also used at full size without weights: mtok_jax.memory)
# ===================================================================================================
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state on the mesh: what trains (float32 masters), Adam's state, the frozen weights (bf16
    when model.dtype is bfloat16), their shardings, the trainable paths, the restored checkpoint's meta
    (None for a fresh start). Arrays, or placed ShapeDtypeStructs when created from shapes."""
    sh: "StateShardings"
    trainable: Any
    opt_state: Any
    frozen: Any
    paths: list[str]
    saved: dict | None = None


def create_state(config, params: Mapping, mesh, optimizer: optax.GradientTransformation,
                 ckpt: checkpoints.Checkpointer | None = None) -> TrainState:
    """`params` split by train.trainable and placed on `mesh`, Adam's state initialised; or, when `ckpt`
    has a `latest` checkpoint, what trains and Adam's state restored from it (its trainable leaves may
    then be ShapeDtypeStructs, so that their loaded values are not held while it is read). All leaves
    ShapeDtypeStructs: a state of placed ShapeDtypeStructs, for compiling without weights."""
    t = config.train
    trainable, frozen = tree_lib.split_params(params, t.trainable)
    trainable = tree_lib.cast_floating(trainable, jnp.float32)
    if config.model.dtype == "bfloat16":  # fp32 master copy of what trains; frozen weights in bf16
        frozen = tree_lib.cast_floating(frozen, jnp.bfloat16)
    sh = state_shardings(mesh, trainable, frozen, optimizer, t.fsdp_min_size)
    paths = tree_lib.trainable_paths(tree_lib.merge_params(trainable, {}), t.trainable)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    log.info("trainable %r: %d parameters in %d leaves", t.trainable, n, len(jax.tree.leaves(trainable)))
    trainable_like = placed_like(trainable, sh.trainable)
    opt_like = placed_like(jax.eval_shape(optimizer.init, trainable), sh.opt_state)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        return TrainState(sh, trainable_like, opt_like, placed_like(frozen, sh.frozen), paths)
    frozen = sharding.put(frozen, sh.frozen)
    saved = None
    if ckpt is not None and ckpt.has_latest():
        del trainable
        trainable, opt_state, saved = ckpt.restore_latest(trainable_like, opt_like)
        opt_state = sharding.owned(opt_state)
    else:
        trainable = sharding.put(trainable, sh.trainable)
        opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(trainable)
    return TrainState(sh, sharding.owned(trainable), opt_state, frozen, paths, saved)  # trainable: donated


@dataclasses.dataclass(frozen=True)
class StateShardings:
    """NamedShardings of the training state and inputs on one mesh (trees match the params)."""
    trainable: Any
    frozen: Any
    opt_state: Any
    train_batch: NamedSharding  # [accum, B, ...]: B over every device
    eval_batch: NamedSharding  # [B, ...]
    replicated: NamedSharding


def state_shardings(mesh, trainable: Any, frozen: Any, optimizer: optax.GradientTransformation,
                    fsdp_min_size: int) -> StateShardings:
    """Leaves above `fsdp_min_size` elements split over the mesh's `fsdp` axis (mesh.fsdp = 1: all
    replicated); Adam moments follow their parameters. Trees of arrays or ShapeDtypeStructs."""
    trainable_sh = sharding.param_shardings(mesh, trainable, shard=True, min_size=fsdp_min_size)
    frozen_sh = sharding.param_shardings(mesh, frozen, shard=True, min_size=fsdp_min_size)
    repl = sharding.replicated(mesh)
    opt_sh = _like_params(jax.eval_shape(optimizer.init, trainable), trainable_sh, repl)
    return StateShardings(trainable_sh, frozen_sh, opt_sh, sharding.batch_sharding(mesh, leading=1),
                          sharding.batch_sharding(mesh), repl)


def abstract_train_batch(config, batch_sharding: NamedSharding,
                         feature_store: features_lib.FeatureStore | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one global training batch [accum, B, ...]: audio, image, label; with a feature cache
    its features and moments instead of audio and image."""
    t = config.train
    lead = (t.grad_accum, t.batch_size)
    per_example = (feature_store.batch_shapes() if feature_store is not None else
                   {"audio": ((config_utils.clip_samples(config),), jnp.float32),
                    "image": ((*config_utils.image_hw(config), 3), jnp.float32)})
    return {**{k: jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=batch_sharding)
               for k, (shape, dtype) in per_example.items()},
            "label": jax.ShapeDtypeStruct(lead, jnp.int32, sharding=batch_sharding)}


def compile_train_step(system: system_lib.System, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                       sh: StateShardings, trainable: Any, opt_state: Any, frozen: Any,
                       feature_store: features_lib.FeatureStore | None = None) -> jax.stages.Compiled:
    """The training step of `system.config`, jitted with `sh` (trainable and optimizer state donated)
    and compiled ahead of time for these trees (arrays or ShapeDtypeStructs) and batches of
    abstract_train_batch. Call it as
    step(trainable, opt_state, frozen, batch, jnp.int32(step), root_key) → (trainable, opt_state, metrics)."""
    config = system.config
    step = jax.jit(
        make_train_step(lambda *a: system_loss(system, *a), lambda *a: system_cosines(system, *a), optimizer,
                        schedule, config.train.faithful_accumulation,
                        system_loss_stages(system) if config.train.update_unet_first else None),
        in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.train_batch, sh.replicated, sh.replicated),
        out_shardings=(sh.trainable, sh.opt_state, sh.replicated), donate_argnums=(0, 1))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh.replicated)
    return step.lower(trainable, opt_state, frozen, abstract_train_batch(config, sh.train_batch, feature_store),
                      jax.ShapeDtypeStruct((), jnp.int32), key).compile()


def placed_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or shapes) with `shardings`: restore targets, and
    the arguments of compile_train_step without weights."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _like_params(opt_shapes: Any, param_sh: Any, default: NamedSharding) -> Any:
    """Optimizer-state shardings: leaves shaped like a parameter subtree (Adam moments) follow the
    parameters; scalars (counts) are replicated."""
    param_struct = jax.tree.structure(param_sh)

    def is_param_like(x):
        return jax.tree.structure(x) == param_struct if isinstance(x, Mapping) else False

    return jax.tree.map(lambda x: param_sh if is_param_like(x) else default, opt_shapes, is_leaf=is_param_like)


def _check_dataset(config) -> pipeline.Dataset:
    """The built dataset must hold what the config's shapes say (clip length, image size) and mix stereo
    as `data.stereo` says (datasets built before the option averaged the channels). → the dataset."""
    data_cfg = config.data
    ds = pipeline.open_configured(config)
    built = ds.config
    want_samples = config_utils.clip_samples(config)
    want_hw = config_utils.image_hw(config)
    got_hw = (int(built["image_height"]), int(built["image_width"]))
    if int(built["clip_samples"]) != want_samples or got_hw != want_hw:
        raise ValueError(f"dataset {ds.path} holds {built['clip_samples']} samples / {got_hw} images, the config "
                         f"asks for {want_samples} / {want_hw} (data.builder_config={data_cfg.builder_config!r}, "
                         f"clip_seconds, image_size, audio_44k_as_16k, reference_512x320)")
    got_stereo = built.get("stereo", "mean")
    if got_stereo != data_cfg.stereo:
        raise ValueError(f"dataset {ds.path} mixed stereo audio with {got_stereo!r}, the config asks for "
                         f"data.stereo={data_cfg.stereo!r}: rebuild with --stereo {data_cfg.stereo} or set "
                         f"data.stereo={got_stereo}")
    return ds
