"""Expected errors are one line naming the key, the value and the fix (exit 2); `--verbose` gives the
traceback. Config checks run in-process; a few bad inputs go through the real entry points as
subprocesses (each fails before any model is loaded)."""

import os
import pathlib
import subprocess
import sys

import pytest

from mtok_jax import cli, config_utils, errors

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"

# override → the text the one-line message must contain (key=value as parsed, and the rule)
BAD_VALUES = [
    ("train.epochs=0", "train.epochs=0 must be > 0"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("train.grad_accum=0", "train.grad_accum=0 must be > 0"),
    ("train.val_batch_size=-1", "train.val_batch_size=-1 must be > 0"),
    ("train.max_steps=-2", "train.max_steps=-2 must be >= -1"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
    ("train.b1=1.0", "train.b1=1.0 must be in [0, 1)"),
    ("train.b2=-0.1", "train.b2=-0.1 must be in [0, 1)"),
    ("train.eps=0", "train.eps=0.0 must be > 0"),
    ("train.weight_decay=-0.01", "train.weight_decay=-0.01 must be >= 0"),
    ("train.lambda_l1=-1", "train.lambda_l1=-1.0 must be >= 0"),
    ("train.lambda_l2=-0.5", "train.lambda_l2=-0.5 must be >= 0"),
    ("train.lambda_cl=-0.5", "train.lambda_cl=-0.5 must be >= 0"),
    ("train.log_every=0", "train.log_every=0 must be > 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be > 0"),
    ("data.clip_seconds=0", "data.clip_seconds=0.0 must be > 0"),
    ("data.image_size=30", "data.image_size=30 must be a positive multiple of 8"),
    ("sample.steps=0", "sample.steps=0 must be > 0"),
    ("sample.num_images=0", "sample.num_images=0 must be > 0"),
    ("mesh.fsdp=0", "mesh.data=-1, mesh.fsdp=0"),
    ("model.beats_layers=(3, -1)", "model.beats_layers=(3, -1)"),
    ("train.schedule=linear", "train.schedule='linear'"),
    ("train.batch_size=abc", "--config.train.batch_size=abc: invalid literal for int()"),  # config_flags' parser
    ("train.batch_sise=4", "unknown config key train.batch_sise (did you mean train.batch_size?)"),
    ("trian.lr=1e-4", "unknown config key trian.lr (did you mean train.lr?)"),
]


@pytest.mark.parametrize("override,expected", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_config_value_is_one_line_naming_key_and_value(override, expected):
    with pytest.raises(errors.ConfigError) as e:
        config_utils.load_config(DEMO, [override])
    assert isinstance(e.value, ValueError)  # what validate raised before: callers catching ValueError still do
    line = cli.one_line(e.value)
    assert "\n" not in str(e.value) and expected in line, line


def test_max_steps_limits():
    """-1 (all epochs) and 0 (stop before the first step) are valid; -2 is not (above)."""
    for value in (-1, 0, 5):
        assert config_utils.load_config(DEMO, [f"train.max_steps={value}"]).train.max_steps == value


def _fails(exc):
    def main(argv):
        raise exc
    return main


def test_guarded_prints_one_line_and_exits_2(capsys):
    for exc, text in [(errors.UserError("bad thing: fix it"), "error: bad thing: fix it"),
                      (FileNotFoundError("--audio x: no such file"),
                       "error: FileNotFoundError: --audio x: no such file [--verbose shows the traceback]"),
                      (KeyError("unknown 'k'"), "error: KeyError: unknown 'k'"),
                      (SystemExit("checkpoint: expected the official layout"),
                       "error: checkpoint: expected the official layout")]:
        with pytest.raises(SystemExit) as e:
            cli.run(_fails(exc), ["--some", "arg"])
        assert e.value.code == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert err.splitlines() == [err.strip()] and err.startswith(text), err
    with pytest.raises(errors.UserError):  # --verbose: the exception itself (Python prints the traceback)
        cli.run(_fails(errors.UserError("x")), ["--verbose"])
    with pytest.raises(RuntimeError):  # a bug is no expected error: traceback as before
        cli.run(_fails(RuntimeError("bug")), [])
    with pytest.raises(SystemExit) as e:  # exit codes pass through (argparse errors, --help)
        cli.run(_fails(SystemExit(0)), [])
    assert e.value.code == 0 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: 3, [])
    assert e.value.code == 3


def test_wants_verbose():
    assert cli.wants_verbose(["--verbose"]) and cli.wants_verbose(["-verbose=true", "x"])
    assert not cli.wants_verbose([]) and not cli.wants_verbose(["--verbose", "--noverbose"])
    assert not cli.wants_verbose(["--verbose=false"]) and not cli.wants_verbose(["--", "--verbose"])


def test_command_usage_error_is_one_line(capsys):
    """cli.parse_command (the flags of data.build, convert, export, metrics.*): --verbose everywhere, a bad
    flag value, a missing positional file and a wrong argument count are one line (exit 2)."""
    def define(fv, argv):
        cli.definer(fv)("integer", "n", None, "a number")

    def main(argv):
        fv, (path,) = cli.parse_command("prog", "doc", define, argv, args=("PATH",))
        return cli.existing_file("path", path) and 0

    with pytest.raises(SystemExit) as e:
        cli.run(main, ["--verbose", __file__])
    assert e.value.code == 0
    for argv, text in [(["--n", "x", __file__], "--n=x"),
                       (["/nonexistent.pt"], "argument path: no such file: /nonexistent.pt"),
                       ([], "expected the arguments PATH, got none (see prog --help)")]:
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.splitlines() == [err.strip()] and text in err, err
    with pytest.raises(SystemExit) as e:
        cli.run(main, ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("doc\n\nusage: prog [flags] PATH\n\nflags:") and "--n: a number" in out, out


# ----------------------------------------------------------------------------------- real entry points
def _run(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    return res.returncode, res.stderr, res.stdout


def _one_line(args, *expected):
    code, err, _ = _run(*args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    for text in expected:
        assert text in err, err


def test_train_bad_value_one_line_and_verbose_traceback():
    _one_line(["train.py", "--config", DEMO, "--config.train.batch_size=0"],
              "error: invalid config: train.batch_size=0 must be > 0")
    code, err, _ = _run("train.py", "--config", DEMO, "--config.train.batch_size=0", "--verbose")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].endswith(
        "train.batch_size=0 must be > 0"), err


def test_flag_parsing_errors_one_line(tmp_path):
    """Raised by absl / ml_collections before main: an unknown key, a type mismatch, a missing config."""
    _one_line(["train.py", "--config.train.batch_sise=4"], "unknown config key train.batch_sise",
              "did you mean train.batch_size?")
    _one_line(["sample.py", "--config.sample.steps=many"], "--config.sample.steps=many")
    _one_line(["train.py", "--config", tmp_path / "nope.py"], f"--config={tmp_path / 'nope.py'}: config file not found")
    _, _, out = _run("train.py", "--help")  # the flags defined through mtok_jax.cli belong to train.py (absl exits 1)
    assert "--config: Config file" in out and "--[no]verbose" in out, out
    # the demo runner takes the same flags and override syntax (before it writes anything)
    _one_line(["demo.py", "--config.train.batch_sise=4"], "unknown config key train.batch_sise")
    _one_line(["demo.py", "--config", DEMO, "--config.train.batch_size=0"],
              "train.batch_size=0 must be > 0")
    _, _, out = _run("demo.py", "--help")
    assert "--config: Config file" in out and "--[no]skip_eval" in out and "--[no]verbose" in out, out


def test_missing_paths_one_line(tmp_path):
    _one_line(["sample.py", "--config", DEMO, "--audio", "/nonexistent", "--checkpoint", "none"],
              "--audio /nonexistent: no such file or folder")
    _one_line(["-m", "mtok_jax.data.build", "--layout", "folders", "--manual_dir", "/nonexistent", "--data_dir",
               tmp_path / "data"], "argument --manual_dir: no such folder: /nonexistent")
    _one_line(["-m", "mtok_jax.convert", "beats", "/nonexistent.pt", tmp_path / "out"],
              "argument checkpoint: no such file: /nonexistent.pt")
    _one_line(["-m", "metrics.evaluate", "--config", DEMO, "--config.train.grad_accum=0", "--images", tmp_path],
              "train.grad_accum=0 must be > 0")
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
