"""Entry-point error handling shared by train.py, sample.py, metrics.evaluate / convert, data.build and convert.

An expected error — a bad config value or key, a bad flag, a missing path, bad data — is printed as
ONE line on stderr (`error: …`) and the process exits with code 2 (:data:`EXIT_USER_ERROR`, as
argparse uses for usage errors). `--verbose` (a flag of every entry point) re-raises it instead, so
the full traceback is printed (exit 1). Any other exception is a bug and keeps its traceback.

Expected: :class:`mtok_jax.errors.UserError`, ValueError, KeyError, FileNotFoundError,
NotADirectoryError, IsADirectoryError, FloatingPointError (the NaN guard), `SystemExit("message")`,
absl flag errors and `app.UsageError`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from mtok_jax import config_utils, environment, errors

flags.disclaim_key_flags()  # flags defined through this module belong to its caller (train.py --help lists them)

EXIT_USER_ERROR = 2
VERBOSE_HELP = "on an error, show the full traceback instead of one line"
_OWN_MESSAGE = (errors.UserError, flags.Error, app.UsageError)  # printed without the exception's name
_EXPECTED = (*_OWN_MESSAGE, ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
             FloatingPointError)


def one_line(e: BaseException) -> str | None:
    """The one-line message of an expected error; None for anything else (a bug: keep its traceback)."""
    if isinstance(e, SystemExit):
        if not isinstance(e.code, str):
            return None  # exit codes (--help exits 0)
        text = e.code
    elif isinstance(e, _OWN_MESSAGE):
        text = str(e)
    elif isinstance(e, _EXPECTED):
        arg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)  # str(KeyError) is a repr
        text = f"{type(e).__name__}: {arg} [--verbose shows the traceback]"
    else:
        return None
    return " ".join(str(text).split())


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether `argv` turns on --verbose (`--verbose`, `--verbose=true|1`; the last of these and
    `--noverbose` / `--verbose=false` wins; nothing after `--`)."""
    on = False
    for arg in argv:
        if arg == "--":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in ("verbose", "noverbose"):
            on = name == "verbose" and (not eq or value.lower() in ("1", "true", "t", "yes", "y"))
    return on


