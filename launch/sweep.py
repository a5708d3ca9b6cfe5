"""Sweeps of the paper's protocol as argument lists for the entry points (shared by launchers).

A sweep is the product seeds × settings × methods × observation functions × dataset kinds ×
domain groups for one entry point (`pretrain` or `adapt`). Each point becomes one job (a Slurm
script or an XManager work unit) whose arguments are in the order `ml_collections` requires:
`--config=<file>:<preset>` first, then `--config.<field>=...` overrides, then `--workdir`.
Workdirs are derived from the point's name under one root, so a requeued or re-launched job finds
its checkpoints and resumes.

- `pretrain` points: the setting picks the training distribution (PROTOCOL.md, Settings and the
  experiments table; `experiments.collect.EVAL_SETTINGS` read backwards): a, b → narrow; c, d →
  wide; a@0.8 … d@0.8 → narrow_beta0.8 / wide_beta0.8 (Table 2); fixed → fixed (Table 5).
  A pretraining run's name holds everything that makes it another model: distribution, dataset
  kind (Table 5), observation function (Table 3), domains (Table 4), method and seed, so the
  tables of one root never share a run by accident; settings that share all of them share one
  run (deduplicated).
- `adapt` points: adapt to the setting's evaluation list, from the pretraining run of the same
  seed, distribution, kind, observation function, domains and method (`--config.pretrain.workdir`).
- Methods: `mrcom`, the ablations of METHOD.md (world-model switches, applied to pretraining
  and adaptation alike; `no_context` also drops the prompt), and the adaptation controls
  (`no_rollouts`, `own_context`, `finetune`), which reuse the `mrcom` pretraining run.
- `TABLES` holds each experiment's dimensions (`table_points`).

Every run of a sweep shares one data directory (`<root>/data`, made once with seed 0, PROTOCOL.md):
make it first with `python -m experiments.collect` (the launchers' `collect_args`).

Simulation backend: every entry point has `env.backend` (default `auto`: `mjx` on a GPU or TPU
node, `mujoco` on a CPU-only one), so a sweep normally sets nothing; `--set env.backend=mjx`
pins it for every point and the collect job alike (`collect_args(..., backend=...)`).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools

from experiments import collect
from mrcom_jax.envs import obs_functions

ENTRIES = ("pretrain", "adapt")
CONFIGS = {"pretrain": "experiments/configs/meta.py", "adapt": "experiments/configs/adapt.py"}
# setting → training distribution: the evaluation settings of each distribution, read backwards
DISTRIBUTION = {s: dist for dist, ss in collect.EVAL_SETTINGS.items() for s in ss}
ALL_DOMAINS = ""  # a Point's `domains` for the one world model on every domain (Tables 1–3, 5)
ABLATIONS = ("no_deterministic", "no_context", "no_meta_state", "no_meta_value")
CONTROLS = {
  "no_rollouts": {"adapt.model_rollouts": False},
  "own_context": {"adapt.prompt": False},
  "finetune": {"adapt.finetune_world_model": True},
}
METHODS = ("mrcom", *ABLATIONS, *CONTROLS)
# Each experiment's dimensions (PROTOCOL.md, the experiments table); unnamed ones keep the
# defaults (kind mix, observation function none, one model on every domain).
TABLES = {
  "table1": dict(settings=("a", "b", "c", "d")),
  "table2": dict(settings=("a@0.8", "b@0.8", "c@0.8", "d@0.8")),
  "table3": dict(settings=("a",), obs_fns=obs_functions.OBS_FUNCTIONS[1:]),
  "table4": dict(settings=("a", "b", "c", "d"), domains=collect.DOMAINS),
  "table5": dict(settings=("fixed",), kinds=collect.DATASET_KINDS),
  "figure3": dict(settings=("a", "d"), methods=("mrcom", *ABLATIONS)),
}


def _value(v) -> str:
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, tuple):  # a Python literal, as the config flags parse it: (0,) or ('hopper',)
    return "(" + ",".join(repr(x) for x in v) + ",)"
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
  obs_fn: str = "none"  # observation function (Table 3); it belongs to the world model
  kind: str = "mix"  # behaviour dataset the world model is trained on (Table 5)
  domains: str = ALL_DOMAINS  # one domain: a world model of that domain alone (Table 4)

  @property
  def distribution(self) -> str:
    return DISTRIBUTION[self.setting]

  @property
  def pretrain_method(self) -> str:
    return "mrcom" if self.method in CONTROLS else self.method

  @property
  def pretrain_point(self) -> Point:
    """The pretraining run this point's adaptation starts from (itself for a pretraining point)."""
    return dataclasses.replace(self, entry="pretrain", method=self.pretrain_method)

  @property
  def model(self) -> str:
    """What makes the world model another one: data kind, observation function, domains."""
    return f"{self.kind}-{self.obs_fn}-{self.domains or 'all'}"

  @property
  def name(self) -> str:
    if self.entry == "pretrain":
      return f"pretrain-{self.distribution}-{self.model}-{self.method}-s{self.seed}"
    return f"adapt-{self.setting}-{self.model}-{self.method}-s{self.seed}"

  @property
  def workdir(self) -> str:
    return f"{self.root}/{self.name}"

  def overrides(self) -> dict:
    out = {}
    if self.entry == "pretrain":
      out["seed"] = self.seed
      out["data.dir"] = f"{self.root}/data"
      out["data.distribution"] = self.distribution
      out["data.kind"] = self.kind
      out["data.obs_fn"] = self.obs_fn
      if self.domains:
        out["data.domains"] = (self.domains,)
      out.update(_world_model(self.method))
    else:
      out["seeds"] = (self.seed,)
      out["target.setting"] = self.setting
      out["target.obs_fn"] = self.obs_fn
      if self.domains:
        out["target.domains"] = (self.domains,)
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
  obs_fns=("none",),
  kinds=("mix",),
  domains=(ALL_DOMAINS,),
) -> list[Point]:
  """The sweep's points in a stable order; pretraining points are deduplicated by name.

  Raises:
    ValueError: an unknown entry, setting, method, observation function, dataset kind or domain
      (the message names it and the choices), or a control method asked to pretrain.
  """
  if entry not in ENTRIES:
    raise ValueError(f"unknown entry {entry!r}: choose one of {ENTRIES}")
  for name, values, known in (
    ("setting", settings, tuple(DISTRIBUTION)),
    ("method", methods, METHODS),
    ("observation function", obs_fns, obs_functions.OBS_FUNCTIONS),
    ("dataset kind", kinds, collect.DATASET_KINDS),
    ("domain", domains, (ALL_DOMAINS, *collect.DOMAINS)),
  ):
    for v in values:
      if v not in known:
        raise ValueError(f"unknown {name} {v!r}: choose one of {known}")
  for m in methods:
    if entry == "pretrain" and m in CONTROLS:
      raise ValueError(f"method {m!r} is an adaptation control: it has no pretraining run")
  extra = tuple(sorted((extra or {}).items()))
  out, seen = [], set()
  grid = itertools.product(seeds, settings, methods, obs_fns, kinds, domains)
  for seed, setting, method, obs_fn, kind, domain in grid:
    p = Point(entry, preset, int(seed), setting, method, root.rstrip("/"), extra, obs_fn, kind,
              domain)  # fmt: skip
    if p.name not in seen:
      seen.add(p.name)
      out.append(p)
  return out


