"""The README's user path runs as written: every command of the code blocks marked `<!-- readme-test -->`
is read from README.md and run as a subprocess (bash, from the repo root) with the shell variables the
README names (CONFIG, RUN, SD, AUDIO) pointing at the tiny test assets; a renamed flag or a changed
default makes a command fail and so this test. The README's model paths are the config defaults."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from mtok_jax import config_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = "<!-- readme-test -->"
# What a command leaves in $RUN (checked after it ran); commands not listed only have to exit 0.
OUTPUTS = {"train.py": "checkpoints/best", "sample.py": "samples/samples.jsonl",
           "metrics.evaluate": "eval/report.json"}


def readme_commands(text: str) -> list[str]:
    """The commands of the fenced code blocks right after a MARK line: `\\` continuations joined,
    comments and blank lines dropped."""
    commands = []
    for block in re.findall(MARK + r"\s*```\w*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_block_is_found():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert [c.split()[:2] for c in commands][:3] == [["python", "train.py"], ["python", "sample.py"],
                                                      ["python", "-m"]], commands
    assert readme_commands(f"{MARK}\n```bash\npython a.py \\\n  --x 1  # note\n# c\n\n```\n") == ["python a.py    --x 1"]


def test_readme_model_paths_are_the_defaults():
    """The folders the README converts models into are the ones the default config reads."""
    text = README.read_text(encoding="utf-8")
    c = config_utils.load_config(REPO / "configs" / "default.py")
    for key, path in (("model.beats_path", c.model.beats_path), ("metrics.clip_path", c.metrics.clip_path),
                      ("metrics.inception_path", c.metrics.inception_path),
                      ("metrics.wav2clip_path", c.metrics.wav2clip_path)):
        assert f"{path}`" in text, f"README never writes the default {key}={path}"


@pytest.mark.slow
def test_readme_commands_run(tmp_path, tiny_assets, metric_models):
    """train (one epoch: 3 steps on the tiny dataset) → sample → evaluate, each exactly as the README writes
    it; `sample` and `evaluate` get only --workdir, so they run on the run's config.json (its model paths)."""
    demo = REPO / "configs" / "demo.py"
    overrides = [f"model.beats_path={tiny_assets['beats']}", f"data.data_dir={tiny_assets['data']}",
                 "data.builder_config=", "data.clip_seconds=1.0", "train.epochs=1", "train.batch_size=2",
                 "train.val_batch_size=1", "train.warmup_steps=0", "sample.steps=2", "sample.num_images=1",
                 f"metrics.clip_path={metric_models['clip']}", f"metrics.inception_path={metric_models['inception']}",
                 f"metrics.wav2clip_path={metric_models['wav2clip']}", "metrics.num_images=3",
                 "metrics.per_label=1"]
    config = tmp_path / "tiny.py"
    config.write_text("from mtok_jax import config_utils\n\n\ndef get_config():\n"
                      f"    return config_utils.load_config({str(demo)!r}, {overrides!r})\n")
    run = tmp_path / "run"
    audio = pathlib.Path(tiny_assets["data"]).parent / "manual" / "audio"
    env = {**os.environ, "CONFIG": str(config), "RUN": str(run), "SD": tiny_assets["sd"], "AUDIO": str(audio),
           "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    commands = readme_commands(README.read_text(encoding="utf-8"))
    for command in commands:
        p = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed: {command}\n{p.stderr[-3000:]}"
        for entry, output in OUTPUTS.items():
            if entry in command.split():
                assert (run / output).exists(), f"{command} did not write {run / output}"
    records = [json.loads(line) for line in (run / "samples" / "samples.jsonl").read_text().splitlines()]
    assert records and records[0]["sd_path"] == tiny_assets["sd"]  # the run's config.json, not configs/demo.py
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["num_images"] == 3 and "GIILS needs at least 2 images" in report["metrics"]["giils_note"]
