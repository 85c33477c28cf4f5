"""mtok_jax.memory on the demo models (the full-size table is a measurement, README "Memory per device"):
its per-array bytes bound XLA's argument size, FSDP really splits the state over the devices, and
donation writes the new state into the old one."""

import pathlib

import jax
import numpy as np

from mtok_jax import config_utils, memory, sharding

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_memory_analysis_of_the_demo_exp2_step(tiny_assets):
    config = config_utils.load_config(CONFIGS / "demo.py", [
        f"model.sd_path={tiny_assets['sd']}", f"model.beats_path={tiny_assets['beats']}",
        f"data.data_dir={tiny_assets['data']}", "data.builder_config=tiny", "data.clip_seconds=1.0",
        "train.trainable=embedder|beats|unet", "train.batch_size=8", "train.fsdp_min_size=1000",
        "train.remat=True"])
    r = memory.measure(config, devices=8, full_size=False)
    held = r["trainable"] + r["frozen"] + r["opt_state"] + r["batch"]
    # XLA's arguments: all of the state, less the frozen weights the step never reads (VAE decoder, …)
    assert r["trainable"] + r["opt_state"] + r["batch"] < r["arguments"] <= held + 1024, r
    full = 4 * r["trainable_params"]
    assert r["trainable"] < full / 4, r  # most of it in leaves above 1000 elements, split 8 ways
    assert 1.9 * r["trainable"] < r["opt_state"] < 2.1 * r["trainable"], r  # Adam's two moments, sharded alike
    assert r["aliased"] >= r["trainable"] + r["opt_state"] - 1024, r  # donated: updated in place
    assert r["peak"] == held + r["outputs"] - r["aliased"] + r["temporaries"]
    assert "| demo | 8 | 1 |" in memory.markdown([r])


def test_placed_params_can_be_donated():
    """Weights read from files are read-only numpy arrays; placed with sharding.put they may wrap that
    memory (XLA:CPU, 64-byte aligned), which a donating step cannot reuse. After sharding.owned every
    output of a donating step lives in its inputs' memory (the step updates the state in place)."""
    n = 1 << 16
    data = np.ones(16 * (n + 1), np.float32).tobytes()
    # read-only arrays at 4-byte steps of alignment, as flax.serialization.msgpack_restore returns them
    leaves = [np.frombuffer(data, np.float32, count=n, offset=4 * i * (n + 1)) for i in range(16)]
    assert not leaves[0].flags.writeable
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = sharding.owned(sharding.put(leaves, [device] * len(leaves)))
    inputs = {x.unsafe_buffer_pointer() for x in tree}
    outputs = jax.jit(lambda xs: [2.0 * x for x in xs], donate_argnums=0)(tree)
    assert all(x.unsafe_buffer_pointer() in inputs for x in outputs)
