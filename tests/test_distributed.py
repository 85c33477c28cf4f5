"""JAX's distributed runtime as the entry points start it: two processes × 4 CPU devices on this machine
(gloo collectives), the global device count, the refusal when the processes' configs differ, and
train.py under two processes (FSDP on, a SIGTERM to one of them, resumed on 2 and on 1 process) against
one process with all 8 devices, and sample.py / metrics.evaluate under two processes against one."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import built_once, xla_flags
from mtok_jax import config_utils, errors, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"

WORKER = """
import sys
import jax
from mtok_jax import config_utils, sharding
config = config_utils.load_config(sys.argv[1], sys.argv[5:])
sharding.initialize_distributed(config, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
mesh = sharding.make_mesh(config.mesh)
print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
      f"{jax.device_count()} global devices, mesh {dict(mesh.shape)}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_code(overrides_per_process):
    """Start one worker per entry of `overrides_per_process` → [(returncode, stdout, stderr)]."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags(4)}
    n = len(overrides_per_process)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(DEMO), address, str(n), str(i), *overrides],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, overrides in enumerate(overrides_per_process)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append((p.returncode, stdout, stderr))
    return out


def test_two_processes_see_eight_devices():
    results = _launch_code([[], []])
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, stderr[-3000:]
        assert f"process {i}/2: 4 local, 8 global devices, mesh {{'data': 8, 'fsdp': 1}}" in stdout, stdout


def test_mesh_must_cover_every_device_of_several_processes():
    results = _launch_code([["mesh.data=4"], ["mesh.data=4"]])
    for code, _, stderr in results:
        assert code != 0
        assert "mesh data=4 × fsdp=1 covers 4 of the 8 devices of 2 processes" in stderr, stderr[-3000:]


def test_processes_with_different_configs_are_refused():
    results = _launch_code([[], ["train.lr=0.001"]])
    for code, _, stderr in results:
        assert code != 0
        assert "the 2 processes disagree on the config: process(es) 1 differ from process 0" in stderr, stderr[-3000:]


def test_explicit_start_needs_all_three_values(monkeypatch):
    for name in sharding.DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    config = config_utils.load_config(DEMO)
    with pytest.raises(errors.UserError, match="--coordinator_address needs --num_processes and --process_id"):
        sharding.initialize_distributed(config, "127.0.0.1:1234", num_processes=2)
    with pytest.raises(errors.UserError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        sharding.initialize_distributed(config, "127.0.0.1:1234", num_processes=2, process_id=2)
    sharding.initialize_distributed(config)  # nothing asks for it: a no-op
    assert sharding.config_digest(config) == sharding.config_digest(config_utils.load_config(DEMO))
    assert sharding.config_digest(config) != sharding.config_digest(config_utils.load_config(DEMO, ["train.lr=1e-3"]))


# ---------------------------------------------------------------------------------------------------
# train.py under two processes
# ---------------------------------------------------------------------------------------------------
HARNESS = REPO / "tests" / "fault_harness.py"
STEPS = 4  # 18 train clips in global batches of 8: 2 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def data18(tmp_path_factory, demo_models):
    """The demo models + a 3-label, 1 s, 32 px dataset with 18 train / 3 validation clips (global batches
    of 8 over 8 devices; validation padded from 3 to 8 and masked, 5 padding rows on process 1)."""
    from mtok_jax.data import sources
    from mtok_jax.data.music_image import build, make_config
    from mtok_jax.demo.data import write_demo_sources

    def make(root: pathlib.Path) -> dict:
        labels = sources.DEFAULT_LABELS[:3]
        manual = write_demo_sources(root / "manual", per_label={"train": 6, "validation": 1, "test": 1},
                                    clip_seconds=1.0, labels=labels)
        build(manual, root / "data", make_config("folders", clip_seconds=1.0, image_size=32, labels=labels,
                                                 name="tiny18"), workers=0, progress=False)
        return {"data": root / "data"}

    return {**demo_models, **built_once(tmp_path_factory, "tiny18", make)}


def _train_args(assets, workdir) -> list[str]:
    return ["--config", str(DEMO), "--workdir", str(workdir),
            f"--config.model.sd_path={assets['sd']}", f"--config.model.beats_path={assets['beats']}",
            f"--config.data.data_dir={assets['data']}", "--config.data.builder_config=tiny18",
            "--config.data.clip_seconds=1.0", "--config.train.trainable=embedder", "--config.train.epochs=2",
            "--config.train.batch_size=8", "--config.train.val_batch_size=1", "--config.train.log_every=1",
            "--config.train.checkpoint_every=1", "--config.train.warmup_steps=0", "--config.mesh.data=4",
            "--config.mesh.fsdp=2", "--config.train.fsdp_min_size=1000", "--config.train.sample_every_epochs=0"]


def _run(script: pathlib.Path | str, args: list[str], processes: int, fault_on: dict[int, str] | None = None
         ) -> list[str]:
    """`script args` (a path, or a module name for `python -m`) on `processes` × 8/`processes` CPU devices
    (one process: no distributed flags) → their stderr; each must exit 0. `fault_on`: {process:
    MTOK_FAULT} for the fault harness."""
    command = [sys.executable, str(script)] if isinstance(script, pathlib.Path) else [sys.executable, "-m", script]
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": xla_flags(8 // processes)}
    env.pop("MTOK_FAULT", None)
    procs = []
    for i in range(processes):
        dist = ["--coordinator_address", address, "--num_processes", str(processes), "--process_id", str(i)]
        fault = (fault_on or {}).get(i)
        procs.append(subprocess.Popen(
            [*command, *args, *(dist if processes > 1 else [])],
            env={**env, **({"MTOK_FAULT": fault} if fault else {})}, cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=400)[1] for p in procs]  # all waited for before any assert
    for p, stderr in zip(procs, errs):
        assert p.returncode == 0, stderr[-3000:]
    return errs


def _train(assets, workdir, processes: int, fault_on: dict[int, str] | None = None) -> list[str]:
    """train.py (through the fault harness) on `processes` × 8/`processes` CPU devices → their stderr."""
    return _run(HARNESS, _train_args(assets, workdir), processes, fault_on)


def _final(workdir: pathlib.Path) -> tuple[int, dict]:
    """(newest latest step, {key: array} of its params and optimizer state)."""
    latest = workdir / "checkpoints" / "latest"
    step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    out, checkpointer = {}, ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved over devices this process lacks
    for item in ("params", "opt_state"):
        saved = checkpointer.metadata(latest / str(step) / item).item_metadata.tree
        tree = checkpointer.restore(latest / str(step) / item, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), saved))
        out.update({f"{item}{jax.tree_util.keystr(k)}": np.asarray(v)
                    for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]})
    return step, out


def _val_losses(workdir: pathlib.Path) -> list[float]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x["val_loss"] for x in lines if x["kind"] == "epoch"]


@pytest.fixture(scope="module")
def one(data18, tmp_path_factory) -> pathlib.Path:
    """The run on 1 process × 8 devices, start to end."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    _train(data18, workdir, 1)
    return workdir


def test_two_processes_train_stop_resume_and_equal_one(data18, one, tmp_path):
    """2 processes × 4 devices with FSDP: SIGTERM to process 1 only stops both at the same step (saved);
    resumed on 2 processes, and the same checkpoint resumed on 1 process × 8 devices, both end equal
    (1e-5) to 1 process × 8 devices run through; validation (3 clips padded to 8) gives the same loss."""
    two = tmp_path / "two"
    errs = _train(data18, two, 2, fault_on={1: "term@step:1"})
    assert "FAULT term@step:1" in errs[1] and "FAULT" not in errs[0]
    for err in errs:  # both stopped at the boundary after step 1, process 0 saved it
        assert "interrupted at step 1" in err, err[-2000:]
    stopped_at, after_one = _final(two)
    assert stopped_at == 1
    on_one = tmp_path / "two_then_one"
    shutil.copytree(two, on_one)
    _train(data18, two, 2)
    _train(data18, on_one, 1)
    step, want = _final(one)
    assert step == STEPS
    assert max(float(np.abs(want[k] - after_one[k]).max()) for k in want) > 1e-3  # steps 2-4 did train
    for workdir in (two, on_one):
        got_step, got = _final(workdir)
        assert got_step == STEPS and got.keys() == want.keys()
        for key in want:
            # The unary scores' bias shifts every token's logit alike before the softmax over tokens: its
            # exact gradient is 0, and Adam scales the float noise left (1e-9) up to steps of ~0.1·lr.
            tol = 1e-3 if "['unary_reduce']['bias']" in key else 1e-5
            np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol, err_msg=f"{workdir.name} {key}")
        np.testing.assert_allclose(_val_losses(workdir), _val_losses(one), rtol=1e-5)