def table_points(
  table: str, entry: str, seeds, root: str, preset: str = "default", extra: dict | None = None,
  methods=("mrcom",),
) -> list[Point]:  # fmt: skip
  """The points of one experiment of PROTOCOL.md (`TABLES`); `methods` unless the table names
  its own (Figure 3: the ablations)."""
  if table not in TABLES:
    raise ValueError(f"unknown table {table!r}: choose one of {tuple(TABLES)}")
  dims = {"methods": methods, **TABLES[table]}
  return points(entry, seeds, root=root, preset=preset, extra=extra, **dims)


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


def collect_args(root: str, preset: str = "default", backend: str = "") -> list[str]:
  """`experiments.collect`'s arguments for the sweep's shared data directory; `backend` ('' =
  the config's, auto) sets `env.backend`, as `--set env.backend=...` does for the points."""
  config = "experiments/configs/collect.py" + ("" if preset == "default" else f":{preset}")
  override = [f"--config.env.backend={backend}"] if backend else []
  return [f"--config={config}", *override, f"--data_dir={root.rstrip('/')}/data"]


def check_args(entry: str, args: list[str]):
  """Parses `args` with the entry point's own flags and validates the config, as the job would
  (config paths are relative to the repository root). Returns (config, workdir); raises the
  entry point's error otherwise (`cli.BadInput` for an unknown field or an unparsable value, one
  line with the closest field; ValueError from `validate`)."""
  from absl import flags

  from experiments import cli

  module = importlib.import_module(f"experiments.{entry}")
  argv = [f"experiments.{entry}", *args]
  (config, workdir), _ = cli.parse(module.define_flags, flags.FlagValues(), argv, CONFIGS[entry])
  module.validate(config.value)
  return config.value, workdir.value
