"""XManager launcher: one work unit per sweep point (seeds × settings × methods).

  # on this machine, in Docker (the `local` executor)
  xmanager launch launch/xm_launch.py -- --entry=pretrain --preset=smoke --seeds=0,1 \
      --settings=a --methods=mrcom --root=/tmp/mrcom
  # on Vertex AI (the `vertex` executor): runs under a GCS-mounted root
  xmanager launch launch/xm_launch.py -- --entry=adapt --executor=vertex --accelerator=A100 \
      --seeds=0,1,2,3,4 --settings=a,b,c,d --methods=mrcom,no_rollouts --root=/gcs/BUCKET/mrcom

The sweep (`launch/sweep.py`) gives each point its argument list in the order ml_collections
requires and a workdir derived from its name, so a relaunched work unit resumes. Every argument
list is checked with the entry point's own flag parser before anything is packaged. The shared
data directory (`<root>/data`) must exist first: `--entry=collect` launches the one collection
job. `define_experiment` is separate from `main`, so it can be given any `xm.Experiment`.
"""

from __future__ import annotations

import os

from absl import app, flags
from xmanager import xm, xm_local

from launch import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_IMAGE = "python:3.12"
EXECUTORS = ("local", "vertex")

_ENTRY = flags.DEFINE_enum("entry", "pretrain", (*sweep.ENTRIES, "collect"), "Entry point.")
_PRESET = flags.DEFINE_string("preset", "default", "Config preset (default, smoke, ...).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Experiment seeds.")
_SETTINGS = flags.DEFINE_list("settings", ["a"], "Settings (a-d); pretraining maps them to data.")
_METHODS = flags.DEFINE_list("methods", ["mrcom"], f"Methods: {', '.join(sweep.METHODS)}.")
_OBS_FNS = flags.DEFINE_list("obs_fns", ["none"], "Observation functions (Table 3).")
_KINDS = flags.DEFINE_list("kinds", ["mix"], "Dataset kinds (Table 5).")
_DOMAINS = flags.DEFINE_list(
  "domains", [sweep.ALL_DOMAINS], "'' one model on every domain; or one per domain (Table 4)."
)
_TABLE = flags.DEFINE_enum("table", "", ("", *sweep.TABLES), "A table's dimensions instead.")
_ROOT = flags.DEFINE_string("root", None, "Runs root: workdirs and the shared data directory.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", EXECUTORS, "Where the work units run.")
_ACCELERATOR = flags.DEFINE_string("accelerator", "", "e.g. A100, V100, TPU_V4 ('' = none).")
_COUNT = flags.DEFINE_integer("accelerator_count", 1, "Accelerators per work unit.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every point.")
_TITLE = flags.DEFINE_string("title", "", "Experiment title ('' = derived from the sweep).")


def packageable(entry: str, executor: str) -> xm.Packageable:
  """The repository as a Python container whose entrypoint is `experiments.<entry>`."""
  spec = xm_local.Local.Spec() if executor == "local" else xm_local.Vertex.Spec()
  extra = "cuda" if executor == "vertex" else "dev"
  return xm.python_container(
    executor_spec=spec,
    path=REPO,
    base_image=BASE_IMAGE,
    entrypoint=xm.ModuleName(f"experiments.{entry}"),
    use_deep_module=True,
    docker_instructions=[
      "RUN mkdir /workdir",
      "WORKDIR /workdir",
      f"COPY {os.path.basename(REPO)}/ /workdir",
      f"RUN pip install --no-cache-dir -e '.[{extra}]'",
    ],
  )


def executor(kind: str, accelerator: str = "", count: int = 1) -> xm.Executor:
  """A Local (Docker) or Vertex AI executor asking for `count` accelerators."""
  if kind not in EXECUTORS:
    raise ValueError(f"unknown executor {kind!r}: choose one of {EXECUTORS}")
  if kind == "local":
    requirements = xm.JobRequirements(local_gpu=count) if accelerator else xm.JobRequirements()
    return xm_local.Local(requirements=requirements)
  requirements = xm.JobRequirements(**{accelerator: count}) if accelerator else xm.JobRequirements()
  return xm_local.Vertex(requirements=requirements)


def define_experiment(
  experiment: xm.Experiment, entry: str, jobs: list[tuple[str, list[str]]], job_executor
) -> None:
  """Packages `experiments.<entry>` once and adds one work unit per (name, argument list)."""
  kind = "local" if isinstance(job_executor, xm_local.Local) else "vertex"
  [executable] = experiment.package([packageable(entry, kind)])
  for name, args in jobs:
    experiment.add(xm.Job(executable=executable, executor=job_executor, name=name, args=args))


def sweep_jobs(entry: str, points: list[sweep.Point]) -> list[tuple[str, list[str]]]:
  """(name, argument list) per point; every list is checked by the entry point's parser."""
  jobs = []
  for p in points:
    args = p.args()
    sweep.check_args(entry, args)
    jobs.append((p.name, args))
  return jobs


def _overrides(items: list[str]) -> dict[str, str]:
  try:
    return sweep.parse_overrides(items)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _ROOT.value:
    raise app.UsageError("--root is required (where workdirs and the shared data live)")
  entry = _ENTRY.value
  os.chdir(REPO)  # config paths in the argument lists are relative to the repository
  if entry == "collect":
    backend = _overrides(_SET.value).get("env.backend", "")  # the rest are the points' fields
    jobs = [("collect", sweep.collect_args(_ROOT.value, _PRESET.value, backend))]
  else:
    seeds, extra = [int(s) for s in _SEEDS.value], _overrides(_SET.value)
    try:
      if _TABLE.value:
        points = sweep.table_points(
          _TABLE.value, entry, seeds, _ROOT.value, _PRESET.value, extra, _METHODS.value
        )
      else:
        points = sweep.points(
          entry, seeds, _SETTINGS.value, _METHODS.value, _ROOT.value, _PRESET.value, extra,
          _OBS_FNS.value, _KINDS.value, _DOMAINS.value or [sweep.ALL_DOMAINS],
        )  # fmt: skip
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    jobs = sweep_jobs(entry, points)
  title = _TITLE.value or f"mrcom {entry} {_PRESET.value} ({len(jobs)} work units)"
  job_executor = executor(_EXECUTOR.value, _ACCELERATOR.value, _COUNT.value)
  with xm_local.create_experiment(experiment_title=title) as experiment:
    define_experiment(experiment, entry, jobs, job_executor)


if __name__ == "__main__":
  app.run(main)
