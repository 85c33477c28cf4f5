"""mtok_jax.memory on the demo models (the full-size table is a measurement, README "Memory per device"):
its per-array bytes bound XLA's argument size, FSDP really splits the state over the devices, and
donation writes the new state into the old one."""

import pathlib

from mtok_jax import config_utils, memory

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
