"""Sweeps of the paper's protocol as argument lists for the entry points (shared by launchers).

A sweep is the product seeds × settings × methods for one entry point (`pretrain` or `adapt`).
Each point becomes one job (a Slurm script or an XManager work unit) whose arguments are in the
order `ml_collections` requires: `--config=<file>:<preset>` first, then `--config.<field>=...`
overrides, then `--workdir`. Workdirs are derived from the point's name under one root, so a
requeued or re-launched job finds its checkpoints and resumes.

- `pretrain` points: the setting picks the training distribution (a, b → narrow; c, d → wide),
  so settings that share a distribution share one pretraining run (deduplicated).
- `adapt` points: adapt to the setting's evaluation list, from the pretraining run of the same
  seed, distribution and method (`--config.pretrain.workdir`).
- Methods: `mrcom`, the ablations of METHOD.md (world-model switches, applied to pretraining
  and adaptation alike; `no_context` also drops the prompt), and the adaptation controls
  (`no_rollouts`, `own_context`, `finetune`), which reuse the `mrcom` pretraining run.

Every run of a sweep shares one data directory (`<root>/data`, made once with seed 0, PROTOCOL.md):
make it first with `python -m experiments.collect` (the launchers' `collect_args`).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools

ENTRIES = ("pretrain", "adapt")
CONFIGS = {"pretrain": "experiments/configs/meta.py", "adapt": "experiments/configs/adapt.py"}
DISTRIBUTION = {"a": "narrow", "b": "narrow", "c": "wide", "d": "wide"}
ABLATIONS = ("no_deterministic", "no_context", "no_meta_state", "no_meta_value")
CONTROLS = {
  "no_rollouts": {"adapt.model_rollouts": False},
  "own_context": {"adapt.prompt": False},
  "finetune": {"adapt.finetune_world_model": True},
}
METHODS = ("mrcom", *ABLATIONS, *CONTROLS)


def _value(v) -> str:
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, tuple):
    return "(" + ",".join(str(x) for x in v) + ",)"
  return str(v)


def _world_model(method: str) -> dict:
  return {f"world_model.{method}": True} if method in ABLATIONS else {}


@dataclasses.dataclass(frozen=True)
class Point:
  """One job of a sweep."""

  entry: str  # 'pretrain' or 'adapt'
  preset: str  # the config file's preset ('default', 'smoke', ...)
  seed: int
  setting: str
  method: str
  root: str  # runs root: workdirs and the shared data directory live under it
  extra: tuple[tuple[str, object], ...] = ()  # overrides added to every point

  @property
  def distribution(self) -> str:
    return DISTRIBUTION[self.setting[0]]

  @property
  def pretrain_method(self) -> str:
    return "mrcom" if self.method in CONTROLS else self.method

  @property
  def pretrain_point(self) -> Point:
    """The pretraining run this point's adaptation starts from (itself for a pretraining point)."""
    return dataclasses.replace(self, entry="pretrain", method=self.pretrain_method)

  @property
  def name(self) -> str:
    if self.entry == "pretrain":
      return f"pretrain-{self.distribution}-{self.method}-s{self.seed}"
    return f"adapt-{self.setting}-{self.method}-s{self.seed}"

  @property
  def workdir(self) -> str:
    return f"{self.root}/{self.name}"

  def overrides(self) -> dict:
    out = {}
    if self.entry == "pretrain":
      out["seed"] = self.seed
      out["data.dir"] = f"{self.root}/data"
      out["data.distribution"] = self.distribution
      out.update(_world_model(self.method))
    else:
      out["seeds"] = (self.seed,)
      out["target.setting"] = self.setting
      out["pretrain.workdir"] = self.pretrain_point.workdir
      out["data_dir"] = f"{self.root}/data"
      out.update(_world_model(self.method))
      if self.method == "no_context":
        out["adapt.prompt"] = False
      out.update(CONTROLS.get(self.method, {}))
    out.update(dict(self.extra))
    return out

  def args(self, workdir: str | None = None) -> list[str]:
    """The entry point's arguments: config file first, then overrides, then the workdir."""
    config = CONFIGS[self.entry] + ("" if self.preset == "default" else f":{self.preset}")
    overrides = [f"--config.{k}={_value(v)}" for k, v in self.overrides().items()]
    return [f"--config={config}", *overrides, f"--workdir={workdir or self.workdir}"]

  def command(self, python: str = "python", workdir: str | None = None) -> list[str]:
    return [python, "-m", f"experiments.{self.entry}", *self.args(workdir)]


def points(
  entry: str,
  seeds,
  settings,
  methods,
  root: str,
  preset: str = "default",
  extra: dict | None = None,
) -> list[Point]:
  """The sweep's points in a stable order; pretraining points are deduplicated by name."""
  if entry not in ENTRIES:
    raise ValueError(f"unknown entry {entry!r}: choose one of {ENTRIES}")
  for s in settings:
    if s[0] not in DISTRIBUTION:
      raise ValueError(f"unknown setting {s!r}: choose from {sorted(DISTRIBUTION)}")
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"unknown method {m!r}: choose one of {METHODS}")
    if entry == "pretrain" and m in CONTROLS:
      raise ValueError(f"method {m!r} is an adaptation control: it has no pretraining run")
  extra = tuple(sorted((extra or {}).items()))
  out, seen = [], set()
  for seed, setting, method in itertools.product(seeds, settings, methods):
    p = Point(entry, preset, int(seed), setting, method, root.rstrip("/"), extra)
    if p.name not in seen:
      seen.add(p.name)
      out.append(p)
  return out


def parse_overrides(items: list[str]) -> dict[str, str]:
  """The launchers' `--set KEY=VALUE` items as overrides for every point. Values stay text: the
  entry point's config flags parse them (`--config.KEY=VALUE`).

  Raises:
    ValueError: an item without '=' or without a key.
  """
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE (e.g. train.num_updates=2000)")
    out[key] = value
  return out


def collect_args(root: str, preset: str = "default") -> list[str]:
  """`experiments.collect`'s arguments for the sweep's shared data directory."""
  config = "experiments/configs/collect.py" + ("" if preset == "default" else f":{preset}")
  return [f"--config={config}", f"--data_dir={root.rstrip('/')}/data"]


def check_args(entry: str, args: list[str]):
  """Parses `args` with the entry point's own flags and validates the config, as the job would
  (config paths are relative to the repository root). Returns (config, workdir); raises the
  entry point's error (an unknown field, a bad value) otherwise."""
  from absl import flags

  module = importlib.import_module(f"experiments.{entry}")
  flag_values = flags.FlagValues()
  argv = [f"experiments.{entry}", *args]
  config, workdir = module.define_flags(flag_values, argv)
  flag_values(argv)
  module.validate(config.value)
  return config.value, workdir.value
