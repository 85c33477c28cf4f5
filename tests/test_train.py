"""The training spine on the real code path with the tiny demo models (written once per session).

Step-level checks use synthetic in-memory batches: a sharded step on a 4×2 mesh equals the 1-device
step; exp2 changes UNet and BEATs; exp1 leaves every frozen leaf bit-identical; accumulation of 4
micro-batches of 1 equals one batch of 4. Loop-level checks run `train_and_evaluate` on a tiny
dataset built by the real TFDS builder: stop + resume is bit-identical to an uninterrupted run, and
the NaN guard names the step.
"""

import dataclasses
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtok_jax import checkpoints, config_utils, sharding, train
from mtok_jax import tree as tree_lib
from mtok_jax import system as system_lib
from mtok_jax.data import pipeline, sources

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
LABELS = sources.DEFAULT_LABELS[:3]
CLIP_SECONDS = 1.0


@pytest.fixture(scope="module")
def assets(tiny_assets):
    """Tiny demo models + the 3-label, 1 s dataset (conftest.tiny_assets)."""
    return tiny_assets


def demo_config(assets, *overrides):
    return config_utils.load_config(CONFIGS / "demo.py", [
        f"model.sd_path={assets['sd']}", f"model.beats_path={assets['beats']}", f"data.data_dir={assets['data']}",
        "data.builder_config=tiny", f"data.clip_seconds={CLIP_SECONDS}", *overrides])


@pytest.fixture(scope="module")
def loaded(assets):
    config = demo_config(assets, "train.lr=1e-3")
    system, params = system_lib.load_system(config, LABELS)
    assert system.labels == LABELS
    return system, params


def synthetic_batch(accum: int, micro: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = accum * micro
    batch = {"audio": (0.3 * rng.standard_normal((n, int(CLIP_SECONDS * 16000)))).astype(np.float32),
             "image": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, len(LABELS), n).astype(np.int32)}
    return {k: v.reshape(accum, micro, *v.shape[1:]) for k, v in batch.items()}


def run_step(system, params, pattern: str, mesh, batch, fsdp_min_size: int = 2 ** 30, eps: float = 1e-8,
             lr: float = 1e-3, remat: bool = False):
    """One train step as train_and_evaluate builds it (train.create_state + train.compile_train_step)
    on `batch` [accum, B, ...] → (new full params, metrics). lr is pinned (not the demo config's) and
    there is no warm-up (the first step moves every trainable leaf), because the tolerances below are
    fractions of one Adam step."""
    config = system.config.copy_and_resolve_references()
    t = config.train
    t.eps, t.lr, t.warmup_steps, t.trainable, t.remat = eps, lr, 0, pattern, remat
    t.grad_accum, t.batch_size = batch["label"].shape
    t.fsdp_min_size = fsdp_min_size
    system = dataclasses.replace(system, config=config, beats=system.beats.clone(remat=remat))
    schedule = train.learning_rate(t, 10)
    optimizer = train.make_optimizer(t, schedule)
    state = train.create_state(config, params, mesh, optimizer)
    sh, trainable, opt_state, frozen = state.sh, state.trainable, state.opt_state, state.frozen
    step = train.compile_train_step(system, optimizer, schedule, sh, trainable, opt_state, frozen)
    batch = pipeline.to_global(batch, sh.train_batch)
    new, _, metrics = step(trainable, opt_state, frozen, batch, jnp.int32(0),
                           sharding.put(jax.random.key(7), sh.replicated))
    if fsdp_min_size < 2 ** 30:  # the big leaves really were split over fsdp
        specs = [s.spec for s in jax.tree.leaves(sh.trainable)]
        assert mesh.shape["fsdp"] == 1 or any("fsdp" in tuple(s) for s in specs)
    return tree_lib.merge_params(jax.device_get(new), jax.device_get(frozen)), jax.device_get(metrics)


def flat(tree):
    return tree_lib.flatten(tree)


EXP2 = "embedder|beats|unet"