def test_sampling_on_two_processes_writes_the_same_files(data18, one, tmp_path):
    """sample.py from the trained run's checkpoint: 2 processes × 4 devices (each computes its devices'
    images, process 0 writes) give byte-identical PNGs, grid and the same records as 1 process × 8."""
    audio = sorted((pathlib.Path(data18["data"]).parent / "manual" / "audio").iterdir())[0]  # one label: 8 clips
    outs = {}
    for processes in (1, 2):
        outs[processes] = tmp_path / f"samples_{processes}"
        _run(REPO / "sample.py", [*_train_args(data18, one), "--checkpoint", "latest", "--audio", str(audio),
                                  "--steps", "2", "--num_images", "1", "--out", str(outs[processes])], processes)
    files = sorted(p.name for p in outs[1].iterdir())
    assert sum(name.endswith(".png") for name in files) == 9  # 8 clips + grid.png
    assert files == sorted(p.name for p in outs[2].iterdir())
    for name in files:
        if name.endswith(".png"):
            assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    records = [[json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
               for out in (outs[1], outs[2])]
    assert records[0] == records[1] and records[0]


def test_evaluation_on_two_processes_gives_the_same_report(data18, one, metric_models, tmp_path):
    """metrics.evaluate in generation mode: 2 processes × 4 devices (all generate, process 0 writes and
    scores) give the same images and the same report numbers as 1 process × 8."""
    reports, outs = {}, {}
    for processes in (1, 2):
        outs[processes] = tmp_path / f"eval_{processes}"
        _run("metrics.evaluate", [*_train_args(data18, one), "--checkpoint", "latest", "--num_images", "3",
                                  "--per_label", "1", "--config.sample.steps=2", "--out", str(outs[processes]),
                                  "--clip_path", metric_models["clip"], "--inception_path", metric_models["inception"],
                                  "--wav2clip_path", metric_models["wav2clip"]], processes)
        reports[processes] = json.loads((outs[processes] / "report.json").read_text())
    generated = sorted((outs[1] / "images" / "generated").iterdir())
    assert len(generated) == 3
    for path in generated:
        assert path.read_bytes() == (outs[2] / "images" / "generated" / path.name).read_bytes(), path.name
    # the same numbers to float rounding (process 0 scores on 4 devices' CPU client instead of 8: sums of
    # near-zero cosines of the random metric models differ in the 8th digit)
    flat = [{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(reports[n]["metrics"])[0]}
            for n in (1, 2)]
    assert flat[0].keys() == flat[1].keys() and flat[0]
    for key, value in flat[0].items():
        if isinstance(value, float):
            np.testing.assert_allclose(flat[1][key], value, rtol=1e-4, atol=1e-7, err_msg=key)
        else:
            assert flat[1][key] == value, key
    assert reports[1]["audio_ids"] == reports[2]["audio_ids"]
