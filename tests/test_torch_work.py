"""The PyTorch side of the benchmark (mtok_jax.bench.torch_work) does the JAX side's work: the same weights,
the same token injection into CLIP, the same UNet, the same loss, the same frozen/trainable split."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import torch_or_skip
from mtok_jax import bench, losses
from mtok_jax import system as system_lib
from mtok_jax import train
from mtok_jax.data import pipeline
from mtok_jax.models import diffusion

torch = torch_or_skip()

from mtok_jax.bench import torch_work  # noqa: E402


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


@pytest.fixture(scope="module")
def twins(demo_models):
    root = os.path.dirname(demo_models["sd"])
    preset = bench.PRESETS["tiny"]
    config = bench.bench_config(preset, "exp1", bench.ensure_assets(preset, root))
    system, params = system_lib.load_system(config, pipeline.configured_labels(config))
    return config, system, params, torch_work.load(config)


def test_flax_to_pytorch_inverts_pytorch_to_flax(twins):
    _, _, params, ts = twins
    for part, model in (("unet", ts.unet), ("vae", ts.vae)):
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        back = flat(diffusion.pytorch_to_flax(state, params[part]))
        want = flat(params[part])
        assert back.keys() == want.keys() and all(np.array_equal(back[k], want[k]) for k in want), part
    with pytest.raises(ValueError, match="missing"):
        diffusion.flax_to_pytorch({"conv_in.weight": ts.unet.conv_in.weight.shape}, params["unet"])


def test_same_text_states_unet_and_loss(twins):
    _, system, params, ts = twins
    rng = np.random.default_rng(0)
    token = rng.normal(size=(2, system.token_dim)).astype(np.float32)
    want = system_lib.text_states(system, params, jnp.asarray(token), "train")
    with torch.no_grad():
        got = torch_work.text_states(ts, torch.from_numpy(token), "train").numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)

    inputs = bench.jax_work.unet_inputs(system, 2)
    want = system.unet.apply({"params": params["unet"]}, *inputs, train=False).sample
    x, t, s = (np.asarray(a) for a in inputs)
    with torch.no_grad():
        got = ts.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(s)).sample.numpy()
    assert np.abs(got - np.asarray(want)).max() <= 2e-3 * got.std()  # float32 across frameworks: test_export.py

    pred, target = rng.normal(size=(2, 2, 4, 4, 4)).astype(np.float32)
    tau = rng.normal(size=token.shape).astype(np.float32)
    want, _ = losses.total_loss(pred, target, token, tau, train.loss_weights(ts.config))
    got = torch_work.total_loss(ts, *(torch.from_numpy(a) for a in (pred, target, token, tau)))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_train_step_updates_only_the_trainable_parts(twins):
    config, *_ = twins
    ts = torch_work.load(config)  # its own copy: the step trains it
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in
              (("embedder", ts.embedder), ("unet", ts.unet), ("text", ts.text))}
    assert list(torch_work.trainable_parts(ts)) == ["embedder"]
    work = torch_work._train_work(ts, torch_work._tensors(ts, bench.jax_work.random_inputs(config, 2)), "cpu")
    work.call()
    changed = {name: any(not torch.equal(a, b) for a, b in zip(ps, m.parameters()))
               for (name, ps), m in zip(before.items(), (ts.embedder, ts.unet, ts.text))}
    assert changed == {"embedder": True, "unet": False, "text": False}
    assert all(p.grad is None for p in ts.embedder.parameters())  # zeroed for the next step