# Adam's first update is lr·g/(|g| + eps), whose slope in g is up to lr/eps: float round-off of a gradient
# summed in another order (sharded vs single device) is amplified by that much for the few elements whose
# |g| is near eps (with lr = 1e-3, eps = 1e-6 and the (128, 128) demo UNet: one element in 16k off by
# 1.2e-5). The parameter comparison therefore uses eps = 1e-4 (amplification ≤ 10); a sharding bug changes
# gradients, hence updates, by far more than 1e-5.
SHARD_TEST = dict(eps=1e-4)


@pytest.fixture(scope="module")
def exp2_single(loaded):
    system, params = loaded
    return run_step(system, params, EXP2, sharding.make_mesh({"data": 1, "fsdp": 1}), synthetic_batch(1, 8),
                    **SHARD_TEST)


def test_sharded_step_equals_single_device(loaded, exp2_single):
    system, params = loaded
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    sharded, metrics = run_step(system, params, EXP2, mesh, synthetic_batch(1, 8), fsdp_min_size=1024,
                                **SHARD_TEST)
    single, single_metrics = exp2_single
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-6)
    a, b = flat(sharded), flat(single)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-5, rtol=0, err_msg=k)


def test_exp2_changes_unet_beats_embedder_only(loaded, exp2_single):
    _, params = loaded
    new, _ = exp2_single
    before, after = flat(params), flat(new)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    for part in ("unet", "beats", "embedder"):
        assert any(k.startswith(part + "/") for k in changed), part
    assert not any(k.startswith(("text/", "vae/")) for k in changed)


def test_remat_equals_no_remat(loaded, exp2_single):
    """train.remat (UNet blocks and BEATs layers recomputed in the backward pass) gives exp2's step."""
    system, params = loaded
    remat, metrics = run_step(system, params, EXP2, sharding.make_mesh({"data": 1, "fsdp": 1}),
                              synthetic_batch(1, 8), remat=True, **SHARD_TEST)
    plain, plain_metrics = exp2_single
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
    a, b = flat(remat), flat(plain)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-5, rtol=0, err_msg=k)


def test_remat_recomputes_in_the_backward_pass(loaded):
    """With train.remat the backward pass holds fewer temporaries (XLA's memory analysis of the same
    exp2 step at batch 8), so the switch really rematerialises."""
    system, params = loaded
    trainable, frozen = tree_lib.split_params(params, EXP2)
    batch = {k: jnp.asarray(v[0]) for k, v in synthetic_batch(1, 8).items()}
    keys = system_lib.example_keys(jax.random.key(0), 8)

    def temp_bytes(remat: bool) -> int:
        config = system.config.copy_and_resolve_references()
        config.train.remat = remat
        s = dataclasses.replace(system, config=config, beats=system.beats.clone(remat=remat))
        grad = jax.jit(jax.grad(lambda tr: train.system_loss(s, tr, frozen, batch, keys)[0]))
        return grad.lower(trainable).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < 0.8 * temp_bytes(False)


def _exp2_step(system, params, stages: bool):
    """exp2's compiled step on one device, with or without train.update_unet_first → (step, args)."""
    config = system.config.copy_and_resolve_references()
    config.train.trainable, config.train.update_unet_first = EXP2, stages
    config.train.grad_accum, config.train.batch_size = 1, 8
    system = dataclasses.replace(system, config=config)
    schedule = train.learning_rate(config.train, 10)
    optimizer = train.make_optimizer(config.train, schedule)
    state = train.create_state(config, params, sharding.make_mesh({"data": 1, "fsdp": 1}), optimizer)
    step = train.compile_train_step(system, optimizer, schedule, state.sh, state.trainable, state.opt_state,
                                    state.frozen)
    batch = pipeline.to_global(synthetic_batch(1, 8), state.sh.train_batch)
    key = sharding.put(jax.random.key(7), state.sh.replicated)
    return step, (state.trainable, state.opt_state, state.frozen, batch, jnp.int32(3), key)


