"""Converters never unpickle untrusted code: a crafted .pt is refused unless --trusted is given."""

import argparse
import json

import numpy as np
import pytest

from conftest import torch_or_skip
from metrics import convert as metrics_convert
from mtok_jax import cli, convert, pt_checkpoint
from mtok_jax.models import beats as B

# every converter subcommand: (main, subcommand)
CONVERTERS = [(convert.main, "beats"), (convert.main, "embedder"), (metrics_convert.main, "inception"),
              (metrics_convert.main, "wav2clip")]


class _Evil:
    """Unpickling this object calls open(marker, 'w'), i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.torch
@pytest.mark.parametrize("main,command", CONVERTERS, ids=[c for _, c in CONVERTERS])
def test_crafted_pickle_refused_without_trusted(tmp_path, capsys, main, command):
    torch = torch_or_skip()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(marker)}, evil)
    with pytest.raises(SystemExit) as e:  # as the entry point runs it: one line, exit code 2
        cli.run(main, [command, str(evil), str(tmp_path / "out")])
    assert e.value.code == cli.EXIT_USER_ERROR
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and msg.startswith(f"error: {evil}: holds non-tensor objects (io.open), refused")
    assert "--trusted" in msg
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the file really runs code when fully unpickled: --trusted creates the marker
    with pytest.raises((SystemExit, KeyError, ValueError, AttributeError, TypeError)):
        main([command, str(evil), str(tmp_path / "out"), "--trusted"])
    assert marker.exists()


@pytest.mark.torch
def test_trusted_loads_a_legit_checkpoint_with_training_args(golden_dir, tmp_path, capsys):
    """An official-layout BEATs .pt that also pickles its training args (an argparse.Namespace)."""
    torch = torch_or_skip()
    d = np.load(golden_dir / "beats_small.npz")
    cfg = json.loads(str(d["config_json"]))
    model_sd = {k[3:]: torch.from_numpy(np.array(d[k])) for k in d.files if k.startswith("sd/")}
    ckpt = tmp_path / "BEATs_args.pt"
    torch.save({"cfg": cfg, "model": model_sd, "args": argparse.Namespace(lr=5e-4)}, ckpt)
    with pytest.raises(pt_checkpoint.UntrustedCheckpoint, match=r"argparse\.Namespace"):
        pt_checkpoint.load(ckpt)
    with pytest.raises(pt_checkpoint.UntrustedCheckpoint, match="holds non-tensor objects"):
        convert.main(["beats", str(ckpt), str(tmp_path / "refused")])
    convert.main(["beats", str(ckpt), str(tmp_path / "beats"), "--trusted"])
    assert "12 layers" in capsys.readouterr().out
    _, params = B.load_beats(tmp_path / "beats")
    np.testing.assert_array_equal(np.asarray(params["post_extract_proj"]["bias"]),
                                  d["sd/post_extract_proj.bias"])
