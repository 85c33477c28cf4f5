"""Bytes per device of the training step at full size, from XLA's memory analysis, without any weights.

  python -m mtok_jax.memory --config configs/exp2.py --devices 8 [--config.a.b=value ...]
  python -m mtok_jax.memory --table [--markdown]

One measurement: the config's training step (train.compile_train_step, the step train.py runs) is
compiled for the released architectures (SD v1.4 + BEATs iter3+; system.abstract_system: shapes only,
nothing read or allocated) on `--devices` virtual CPU devices with mesh data=1, fsdp=N, and
`compiled.memory_analysis()` is read. Printed as one JSON line, bytes per device:
  trainable / frozen / opt_state / batch: the shards of each array this device holds (from the shardings);
  arguments, outputs, aliased (outputs written into donated arguments), temporaries (activations kept for
  the backward pass, gradients, optimizer temporaries): XLA's figures (arguments leave out what the step
  never reads, e.g. the VAE decoder, which train.py still holds for validation images);
  peak = trainable + frozen + opt_state + batch + outputs − aliased + temporaries (what the device holds
  at once; generated code not counted).
XLA:CPU's buffer assignment with its memory-minimising scheduler (environment.memory_first_cpu_schedule)
stands in for an accelerator's: GPU and TPU compilers schedule for memory too, but fuse differently, so
treat the temporaries as an estimate to ±20 %, arguments as exact.

`--table` runs exp1 and exp2 at 512 px, bf16 compute (fp32 masters) and train.remat on 1, 8 and 32
devices, one process each (the device count is fixed when JAX starts), 8 examples per device on one
device and 1 per device on 8 and 32 (global batch 8 and 32); `--markdown` prints it as the README table.
Compiling a full-size step takes minutes on a laptop CPU and several GiB of memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags

from mtok_jax import cli, config_utils, environment, sharding, train
from mtok_jax import system as system_lib

TABLE_CONFIGS = ("configs/exp1.py", "configs/exp2.py")
TABLE_DEVICES = (1, 8, 32)
TABLE_OVERRIDES = ("data.image_size=512", "model.dtype=bfloat16", "train.remat=True", "train.grad_accum=1")
GIB = 2 ** 30


def measure(config, devices: int, full_size: bool = True) -> dict[str, Any]:
    """Compile `config`'s training step over all `devices` (mesh data=1, fsdp=devices) → the JSON record
    described in the module docstring. JAX must already have `devices` devices. full_size=False: the
    architectures of the config's own model folders instead of the released ones."""
    if len(jax.devices()) != devices:
        raise RuntimeError(f"JAX has {len(jax.devices())} devices, the measurement asks for {devices}")
    mesh = sharding.make_mesh({"data": 1, "fsdp": devices})
    system, shapes = system_lib.abstract_system(config, full_size=full_size)
    schedule = train.learning_rate(config.train, 1000)
    optimizer = train.make_optimizer(config.train, schedule)
    state = train.create_state(config, shapes, mesh, optimizer)  # as train.py: fp32 masters, frozen in model.dtype
    sh = state.sh

    def shard_bytes(tree, shardings) -> int:
        return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    batch = train.abstract_train_batch(config, sh.train_batch)
    compiled = train.compile_train_step(system, optimizer, schedule, sh, state.trainable, state.opt_state,
                                        state.frozen)
    trainable, frozen, opt_state = state.trainable, state.frozen, state.opt_state
    ma = compiled.memory_analysis()
    record = {
        "config": config.workdir_name, "full_size": full_size,
        "devices": devices, "global_batch": int(config.train.batch_size),
        "image_size": int(config.data.image_size), "dtype": config.model.dtype, "remat": bool(config.train.remat),
        "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))),
        "trainable": shard_bytes(trainable, sh.trainable), "frozen": shard_bytes(frozen, sh.frozen),
        "opt_state": shard_bytes(opt_state, sh.opt_state),
        "batch": sum(int(np.prod(sh.train_batch.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                     for x in batch.values()),
        "arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
    }
    held = record["trainable"] + record["frozen"] + record["opt_state"] + record["batch"]
    record["peak"] = held + record["outputs"] - record["aliased"] + record["temporaries"]
    return record


def _child_env(devices: int) -> dict[str, str]:
    """The environment of a measurement process: XLA_FLAGS with `devices` host devices (any other
    device count removed)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "XLA_FLAGS": " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])}


def table(configs: Sequence[str] = TABLE_CONFIGS, devices: Sequence[int] = TABLE_DEVICES,
          overrides: Sequence[str] = TABLE_OVERRIDES) -> list[dict[str, Any]]:
    """One measurement process per (config, device count) → their records."""
    records = []
    for config in configs:
        for n in devices:
            batch = 8 if n == 1 else n
            cmd = [sys.executable, "-m", "mtok_jax.memory", f"--config={config}", f"--devices={n}",
                   *(f"--config.{o}" for o in (*overrides, f"train.batch_size={batch}"))]
            print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
            out = subprocess.run(cmd, env=_child_env(n), check=True, stdout=subprocess.PIPE, text=True).stdout
            records.append(json.loads(out.strip().splitlines()[-1]))
    return records


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The records as a Markdown table, GiB per device."""
    cols = ("trainable", "frozen", "opt_state", "temporaries", "peak")
    lines = ["| config | devices | batch / device | " + " | ".join(cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    for r in records:
        gib = " | ".join(f"{r[c] / GIB:.2f}" for c in cols)
        lines.append(f"| {r['config']} | {r['devices']} | {r['global_batch'] // r['devices']} | {gib} |")
    return "\n".join(lines)


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    cli.define_config_file("config", None, "experiment config (configs/*.py)", argv, flag_values=fv)
    flags.DEFINE_integer("devices", 1, "virtual CPU devices (mesh data=1, fsdp=N)", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("full_size", True, "the released architectures (else those at config.model.sd_path / "
                                         "beats_path)", flag_values=fv)
    flags.DEFINE_bool("table", False, "exp1 and exp2 × 1, 8, 32 devices at 512 px, bf16, remat "
                                      "(one process each)", flag_values=fv)
    flags.DEFINE_bool("markdown", False, "with --table: print a Markdown table instead of JSON lines",
                      flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
    environment.memory_first_cpu_schedule()  # the remat figures are only real with it (before JAX starts)
    cli.setup_logging()
    args = sys.argv[1:] if argv is None else list(argv)
    fv, _ = cli.parse_command("python -m mtok_jax.memory", __doc__, _define, args)
    if fv.table:
        records = table()
        print(markdown(records) if fv.markdown else "\n".join(json.dumps(r) for r in records))
        return
    if fv.config is None:
        raise app.UsageError("--config is required without --table (see python -m mtok_jax.memory --help)")
    if len(jax.devices()) != fv.devices:  # started directly: this process gets the device count it asks for
        raise SystemExit(subprocess.run([sys.executable, "-m", "mtok_jax.memory", *args],
                                        env=_child_env(fv.devices)).returncode)
    record = measure(config_utils.validate(fv.config), fv.devices, fv.full_size)
    print(json.dumps(record))


if __name__ == "__main__":
    cli.run(main)
