"""Export of a trained run (mtok_jax.export), on the README's user path: the README's marked block
(train → sample → evaluate → export, tests/test_readme.py) run as written on a tiny exp2-like config
(embedder, UNet and BEATs trained, one epoch of 3 steps on the tiny dataset), then every exported output
loaded the way its users load it — `model.embedder_path`, torch.load of learned_embeds.bin, diffusers' PyTorch
`UNet2DConditionModel.from_pretrained`, `mtok_jax.convert beats` of BEATs.pt, `sample.py --model` — and
compared with the run's own checkpoint.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mtok_jax import checkpoints, cli, config_utils, convert, export, sample
from mtok_jax import system as system_lib
from mtok_jax.models import beats as beats_lib
from mtok_jax.models import diffusion
from mtok_jax.params_io import load_params
from conftest import torch_or_skip
from test_readme import run_readme_block

EXP2 = ("train.trainable=embedder|unet|beats", "train.lr=1e-3")


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


@pytest.fixture(scope="module")
def run(tiny_assets, metric_models, tmp_path_factory):
    """The README block's run (its export in RUN/model) → dict(config = RUN/config.json, workdir, out,
    params = the run's best full params, init = the untrained params)."""
    torch_or_skip()
    workdir = run_readme_block(tmp_path_factory.mktemp("readme"), tiny_assets, metric_models, *EXP2)
    config = config_utils.load_config(workdir / "config.json")
    _, init = system_lib.load_system(config, ())
    params = jax.device_get(checkpoints.restore_trained(workdir, init, "best"))
    return dict(config=config, workdir=str(workdir), out=str(workdir / "model"), params=params,
                init=jax.device_get(init))


def test_readme_path_uses_the_run_config(run, tiny_assets):
    """sample and evaluate got only --workdir: they ran on RUN/config.json (its model paths, its metrics)."""
    records = [json.loads(line) for line in open(os.path.join(run["workdir"], "samples", "samples.jsonl"))]
    assert records and records[0]["sd_path"] == tiny_assets["sd"]  # not configs/demo.py's demo_assets/sd
    report = json.load(open(os.path.join(run["workdir"], "eval", "report.json")))
    assert report["num_images"] == 3 and "GIILS needs at least 2 images" in report["metrics"]["giils_note"]


