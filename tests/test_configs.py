"""Every config validates and resolves all model shapes at full size (SD v1.4 + BEATs iter3+) with no
weights present; unknown keys are errors."""

import pathlib

import pytest

from mtok_jax import config_utils
from mtok_jax import system as system_lib

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__")
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_all_configs_listed():
    assert {"default", "exp1", "exp2", "prelim1", "prelim2", "demo"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_full_size_shapes(name):
    overrides = []
    if name == "demo":  # its 32 px images are below what the SD v1.4 UNet takes (3 downsamplings of h/8)
        overrides = ["data.image_size=64"]
    config = config_utils.load_config(CONFIG_DIR / f"{name}.py", overrides)
    out = system_lib.eval_shapes(config, full_size=True)
    b = config.train.batch_size
    n_layers = len(config.model.beats_layers)
    t = 8 * ((1 + (config_utils.clip_samples(config) - 400) // 160) // 16)  # BEATs tokens: 8·⌊F/16⌋
    assert out["beats_features"].shape == (b, t, n_layers * 768)
    assert out["audio_token"].shape == (b, 768)
    assert out["text_states"].shape == (b, 77, 768)
    h, w = config_utils.image_hw(config)
    assert out["latents"].shape == (b, 4, h // 8, w // 8)
    assert out["unet_out"].shape == out["latents"].shape
    counts = {k: sum(x.size for x in __import__("jax").tree.leaves(v)) for k, v in out["params"].items()}
    assert counts["unet"] == 859_520_964  # SD v1.4 UNet
    assert counts["embedder"] == (8_853_507 if n_layers == 3 else counts["embedder"])  # docs/design.md §2.3 at D = 768
    assert counts["text"] == 123_060_480  # CLIP ViT-L/14 text tower


def test_thesis_hyperparameters():
    load = lambda n: config_utils.load_config(CONFIG_DIR / f"{n}.py")  # noqa: E731
    e1, e2, p1, p2 = load("exp1"), load("exp2"), load("prelim1"), load("prelim2")
    assert (e1.train.trainable, e1.train.epochs, e1.train.lr, e1.train.schedule, e1.train.batch_size,
            e1.train.val_batch_size) == ("embedder", 25, 8e-5, "cosine", 8, 1)
    assert (e2.train.trainable, e2.train.epochs, e2.train.lr, e2.train.batch_size, e2.train.val_batch_size) == (
        "embedder|beats|unet", 50, 1e-5, 8, 8)
    assert (p1.train.epochs, p1.train.schedule, p1.train.batch_size, p1.train.grad_accum) == (8, "constant", 1, 4)
    assert (p2.train.epochs, p2.train.schedule, p2.train.lambda_l2) == (13, "cosine", 0.01)
    for c in (e1, e2, p1, p2):
        t = c.train
        assert (t.b1, t.b2, t.eps, t.weight_decay, t.scale_lr) == (0.9, 0.999, 1e-8, 1e-2, False)
        assert (t.lambda_l1, t.lambda_cl) == (0.01, 0.01)
        assert c.model.beats_train_mode is False and c.model.beats_layers == (3, 7, 11)


def test_overrides_and_unknown_keys():
    c = config_utils.load_config(CONFIG_DIR / "exp1.py", ["train.lr=1e-4", "model.beats_layers=(1, 2)",
                                                          "train.trainable=embedder|unet"])
    assert c.train.lr == 1e-4 and c.model.beats_layers == (1, 2) and c.train.trainable == "embedder|unet"
    with pytest.raises(ValueError, match="unknown config key train.learning_rate"):
        config_utils.load_config(CONFIG_DIR / "exp1.py", ["train.learning_rate=1e-4"])
    with pytest.raises(AttributeError):
        c.train.not_a_key = 1  # locked
    with pytest.raises(ValueError, match="schedule"):
        config_utils.load_config(CONFIG_DIR / "exp1.py", ["train.schedule=linear"])
    with pytest.raises(ValueError, match="placeholder"):
        config_utils.load_config(CONFIG_DIR / "exp1.py", ["prompt.train=an art image"])
    with pytest.raises(ValueError, match="matches none"):
        config_utils.load_config(CONFIG_DIR / "exp1.py", ["train.trainable=decoder"])


def test_image_size_must_fit_the_unet():
    config = config_utils.load_config(CONFIG_DIR / "exp1.py", ["data.image_size=32"])
    with pytest.raises(ValueError, match="image"):
        system_lib.eval_shapes(config, full_size=True)


def test_bf16_shapes_resolve():
    config = config_utils.load_config(CONFIG_DIR / "exp2.py", ["model.dtype=bfloat16", "train.batch_size=1"])
    out = system_lib.eval_shapes(config, full_size=True)
    assert out["audio_token"].dtype == "float32" and out["text_states"].shape == (1, 77, 768)
    leaves = __import__("jax").tree.leaves(out["params"])
    assert all(x.dtype == "float32" for x in leaves)  # master params stay float32


def test_sharding_rules():
    from jax.sharding import PartitionSpec as P

    from mtok_jax import sharding
    from mtok_jax import tree as tree_lib

    assert sharding.fsdp_spec((2304, 768), 2, 100) == P("fsdp", None)  # largest divisible axis
    assert sharding.fsdp_spec((3, 3, 320, 640), 4, 100) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((7, 5), 2, 1) == P()  # nothing divisible → replicated
    assert sharding.fsdp_spec((4096,), 2, 2 ** 22) == P()  # small → replicated
    params = {"unet": {"k": 1}, "unet_extra": {"k": 2}, "embedder": {"fc1": {"kernel": 3}}, "text": {"t": 4}}
    trainable, frozen = tree_lib.split_params(params, "embedder|unet")
    assert trainable == {"unet": {"k": 1}, "embedder": {"fc1": {"kernel": 3}}}
    assert frozen == {"unet_extra": {"k": 2}, "text": {"t": 4}}
    assert tree_lib.merge_params(trainable, frozen) == params
    assert tree_lib.trainable_paths(params, "unet/.*") == ["unet/k"]
    with pytest.raises(ValueError, match="selects no parameter"):
        tree_lib.split_params(params, "vae")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError):
        sharding.make_mesh({"data": 3, "fsdp": 3})