def guarded(fn: Callable[..., Any], *args: Any, verbose: bool, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`; an expected error becomes one stderr line and SystemExit(2), unless `verbose`."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        text = None if verbose else one_line(e)
        if text is None:
            raise
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run an entry point `main(argv)` (flags: :func:`parse_command`) and exit with its int result (0 for
    anything else), or 2 after one line for an expected error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    result = guarded(main, argv, verbose=wants_verbose(argv))
    sys.exit(result if isinstance(result, int) else 0)


def run_absl(main: Callable[[], Any]) -> None:
    """`absl.app.run` of `main()` (it reads its flags; positional arguments are a usage error) with a
    `--verbose` flag and one-line errors, also for flag parsing (a bad flag value, an unknown
    `--config.*` key, a missing `--config` file)."""
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    verbose = wants_verbose(sys.argv[1:])

    def no_arguments(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        return main()

    app.run(lambda argv: guarded(no_arguments, argv, verbose=verbose),
            flags_parser=lambda argv: guarded(parse_flags, argv, verbose=verbose))


def define_run_flags(workdir_help: str = "Run directory (default: runs/<config.workdir_name>).",
                     ) -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """The `--config` (default configs/demo.py; with `--workdir DIR` and no `--config`, DIR/config.json)
    and `--workdir` flags of train.py, sample.py, demo.py and the app. → (config, workdir) holders."""
    config = define_config_file("config", "configs/demo.py", "Config file (configs/*.py).")
    return config, flags.DEFINE_string("workdir", None, workdir_help)


CHECKPOINT_HELP = "best | latest | a step number | none (the untrained init); default: best, else latest"


def setup_logging() -> None:
    """The log every entry point shows: mtok_jax at INFO; absl (orbax logs each file it writes), JAX's
    backend probing ("Unable to initialize backend 'tpu'") and diffusers/transformers' deprecation lines quiet."""
    environment.quiet_third_party_loggers()
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("mtok_jax").setLevel(logging.INFO)


def default_workdir(config) -> str:
    """Where a config's run lives unless `--workdir` says otherwise: runs/<config.workdir_name>."""
    return os.path.join("runs", config.workdir_name)


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """--coordinator_address / --num_processes / --process_id (one process per host; see
    sharding.initialize_distributed, also for the env vars and auto-detection). → {name: holder}."""
    return {"coordinator_address": flags.DEFINE_string(
                "coordinator_address", None, "HOST:PORT of process 0 (several processes; default "
                "env MTOK_COORDINATOR_ADDRESS, or auto-detected with --config.multihost)", flag_values=flag_values),
            "num_processes": flags.DEFINE_integer("num_processes", None, "processes in all (with "
                                                  "--coordinator_address)", flag_values=flag_values, lower_bound=1),
            "process_id": flags.DEFINE_integer("process_id", None, "this process's index, 0 … num_processes-1",
                                               flag_values=flag_values, lower_bound=0)}


def definer(flag_values: flags.FlagValues) -> Callable[..., flags.FlagHolder]:
    """`define(kind, name, default, help)` = flags.DEFINE_<kind>(name, default, help, flag_values=flag_values)."""
    return lambda kind, name, default, help_, **kw: getattr(flags, f"DEFINE_{kind}")(
        name, default, help_, flag_values=flag_values, **kw)


def parse_command(prog: str, doc: str, define: Callable[[flags.FlagValues, list[str]], Any],
                  argv: Sequence[str] | None = None, *, args: Sequence[str] = (),
                  commands: Mapping[str, str] | None = None) -> tuple[flags.FlagValues, list[str]]:
    """The absl flags of one entry point, parsed from `argv` (default sys.argv[1:]) into a FlagValues of
    its own (so `main(argv)` also runs in-process, e.g. in tests). `define(flag_values, [prog, *argv])`
    defines them (`--verbose` is added). `args`: the names of the positional arguments, one value each;
    with `commands` ({name: what it does}) a first one, the command, comes before them.
    `--help` / `-h` prints `doc`, the commands, the usage and the flags as absl.app does for train.py (exit 0).
    → (flag values, positional values: [command,] *args); a wrong count or command is a one-line usage error."""
    names = ([f"{{{','.join(commands)}}}"] if commands else []) + list(args)
    if commands:
        doc = doc.strip() + "\n\nCommands:\n" + "\n".join(f"  {name}: {text}" for name, text in commands.items())
    argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    fv = flags.FlagValues()
    define(fv, argv)
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=fv)
    if {"--help", "-h", "--helpfull"} & set(argv[1:argv.index("--") if "--" in argv else len(argv)]):
        flag_lines = [line for line in fv.get_help(include_special_flags=False).splitlines()
                      if line.startswith(" ")]  # without the per-module headers
        usage = f"usage: {prog} [flags] {' '.join(names)}".rstrip()
        print(f"{doc.strip()}\n\n{usage}\n\nflags:\n\n{prog}:\n" + "\n".join(flag_lines))
        raise SystemExit(0)
    values = parse_flags(argv, fv)[1:]
    if len(values) != len(names):
        got = f"got {' '.join(values)}" if values else "got none"
        raise app.UsageError(f"expected the arguments {' '.join(names)}, {got} (see {prog} --help)")
    if commands and values[0] not in commands:
        raise app.UsageError(f"unknown command {values[0]!r}: choose {' or '.join(commands)} (see {prog} --help)")
    return fv, values


def existing_file(name: str, path: str) -> str:
    """`path` when it is a file, else a one-line usage error naming the argument or flag `name`."""
    if not os.path.isfile(path):
        raise app.UsageError(f"argument {name}: no such file: {path}")
    return path


def existing_dir(name: str, path: str) -> str:
    """`path` when it is a folder, else a one-line usage error naming the argument or flag `name`."""
    if not os.path.isdir(path):
        raise app.UsageError(f"argument {name}: no such folder: {path}")
    return path


def define_config_file(name: str, default: str | None, help_string: str, argv: Sequence[str] | None = None,
                       flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """The locked `--NAME` config flag (ml_collections config_flags) with one-line errors; its
    `--NAME.a.b=value` overrides are read from `argv` (default sys.argv) and applied here.

    Without `--NAME` on the command line, a run's own config is the default when `--workdir DIR` is given
    and `DIR/config.json` exists (written by train.py), else `default` (None: no config)."""
    argv = sys.argv if argv is None else list(argv)
    path = run_config(argv, name) or default
    holder = guarded(config_utils.call_with_key_errors, config_utils.define_config_flag, argv[1:], flag_values,
                     argv, path, name, help_string, verbose=wants_verbose(argv[1:]))
    _CONFIG_SOURCES[name] = path
    return holder


def run_config(argv: Sequence[str], name: str = "config") -> str | None:
    """`WORKDIR/config.json` when `argv` gives `--workdir WORKDIR` (not `--NAME`) and the file exists."""
    workdir, args = None, list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        flag, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and flag == name:
            return None
        if arg.startswith("-") and flag == "workdir":
            workdir = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    path = workdir and os.path.join(workdir, config_utils.RUN_CONFIG)
    return path if path and os.path.isfile(path) else None


def config_source(name: str = "config", flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """Where the parsed `--NAME` config came from, for the log: a config file or a run's config.json."""
    flag = flag_values[name]
    if isinstance(flag.parser, ConfigFileFlagParser) and flag.present:
        return config_flags.get_config_filename(flag)
    path = _CONFIG_SOURCES.get(name)
    return f"{path} (the run's config)" if path and path.endswith(".json") else str(path)


_CONFIG_SOURCES: dict[str, str | None] = {}


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parse `argv` (argv[0] = program) into `flag_values`; an unknown `--config.*` key or a missing
    config file is one line. → the remaining arguments."""
    rest = config_utils.call_with_key_errors(flag_values, argv[1:], argv)
    for name in list(flag_values):
        flag = flag_values[name]
        if isinstance(flag.parser, ConfigFileFlagParser) and flag.value is not None:
            path = config_flags.get_config_filename(flag).split(":", 1)[0]
            if not os.path.isfile(path):
                raise errors.UserError(f"--{name}={path}: config file not found (relative to {os.getcwd()})")
    return rest
