"""A run carries its config (WORKDIR/config.json + overrides), the checkpoint choice explains itself
before any model loads, the built dataset config is picked by shape, an empty GIILS table says why."""

import os
import pathlib
import subprocess
import sys

import pytest

from metrics import evaluate
from mtok_jax import checkpoints, cli, config_utils
from mtok_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"


def write_run_config(workdir: pathlib.Path, *overrides: str) -> str:
    """WORKDIR/config.json as train.py writes it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config_utils.load_config(DEMO, list(overrides))
    path = workdir / config_utils.RUN_CONFIG
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return str(path)


def test_run_config_round_trip_and_overrides(tmp_path):
    """config.json loads back to the same config (tuples stay tuples), overrides on top, types checked."""
    path = write_run_config(tmp_path, "model.sd_path=/models/sd", "model.beats_layers=(1, 2)")
    want = config_utils.load_config(DEMO, ["model.sd_path=/models/sd", "model.beats_layers=(1, 2)"])
    assert config_utils.load_config(path).to_dict() == want.to_dict()
    got = config_utils.load_config(path, ["train.lr=1e-4", "model.beats_layers=(3,)"])
    assert got.model.sd_path == "/models/sd" and got.train.lr == 1e-4 and got.model.beats_layers == (3,)
    with pytest.raises(ValueError, match="unknown config key train.lrr"):
        config_utils.load_config(path, ["train.lrr=1"])


def test_workdir_config_is_the_default(tmp_path):
    """--workdir with a config.json and no --config → the run's config; --config FILE wins when given."""
    from absl import flags

    path = write_run_config(tmp_path, "model.sd_path=/models/sd")

    def parsed(argv):
        fv = flags.FlagValues()
        flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
        holder = cli.define_config_file("config", str(DEMO), "help", argv, flag_values=fv)
        cli.parse_flags(argv, fv)
        return holder.value, cli.config_source("config", fv)

    config, source = parsed(["sample.py", "--workdir", str(tmp_path), "--config.sample.steps=3"])
    assert config.model.sd_path == "/models/sd" and config.sample.steps == 3
    assert source == f"{path} (the run's config)"
    config, source = parsed(["sample.py", f"--workdir={tmp_path}", "--config", str(DEMO)])
    assert config.model.sd_path == "demo_assets/sd" and source == str(DEMO)


def make_steps(workdir: pathlib.Path, **steps):
    for name, numbers in steps.items():
        for n in numbers:
            (workdir / "checkpoints" / name / str(n)).mkdir(parents=True)


def test_checkpoint_select(tmp_path, caplog):
    make_steps(tmp_path, latest=[3, 6])
    with caplog.at_level("INFO", logger="mtok_jax.checkpoints"):
        assert checkpoints.select(tmp_path, None) == "latest"
    assert "no best checkpoint yet" in caplog.text and "latest/6" in caplog.text
    assert checkpoints.select(tmp_path, "6") == 6 and checkpoints.select(tmp_path, "none") is None
    with pytest.raises(checkpoints.CheckpointError, match=r"no best checkpoint in .*; exist: latest: 3, 6$"):
        checkpoints.select(tmp_path, "best")
    with pytest.raises(checkpoints.CheckpointError, match="no step 4 checkpoint"):
        checkpoints.select(tmp_path, "4")
    make_steps(tmp_path, best=[3])
    assert checkpoints.select(tmp_path, "") == "best"
    with pytest.raises(checkpoints.CheckpointError, match="none exist"):
        checkpoints.select(tmp_path / "empty", None)


def test_sample_missing_checkpoint_one_line_before_models(tmp_path):
    """sample.py with only --workdir: the run's config.json (its sd_path does not exist, so a model load
    would fail differently) and one line naming the checkpoints that exist."""
    write_run_config(tmp_path, "model.sd_path=/nonexistent/sd")
    make_steps(tmp_path, latest=[2])
    p = subprocess.run([sys.executable, "sample.py", "--workdir", str(tmp_path), "--checkpoint", "best"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("error: no best checkpoint in") and \
        lines[-1].endswith("exist: latest: 2"), p.stderr


def test_builder_config_picked_by_shape(tiny_assets, tmp_path):
    """data.builder_config="" picks the built config whose clip length and image size are the config's;
    none matching is an error naming data.builder_config."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pathlib.Path(tiny_assets["data"]) / "music_image", data / "music_image")
    shutil.copytree(data / "music_image" / "tiny", data / "music_image" / "big")  # the same, recorded as 64 px
    meta = next((data / "music_image" / "big").glob("*/metadata.json"))
    m = json.loads(meta.read_text())
    m["config"].update(image_height=64, image_width=64)
    meta.write_text(json.dumps(m))
    base = [f"data.data_dir={data}", "data.builder_config=", "data.clip_seconds=1.0"]
    assert pipeline.open_configured(config_utils.load_config(DEMO, base)).path.parent.name == "tiny"
    assert pipeline.open_configured(config_utils.load_config(DEMO, base + ["data.image_size=64"])
                                     ).path.parent.name == "big"
    with pytest.raises(FileNotFoundError, match="no built music_image configs match .*set data.builder_config"):
        pipeline.open_configured(config_utils.load_config(DEMO, base + ["data.image_size=48"]))
    with pytest.raises(FileNotFoundError, match="set data.builder_config"):
        pipeline.resolve_config(data)  # no shapes, two built


def test_giils_empty_note():
    note = evaluate.giils_note(["a", "b"], 2, 1)
    assert note.startswith("GIILS needs at least 2 images of a label: every label had fewer") and "--per_label ≥ 2" in note
    assert "1 of 3 labels (c)" in evaluate.giils_note(["c"], 3, 10)