def test_unet_update_before_the_audio_backward_pass(loaded):
    """train.update_unet_first: exp2's staged step (the UNet updated before the audio branch's backward
    pass, so the UNet's gradients are freed before it) gives the one-pass step's loss, gradient norm,
    new params and optimizer state. (What it saves is measured at full size: README "Memory per device".)"""
    system, params = loaded
    (staged, args_a), (plain, args_b) = _exp2_step(system, params, True), _exp2_step(system, params, False)
    (new_a, opt_a, m_a), (new_b, opt_b, m_b) = staged(*args_a), plain(*args_b)  # (each donates its state)
    for k in ("loss", "grad_norm", "mse", "cosine"):
        np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=1e-6, err_msg=k)
    assert jax.tree.structure(opt_a) == jax.tree.structure(opt_b)
    for a, b in zip(jax.tree.leaves((new_a, opt_a)), jax.tree.leaves((new_b, opt_b))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_accumulation_equals_big_batch_and_exp1_freezes(loaded):
    """4 micro-batches of 1 give the update of one batch of 4 (cosine term included); exp1 changes
    the embedder and leaves every other leaf bit-identical."""
    system, params = loaded
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
    big = synthetic_batch(1, 4, seed=3)
    micro = {k: v.reshape(4, 1, *v.shape[2:]) for k, v in big.items()}
    new_big, m_big = run_step(system, params, "embedder", mesh, big, **SHARD_TEST)
    new_acc, m_acc = run_step(system, params, "embedder", mesh, micro, **SHARD_TEST)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_acc["cosine"], m_big["cosine"], rtol=1e-5)
    # The first Adam update is lr·g/(|g| + eps) per element: for gradients near eps, float32 rounding of
    # the (differently summed) gradient moves it by a fraction of lr. Allow 0.5 % of one lr step.
    atol = 5e-3 * 1e-3  # run_step's lr
    a, b = flat(new_acc), flat(new_big)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=atol, rtol=0, err_msg=k)
    before = flat(params)
    for k, v in before.items():
        same = np.array_equal(np.asarray(v), np.asarray(b[k]))
        assert same != k.startswith("embedder/"), k


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
# 6 train clips (3 steps of 2 per epoch), 3 validation clips (batches of 2, the second padded + masked).
LOOP = ("train.trainable=embedder", "train.epochs=2", "train.batch_size=2", "train.val_batch_size=1",
        "train.log_every=1",
        "train.checkpoint_every=100", "mesh.data=2", "mesh.fsdp=1", "train.sample_every_epochs=0")


