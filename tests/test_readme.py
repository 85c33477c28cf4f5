"""The README's user path runs as written: every command of the code blocks marked `<!-- readme-test -->`
is read from README.md and run as a subprocess (bash, from the repo root) with the shell variables the
README names (CONFIG, RUN, SD, AUDIO) pointing at the tiny test assets; a renamed flag or a changed
default makes a command fail and so the test. `run_readme_block` is used by tests/test_export.py, whose run
is this block's train → sample → evaluate → export. The README's model paths are the config defaults."""

import os
import pathlib
import re
import subprocess
import sys

from mtok_jax import config_utils
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = "<!-- readme-test -->"
# What a command leaves in $RUN (checked after it ran); commands not listed only have to exit 0.
OUTPUTS = {"train.py": "checkpoints/best", "sample.py": "samples/samples.jsonl",
           "metrics.evaluate": "eval/report.json", "mtok_jax.export": "model/config.json"}


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
    assert [c.split()[:3] for c in commands][:4] == [
        ["python", "train.py", "--config"], ["python", "sample.py", "--workdir"],
        ["python", "-m", "metrics.evaluate"], ["python", "-m", "mtok_jax.export"]], commands
    assert readme_commands(f"{MARK}\n```bash\npython a.py \\\n  --x 1  # note\n# c\n\n```\n") == ["python a.py    --x 1"]


def test_readme_model_paths_are_the_defaults():
    """The folders the README converts models into are the ones the default config reads."""
    text = README.read_text(encoding="utf-8")
    c = config_utils.load_config(REPO / "configs" / "default.py")
    for key, path in (("model.beats_path", c.model.beats_path), ("metrics.clip_path", c.metrics.clip_path),
                      ("metrics.inception_path", c.metrics.inception_path),
                      ("metrics.wav2clip_path", c.metrics.wav2clip_path)):
        assert f"{path}`" in text, f"README never writes the default {key}={path}"


def run_readme_block(tmp_path: pathlib.Path, tiny_assets, metric_models, *overrides: str) -> pathlib.Path:
    """Run every command of the README's marked block exactly as written, with CONFIG a tiny config (the demo
    config on the tiny assets, one epoch of 3 steps, + overrides), RUN = tmp_path/run, SD the tiny SD folder
    and AUDIO the tiny dataset's audio; each must exit 0 and leave its OUTPUTS. → RUN."""
    demo = REPO / "configs" / "demo.py"
    overrides = [f"model.beats_path={tiny_assets['beats']}", f"data.data_dir={tiny_assets['data']}",
                 "data.builder_config=", "data.clip_seconds=1.0", "train.epochs=1", "train.batch_size=2",
                 "train.val_batch_size=1", "train.warmup_steps=0", "train.sample_every_epochs=0",
                 "sample.steps=2", "sample.num_images=1", f"metrics.clip_path={metric_models['clip']}",
                 f"metrics.inception_path={metric_models['inception']}",
                 f"metrics.wav2clip_path={metric_models['wav2clip']}", "metrics.num_images=3", "metrics.per_label=1",
                 *overrides]
    config = tmp_path / "tiny.py"
    config.write_text("from mtok_jax import config_utils\n\n\ndef get_config():\n"
                      f"    return config_utils.load_config({str(demo)!r}, {overrides!r})\n")
    run = tmp_path / "run"
    audio = pathlib.Path(tiny_assets["data"]).parent / "manual" / "audio"
    env = {**os.environ, "CONFIG": str(config), "RUN": str(run), "SD": tiny_assets["sd"], "AUDIO": str(audio),
           "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags(2)}
    for command in readme_commands(README.read_text(encoding="utf-8")):
        p = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed: {command}\n{p.stderr[-3000:]}"
        for entry, output in OUTPUTS.items():
            if entry in command.split():
                assert (run / output).exists(), f"{command} did not write {run / output}"
    return run
