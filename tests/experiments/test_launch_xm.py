"""The XManager launcher builds its experiment and work units without launching them: the
experiment is xmanager's own `xm_mock.MockExperiment` (it records jobs instead of running them),
the jobs and executors are xmanager's objects, and every argument list is accepted by the entry
point's flag parser."""

from __future__ import annotations

import os

import pytest
from xmanager import xm, xm_local, xm_mock  # the [launch] extra, which bin/test installs
from xmanager.xm import utils

from launch import sweep, xm_launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("entry", sweep.ENTRIES)
@pytest.mark.parametrize("kind, accelerator", [("local", ""), ("vertex", "A100")])
def test_one_work_unit_per_point_with_accepted_arguments(entry, kind, accelerator, monkeypatch):
  monkeypatch.chdir(REPO)
  methods = ["mrcom", "no_context"] + (["no_rollouts"] if entry == "adapt" else [])
  points = sweep.points(entry, [0, 1], ["a", "d"], methods, "/gcs/bucket/mrcom")
  jobs = xm_launch.sweep_jobs(entry, points)  # each list parsed by the entry point's flags
  job_executor = xm_launch.executor(kind, accelerator, 2)
  with xm_mock.MockExperiment() as experiment:
    xm_launch.define_experiment(experiment, entry, jobs, job_executor)
  assert experiment.work_unit_count == len(points)
  launched = experiment.launched_jobs
  assert all(isinstance(j, xm.Job) for j in launched)
  for p, job in zip(points, launched):
    assert job.name == p.name
    args = job.args.to_list(escaper=utils.ARGV_ESCAPER)
    assert args == p.args()  # --config first, overrides next, --workdir last
    assert args[0].startswith("--config=experiments/configs/")
    sweep.check_args(entry, args)
  executor_type = xm_local.Local if kind == "local" else xm_local.Vertex
  assert isinstance(launched[0].executor, executor_type)
  if accelerator:
    assert "a100" in repr(launched[0].executor.requirements).lower()
  spec = xm_launch.packageable(entry, kind)
  assert spec.executable_spec.entrypoint.module_name == f"experiments.{entry}"
  assert isinstance(spec.executor_spec, executor_type.Spec)


def test_a_bad_override_fails_before_packaging(monkeypatch):
  monkeypatch.chdir(REPO)
  points = sweep.points("pretrain", [0], ["a"], ["mrcom"], "/r", extra={"train.bogus": 1})
  with pytest.raises(Exception, match="bogus"):
    xm_launch.sweep_jobs("pretrain", points)
  with pytest.raises(ValueError, match="unknown executor"):
    xm_launch.executor("slurm")
