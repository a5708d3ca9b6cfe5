"""Command-line flags shared by the entry points that take a config file and a run directory, and
how they report bad input: one line naming the field, the value and the fix, never a traceback.
"""

from __future__ import annotations

import difflib
import json
import sys

from absl import flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_flags as config_files

from mrcom_jax.training import checkpoint

# World-model fields that do not change what a checkpoint holds or computes (compile choices).
_NOT_THE_MODEL = ("scan_unroll",)


class BadInput(ValueError):
  """A command line that names no config field or has a value its flag cannot parse."""


def unknown_field(config, path: str) -> str | None:
  """The message for an override `--config.<path>` that names no field of `config`, with the
  closest field's name (difflib); None when `path` names a field."""
  node, done = config, []
  for part in path.split("."):
    keys = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
    if part not in keys:
      where = ".".join(["config", *done])
      close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
      hint = (
        f"did you mean --config.{'.'.join([*done, close[0]])}?"
        if close
        else f"its fields are {', '.join(sorted(keys))}"
        if keys
        else f"{where} is a value, not a section"
      )
      return f"--config.{path}: {where} has no field {part!r}; {hint}"
    node = node[part]
    done.append(part)
  return None


def _field_error(argv, default_config: str | None, error: Exception) -> str:
  """The one-line message for an override that names no field (ml_collections raised `error`)."""
  path = next((a.removeprefix("--config=") for a in argv if a.startswith("--config=")), None)
  config = config_files.ConfigFileFlagParser("config").parse(path or default_config)
  for a in argv[1:]:
    if a.startswith("--config."):
      message = unknown_field(config, a.removeprefix("--config.").split("=", 1)[0])
      if message:
        return message
  return f"unknown config field: {str(error).splitlines()[0]}"


def _one_line(error: Exception) -> str:
  """A flag error on one line: its first line, and the error at the end of a traceback that
  ml_collections folds into the message (an unknown preset, a config file that raises)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    return f"{lines[0].rstrip(':')}: {lines[-1]}"
  return lines[0] if lines else type(error).__name__


def parse(define_flags, flag_values, argv, default_config: str | None = None):
  """Defines an entry point's flags on `flag_values` (`define_flags(flag_values, argv)`) and
  parses `argv` with them.

  Returns:
    (what `define_flags` returned, the arguments left after the flags: the program name first).

  Raises:
    BadInput: an override names no field (the message suggests the closest one) or a value does
      not parse; one line.
  """
  try:
    holders = define_flags(flag_values, argv)  # overrides are read here when --config is absent
    rest = flag_values(argv)
  except flags.Error as e:
    raise BadInput(_one_line(e)) from None
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    raise BadInput(_field_error(argv, default_config, e)) from None
  return holders, rest


def run(main, define_flags, default_config: str) -> None:
  """`app.run(main)` for an entry point whose `define_flags()` defines its flags globally: a
  command line with an unknown field or an unparsable value exits with one line ('error: ...')
  instead of a traceback."""
  from absl import app

  def parse_or_exit(argv):
    try:
      return parse(lambda fv, a: define_flags(), flags.FLAGS, argv, default_config)[1]
    except BadInput as e:
      sys.exit(f"error: {e}")

  app.run(main, flags_parser=parse_or_exit)


def exit_on_bad_input(check, *args) -> None:
  """Runs an entry point's input checks (`check(*args)`): a bad field, value or path exits with
  its message on one line ('error: ...') instead of a traceback, before anything runs."""
  try:
    check(*args)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    sys.exit(f"error: {e}")


def world_model_differences(saved: dict, requested) -> list[tuple[str, object, object]]:
  """(field, saved value, requested value) for every world-model field in which a run's saved
  `world_model` config (its config.json) and `requested` (a ConfigDict) differ; fields that
  change no number (`scan_unroll`) are left out. Nested fields are dotted ('model_opt.lr')."""
  a = checkpoint.flat_config(saved)
  b = checkpoint.flat_config(json.loads(json.dumps(requested.to_dict())))
  return [
    (k, a.get(k), b.get(k))
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k) and k not in _NOT_THE_MODEL
  ]


def define_run_flags(
  config_file: str,
  config_help: str,
  workdir: str,
  workdir_help: str,
  flag_values=flags.FLAGS,
  sys_argv=None,
):
  """`--config` (an ml_collections config file, preset after ':') and `--workdir`.

  Launchers and tests check an argument list with a fresh `flags.FlagValues()` and
  `sys_argv=[prog, *args]` (ml_collections reads the `--config.*` overrides from it).

  Returns:
    (the config flag holder, the workdir flag holder).
  """
  config = config_flags.DEFINE_config_file(
    "config", config_file, config_help, flag_values=flag_values, sys_argv=sys_argv
  )
  run_dir = flags.DEFINE_string("workdir", workdir, workdir_help, flag_values=flag_values)
  return config, run_dir


class RunFlags:
  """An entry point's `--config` and `--workdir`, defined only when it runs as a program (so the
  module imports cleanly).

  `define()` defines them on the global flags and keeps the holders (`config`, `workdir`) for
  `main`; `define(flag_values, sys_argv)` defines them on other flags (launchers check an
  argument list that way) and keeps nothing.
  """

  def __init__(self, config_file: str, config_help: str, workdir: str, workdir_help: str):
    self._spec = (config_file, config_help, workdir, workdir_help)
    self.config = self.workdir = None

  def define(self, flag_values=flags.FLAGS, sys_argv=None):
    """Returns (the config flag holder, the workdir flag holder)."""
    config, workdir = define_run_flags(*self._spec, flag_values, sys_argv)
    if flag_values is flags.FLAGS:
      self.config, self.workdir = config, workdir
    return config, workdir