def test_layout_and_model_card(run):
    out = run["out"]
    for name in ("embedder/params.safetensors", "embedder/learned_embeds.bin", "embedder/learned_embeds.safetensors",
                 "unet/diffusion_pytorch_model.safetensors", "unet/config.json", "beats/params.safetensors",
                 "beats/BEATs.pt", "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                 "scheduler/scheduler_config.json", "config.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.path.islink(os.path.join(out, "vae")) and not os.path.islink(os.path.join(out, "unet"))
    model = json.load(open(os.path.join(out, "config.json")))["model"]
    assert (model["sd_path"], model["beats_path"], model["embedder_path"]) == (".", "beats", "embedder")
    card = open(os.path.join(out, "README.md")).read()
    assert "trained parts: beats, embedder, unet" in card and "6 train, 3 validation, 3 test" in card
    assert '"trainable": "embedder|unet|beats"' in card


def test_trained_parts_differ_from_init(run):
    """The run really moved every exported part (else the equalities below would prove nothing)."""
    for part in ("embedder", "unet", "beats"):
        a, b = flat(run["params"][part]), flat(run["init"][part])
        assert any(not np.array_equal(a[k], b[k]) for k in a), part


def check_embedder_token(out, run_config, params, init) -> None:
    """The exported embedder (+ exported BEATs) via model.embedder_path / model.beats_path → the trained
    run's audio token within 1e-6; the untrained embedder's differs (so the check can fail)."""
    config = export.load_model_config(out)
    assert config.model.embedder_path == os.path.join(out, "embedder")
    system, exported = system_lib.load_system(config, ())
    run_system, _ = system_lib.load_system(run_config, ())
    waves = jnp.asarray(0.3 * np.random.default_rng(0).standard_normal((2, 16000)), jnp.float32)
    key = jax.random.key(3)
    token = system_lib.audio_token(system, exported, waves, rng=key, train=False)
    want = system_lib.audio_token(run_system, params, waves, rng=key, train=False)
    untrained = system_lib.audio_token(run_system, init, waves, rng=key, train=False)
    np.testing.assert_allclose(np.asarray(token), np.asarray(want), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(untrained) - np.asarray(want)).max() > 1e-3


def test_embedder_path_gives_the_same_audio_token(run):
    check_embedder_token(run["out"], run["config"], run["params"], run["init"])


def test_learned_embeds_bin_round_trips(run, tmp_path):
    """learned_embeds.bin: torch.load(weights_only=True) gives AudioToken's key names; `convert embedder` of
    it (and the safetensors twin's tensors) give the trained params back exactly."""
    torch = torch_or_skip()
    from safetensors.numpy import load_file

    path = os.path.join(run["out"], "embedder", "learned_embeds.bin")
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "fga.reduce_potentials.0.weight" in state and state["fc1.weight"].shape[0] == state["fc1.weight"].shape[1]
    convert.main(["embedder", path, str(tmp_path / "back")])
    back, _ = load_params(tmp_path / "back")
    want = flat(run["params"]["embedder"])
    assert flat(back).keys() == want.keys()
    for k in want:
        assert np.array_equal(flat(back)[k], want[k]), k
    twin = load_file(os.path.join(run["out"], "embedder", "learned_embeds.safetensors"))
    assert twin.keys() == state.keys() and all(np.array_equal(twin[k], state[k].numpy()) for k in twin)


def check_unet_loads_in_pytorch(out, sd_path, unet_params) -> None:
    """unet/ loads with diffusers' PyTorch from_pretrained; its weights are the given ones (exactly, through
    the loader's PyTorch→Flax map) and one forward agrees with the Flax UNet."""
    torch = torch_or_skip()
    from diffusers import UNet2DConditionModel

    pt = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    back = flat(diffusion.pytorch_to_flax({k: v.numpy() for k, v in pt.state_dict().items()}, unet_params))
    want = flat(unet_params)
    assert back.keys() == want.keys() and all(np.array_equal(back[k], want[k]) for k in want)

    unet, _ = diffusion.load_unet(sd_path)
    rng = np.random.default_rng(1)
    lat = rng.standard_normal((1, unet.in_channels, 4, 4)).astype(np.float32)
    states = rng.standard_normal((1, 77, unet.cross_attention_dim)).astype(np.float32)
    t = np.array([500], np.int32)
    flax_out = unet.apply({"params": unet_params}, jnp.asarray(lat), jnp.asarray(t), jnp.asarray(states),
                          train=False).sample
    with torch.no_grad():
        pt_out = pt(torch.from_numpy(lat), torch.from_numpy(t), torch.from_numpy(states)).sample.numpy()
    # float32 Flax vs PyTorch, same weights: measured 0.7–1.1e-4 of the output's std at init and 4–6e-4
    # with weights ×3 (trained weights grow), for 64- and 128-channel demo UNets alike; a wrong weight
    # mapping is off by about the output's std itself
    err = np.abs(pt_out - np.asarray(flax_out)).max()
    assert err <= 2e-3 * pt_out.std(), (err, pt_out.std())


def test_unet_loads_in_diffusers_pytorch(run):
    check_unet_loads_in_pytorch(run["out"], run["config"].model.sd_path, run["params"]["unet"])


def test_beats_pt_round_trips_through_convert(run, tmp_path):
    """BEATs.pt has the official layout (cfg + model with weight-normed conv-pos); `convert beats` gives
    the trained params back (conv-pos within float32 rounding of the weight-norm recomposition)."""
    torch = torch_or_skip()
    path = os.path.join(run["out"], "beats", "BEATs.pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"cfg", "model"}
    assert {"encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"} <= set(ckpt["model"])
    convert.main(["beats", path, str(tmp_path / "beats")])
    _, back = beats_lib.load_beats(tmp_path / "beats")
    back, want = flat(back), flat(run["params"]["beats"])
    assert back.keys() == want.keys()
    for k in want:
        if k == "encoder/pos_conv/kernel":
            np.testing.assert_allclose(back[k], want[k], rtol=1e-6, atol=1e-8)
        else:
            assert np.array_equal(back[k], want[k]), k
    _, exported = beats_lib.load_beats(os.path.join(run["out"], "beats"))  # the converted-format twin
    assert all(np.array_equal(v, want[k]) for k, v in flat(exported).items())


def test_sample_from_model_folder_equals_workdir(run):
    """sample's --model path (load_model_config, no checkpoint) makes the same images as the workdir's best."""
    waves = 0.3 * np.random.default_rng(2).standard_normal((2, 16000)).astype(np.float32)
    kw = dict(num_images=1, steps=2, guidance=7.5, scheduler="ddim")
    from_model = sample.load_pipeline(export.load_model_config(run["out"]), None, None).generate(waves, [0, 1], **kw)
    from_run = sample.load_pipeline(run["config"], run["workdir"], "best").generate(waves, [0, 1], **kw)
    assert from_model.shape == (2, 1, 32, 32, 3) and np.array_equal(from_model, from_run)


def test_export_refuses_a_non_empty_out(run, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(export.main, ["--workdir", run["workdir"], "--out", run["out"]])
    assert e.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_run_config_json_round_trips(run, tiny_assets):
    """WORKDIR/config.json → the same config train.py ran with: the README's $CONFIG file with its
    --config.model.sd_path override (tuples, floats, strings)."""
    config_file = os.path.join(os.path.dirname(run["workdir"]), "tiny.py")
    ran = config_utils.load_config(config_file, [f"model.sd_path={tiny_assets['sd']}"])
    assert run["config"].to_dict() == ran.to_dict()
