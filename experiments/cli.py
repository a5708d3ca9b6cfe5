"""Command-line flags shared by the entry points that take a config file and a run directory."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


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