def test_resume_is_bit_identical(assets, tmp_path, caplog):
    full = train.train_and_evaluate(demo_config(assets, *LOOP), str(tmp_path / "full"))
    steps_per_epoch = pipeline.num_batches(pipeline.num_examples(assets["data"], "train", "tiny"), 2)
    assert steps_per_epoch == 3 and pipeline.num_examples(assets["data"], "validation", "tiny") == 3
    assert full["step"] == 2 * steps_per_epoch and len(full["val_losses"]) == 2
    k = steps_per_epoch + 1  # stop in the middle of the second epoch, after a validation
    part = train.train_and_evaluate(demo_config(assets, *LOOP, f"train.max_steps={k}"), str(tmp_path / "resumed"))
    assert part["step"] == k and part["epoch"] == 1
    resumed = train.train_and_evaluate(demo_config(assets, *LOOP), str(tmp_path / "resumed"))
    assert resumed["step"] == full["step"] and resumed["val_losses"] == full["val_losses"][1:]
    a, b = flat(resumed["trainable"]), flat(full["trainable"])
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key

    def lines(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert lines("resumed") == lines("full")
    epochs = [r for r in lines("full") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_loss"] is not None for r in epochs)
    assert {"epoch", "step", "train_loss", "val_loss", "lr"} <= set(epochs[0])
    assert (tmp_path / "full" / "loss.png").stat().st_size > 1000

    # The best checkpoint restores into the full params (the contract sample.py uses).
    _, params = system_lib.load_system(demo_config(assets, *LOOP), LABELS)
    best_step = 2 * steps_per_epoch if full["val_losses"][1] < full["val_losses"][0] else steps_per_epoch
    restored = checkpoints.restore_trained(str(tmp_path / "full"), params, "best")
    latest = checkpoints.restore_trained(str(tmp_path / "full"), params, "latest")
    assert np.array_equal(np.asarray(latest["embedder"]["fc1"]["kernel"]),
                          np.asarray(full["trainable"]["embedder"]["fc1"]["kernel"]))
    assert np.array_equal(np.asarray(restored["unet"]["conv_in"]["kernel"]),
                          np.asarray(params["unet"]["conv_in"]["kernel"]))  # frozen: from the model folder
    assert checkpoints.restore_trained(str(tmp_path / "full"), params, best_step) is not None

    # Damaged files are found before sampling: a flipped byte in `best` is a one-line error; in the newest
    # `latest` the older kept step is used, with a warning.
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "full", damaged)
    ckpts = damaged / "checkpoints"
    for which in ("best", "latest"):
        step_dir = ckpts / which / str(max(int(p.name) for p in (ckpts / which).iterdir() if p.name.isdigit()))
        data = max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
        flipped = bytearray(data.read_bytes())
        flipped[len(flipped) // 2] ^= 0x10
        data.write_bytes(bytes(flipped))
    with pytest.raises(checkpoints.CheckpointError, match=r"best/\d+: .*checksum.*--checkpoint"):
        checkpoints.restore_trained(str(damaged), params, "best")
    with caplog.at_level(logging.WARNING, logger="mtok_jax"):
        older = checkpoints.restore_trained(str(damaged), params, "latest")
    assert f"using latest/{steps_per_epoch}" in caplog.text
    assert not np.array_equal(np.asarray(older["embedder"]["fc1"]["kernel"]),
                              np.asarray(full["trainable"]["embedder"]["fc1"]["kernel"]))


def test_nan_guard_names_the_step(assets, tmp_path, monkeypatch):
    real_batches = pipeline.batches

    def poisoned(*args, **kwargs):
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if args[1] == "train" and i == 1:  # the second training batch: step 2
                key = "features" if "features" in batch else "audio"  # (the feature cache's batches)
                batch = {**batch, key: np.full_like(batch[key], np.nan)}
            yield batch

    monkeypatch.setattr(pipeline, "batches", poisoned)
    pulled = []
    real_pull = train.PendingMetrics.pull
    monkeypatch.setattr(train.PendingMetrics, "pull", lambda self: pulled.append(len(self._items)) or real_pull(self))
    # metrics stay on the device between log steps: steps 1-3 are pulled together, and the guard names the
    # first bad one of them (step 3's loss is NaN too: the weights are after step 2)
    with pytest.raises(FloatingPointError, match="at step 2 "):
        train.train_and_evaluate(demo_config(assets, *LOOP, "train.max_steps=3", "train.log_every=10"),
                                 str(tmp_path / "nan"))
    assert pulled == [3]


def test_max_steps_zero_trains_nothing(assets, tmp_path):
    """train.max_steps=0 stops before the first step (it used to run every epoch): no step, no
    validation, no checkpoint; config.json is written."""
    out = train.train_and_evaluate(demo_config(assets, *LOOP, "train.max_steps=0"), str(tmp_path / "zero"))
    assert (out["step"], out["epoch"], out["val_losses"]) == (0, 0, [])
    assert json.loads((tmp_path / "zero" / "config.json").read_text())["train"]["max_steps"] == 0
    metrics = tmp_path / "zero" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
    assert not [p for p in (tmp_path / "zero").rglob("*") if p.is_dir() and p.name.isdigit()]  # no step saved


def test_dataset_stereo_mismatch_refused(assets):
    """The built dataset records its stereo mixing (builder default 'first'); a config asking for another
    is refused before training, like the shape checks."""
    meta = pipeline.open_dataset(assets["data"], "tiny").config
    assert meta["stereo"] == "first"
    train._check_dataset(demo_config(assets))
    with pytest.raises(ValueError, match="data.stereo='mean'.*--stereo mean"):
        train._check_dataset(demo_config(assets, "data.stereo=mean"))


def read_events(directory: pathlib.Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """TensorBoard event files of a folder, read back record by record (length + masked CRC32C framing,
    both checked) → ({scalar tag: [(step, value)]}, {image tag: [step]})."""
    import struct

    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    scalars, images = {}, {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            assert struct.unpack("I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            (n,) = struct.unpack("Q", header)
            body = data[pos + 12:pos + 12 + n]
            assert struct.unpack("I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(body)
            pos += 16 + n
            event = event_pb2.Event.FromString(body)
            for v in event.summary.value:
                if v.HasField("image"):
                    assert v.image.encoded_image_string[:4] == b"\x89PNG"
                    images.setdefault(v.tag, []).append(event.step)
                else:
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars, images


def test_tensorboard_validation_images_and_profile(assets, tmp_path):
    """TensorBoard scalars + one validation grid per epoch, a profile of steps 1–3; params and
    metrics.jsonl bit-identical to a run with neither (watching never changes training)."""
    watched = train.train_and_evaluate(demo_config(
        assets, *LOOP, "train.sample_every_epochs=1", "train.sample_steps=2", "train.profile_steps=(1, 3)"),
        str(tmp_path / "watched"))
    plain = train.train_and_evaluate(demo_config(assets, *LOOP, "train.report_to=('jsonl',)"), str(tmp_path / "plain"))
    a, b = flat(watched["trainable"]), flat(plain["trainable"])
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    assert (tmp_path / "watched" / "metrics.jsonl").read_bytes() == (tmp_path / "plain" / "metrics.jsonl").read_bytes()
    assert not (tmp_path / "plain" / "tensorboard").exists() and not (tmp_path / "plain" / "samples").exists()
    assert not (tmp_path / "plain" / "profile").exists()

    scalars, images = read_events(tmp_path / "watched" / "tensorboard")
    steps = list(range(1, 7))  # log_every=1, 2 epochs × 3 steps
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/mse", "perf/step_seconds",
                "perf/examples_per_second", "perf/flops_per_second"):
        assert [s for s, _ in scalars[tag]] == steps, tag
    losses = [json.loads(x)["train_loss"] for x in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "step"]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)
    assert all(v > 1e6 for _, v in scalars["perf/flops_per_second"])  # XLA's cost analysis counted the step
    assert [s for s, _ in scalars["epoch/val_loss"]] == [3, 6]
    np.testing.assert_allclose([v for _, v in scalars["epoch/val_loss"]], watched["val_losses"], rtol=1e-6)
    assert images == {"validation/images": [3, 6]}  # one grid per epoch
    from PIL import Image

    for k in (1, 2):
        grid = Image.open(tmp_path / "watched" / "samples" / f"epoch_{k}" / "grid.png")
        assert grid.width >= 2 * 128  # 3 labels (one held-out clip each) → a 2-column grid
    profile = [p for p in (tmp_path / "watched" / "profile").rglob("*") if p.is_file()]
    assert profile and any(p.name.endswith((".xplane.pb", ".trace.json.gz")) for p in profile), profile


def test_uncond_prob_replaces_the_prompt_states(loaded):
    """train.uncond_prob (CFG dropout): at 1 every example's UNet input is the empty prompt's states, so the
    prediction no longer depends on the audio; at 0 (default, as the reference) it does; validation
    (train=False) never drops."""
    system, params = loaded
    batch = {k: v[0] for k, v in synthetic_batch(1, 2).items()}
    other = {**batch, "audio": batch["audio"][::-1].copy()}
    keys = jax.random.split(jax.random.key(0), 2)
    trainable, frozen = tree_lib.split_params(params, "embedder")

    def pred(p_uncond, b, training=True):
        config = system.config.copy_and_resolve_references()
        config.train.uncond_prob = p_uncond
        s = dataclasses.replace(system, config=config)
        return np.asarray(train.system_outputs(s, trainable, frozen, b, keys, train=training)["pred"])

    np.testing.assert_array_equal(pred(1.0, batch), pred(1.0, other))
    assert not np.allclose(pred(0.0, batch), pred(0.0, other))
    assert not np.allclose(pred(1.0, batch, training=False), pred(1.0, other, training=False))
