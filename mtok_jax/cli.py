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

import argparse
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from mtok_jax import config_utils, errors

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
            return None  # exit codes (argparse has printed its message, --help exits 0)
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
    """Run an argparse entry point `main(argv)` (parser: :class:`ArgumentParser`) and exit with its int
    result (0 for anything else), or 2 after one line for an expected error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    result = guarded(main, argv, verbose=wants_verbose(argv))
    sys.exit(result if isinstance(result, int) else 0)


def run_absl(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` with a `--verbose` flag and one-line errors, also for flag parsing (a bad
    flag value, an unknown `--config.*` key, a missing `--config` file)."""
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    verbose = wants_verbose(sys.argv[1:])
    app.run(lambda argv: guarded(main, argv, verbose=verbose),
            flags_parser=lambda argv: guarded(_parse_absl_flags, argv, verbose=verbose))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that accepts `--verbose` (read by :func:`run`, also in subcommands) and prints a usage
    error as one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def existing_file(path: str) -> str:
    """argparse `type=` for an input file: a missing one is a one-line usage error."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def existing_dir(path: str) -> str:
    """argparse `type=` for an input folder: a missing one is a one-line usage error."""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"no such folder: {path}")
    return path


def define_config_file(name: str, default: str, help_string: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file(..., lock_config=True)` with one-line errors: with a default it
    loads that config and applies the `--NAME.*` overrides of sys.argv right here, at import time."""
    return guarded(_config_flag_call, config_flags.DEFINE_config_file, sys.argv[1:], name, default,
                   help_string, lock_config=True, verbose=wants_verbose(sys.argv[1:]))


def _parse_absl_flags(argv: list[str]) -> list[str]:
    rest = _config_flag_call(flags.FLAGS, argv[1:], argv)
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if isinstance(flag.parser, ConfigFileFlagParser):
            path = config_flags.get_config_filename(flag).split(":", 1)[0]
            if not os.path.isfile(path):
                raise errors.UserError(f"--{name}={path}: config file not found (relative to {os.getcwd()})")
    return rest


def _config_flag_call(fn: Callable[..., Any], args: Sequence[str], *fn_args: Any, **fn_kwargs: Any) -> Any:
    """`fn(*fn_args, **fn_kwargs)`; config_flags' KeyError / AttributeError for an unknown `--config.a.name`
    key in `args` (message: 'name', then `Did you mean "x"`) becomes a ConfigError naming the whole key."""
    try:
        return fn(*fn_args, **fn_kwargs)
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args else e
        text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
        match = re.match(r"'([^']*)'", text)
        guess = re.search(r'Did you mean "([^"]+)"', text)
        for arg in args:
            key = re.match(r"-{1,2}\w+\.([\w.]+)", arg)
            if match and key and match.group(1) in key.group(1).split("."):
                parts = key.group(1).split(".")
                suggestion = guess and ".".join(guess.group(1) if p == match.group(1) else p for p in parts)
                raise config_utils.unknown_key_error(key.group(1), suggestion or None) from e
        raise
