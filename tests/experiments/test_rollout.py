"""The rollout demo end to end on a tiny batch, and its config errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from experiments import rollout
from experiments.configs import rollout as rollout_config


def test_presets_build_and_are_locked():
  for preset in rollout_config.PRESETS:
    c = rollout_config.get_config(preset)
    rollout.validate(c)
    with pytest.raises(AttributeError):
      c.not_a_field = 1
  assert rollout_config.get_config("smoke").num_envs == 4


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("num_envs", -1, "config.num_envs=-1 must be ≥ 1"),
    ("domains", ("hopper", "ant"), "unknown domain 'ant'"),
    ("obs_fn", "blur", "unknown observation function 'blur'"),
    ("setting", "z", "unknown setting 'z'"),
    ("mass_rule", "volume", "unknown mass_rule 'volume'"),
    ("env.backend", "gpu", r"config.env.backend='gpu' must be one of \('auto', 'mjx', 'mujoco'\)"),
  ],
)
def test_bad_config_fails_before_compiling(field, value, message):
  c = rollout_config.get_config("smoke")
  *path, leaf = field.split(".")
  node = c
  for part in path:
    node = node[part]
  setattr(node, leaf, value)
  with pytest.raises(ValueError, match=message):
    rollout.validate(c)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    rollout_config.get_config("huge")


def test_run_simulates_plots_and_records_the_backend(tmp_path):
  c = rollout_config.get_config("smoke")
  c.domains, c.num_envs, c.steps, c.chunk = ("cheetah",), 2, 6, 3
  summary = rollout.run(c, str(tmp_path), verbose=False)
  r = summary["cheetah"]
  assert len(r["return"]) == 2 and r["episodes_started"] == 2 and r["divergences"] == 0
  assert np.isfinite(r["return"]).all() and r["env_steps_per_s"] > 0
  assert all(0.6 <= s["alpha_len"] <= 1.4 for s in r["scenarios"])
  assert os.path.getsize(tmp_path / "rollout.png") > 10_000
  # the default backend, auto, resolved: mujoco on a CPU, mjx on a GPU or TPU
  backend = "mujoco" if jax.default_backend() == "cpu" else "mjx"
  assert summary["_meta"]["env_backend"] == backend
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["env"]["backend"] == "auto"
