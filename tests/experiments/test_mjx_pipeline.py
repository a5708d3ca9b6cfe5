"""The pipeline on the `mjx` backend: collection → pretraining → adaptation for one domain.

The default run covers the pipeline on the default backend (`auto`: mujoco on a CPU) through the
session fixtures; MJX's own runner and adaptation-program coverage lives in tests/agents and
tests/adaptation. This test is `slow`: on a 2-core CPU every MJX program compiles for 30–100 s
(a runner for the behaviour SAC and the specialists, the adaptation program).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import adapt, collect, pretrain
from mrcom_jax.data import dataset as dataset_lib
from tests.experiments.conftest import adapt_config, pipeline_config


@pytest.mark.slow
def test_collect_pretrain_and_adapt_on_mjx(tmp_path):
  workdir = str(tmp_path / "pretrain")
  c = pipeline_config(**{"env.backend": "mjx", "data.domains": ("cheetah",),
                         "train.num_updates": 100, "train.checkpoint_every": 100})  # fmt: skip
  run = pretrain.pretrain(c, workdir, verbose=False)
  assert run.step == 100 and run.summary["env_backend"] == "mjx"
  assert run.summary["data_backends"] == {"cheetah": "mjx"}
  assert np.isfinite(list(run.summary["domains"]["cheetah"].values())).all()
  data = os.path.join(workdir, "data")
  mix = dataset_lib.Dataset.open(collect.dataset_path(data, "narrow", "cheetah", "mix"))
  assert mix.info["backend"] == "mjx" and mix.num_records > 0
  for job in (("behaviour", "narrow", "cheetah"), ("random", "cheetah"),
              ("specialists", "cheetah", "lists")):  # fmt: skip
    with open(os.path.join(data, *job, collect.BACKEND_FILE)) as f:
      assert json.load(f) == {"backend": "mjx"}, job
  overrides = {"env.backend": "mjx", "adapt.real_steps": 500, "eval.every": 250,
               "run.checkpoint_every": 250, "adapt.random_steps": 250}  # fmt: skip
  result = adapt.adapt(adapt_config(workdir, **overrides), str(tmp_path / "adapt"), verbose=False)
  assert all(env.backend == "mjx" for env in result.program.envs)
  rows = result.results["rows"]
  assert [r["env_backend"] for r in rows] == ["mjx", "mjx"]
  assert all(np.isfinite(r["return"]) and r["real_steps"] == 500 for r in rows)
  with open(os.path.join(result.workdir, "run_info.json")) as f:
    assert json.load(f)["invocations"][-1]["env_backend"] == "mjx"
