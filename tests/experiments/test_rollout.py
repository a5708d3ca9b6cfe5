"""The rollout demo end to end on a tiny batch, and its config errors."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from tqdm import tqdm

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
  ],
)
def test_bad_config_fails_before_compiling(field, value, message):
  c = rollout_config.get_config("smoke")
  setattr(c, field, value)
  with pytest.raises(ValueError, match=message):
    rollout.validate(c)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    rollout_config.get_config("huge")


def test_simulate_and_plot(tmp_path):
  c = rollout_config.get_config("smoke")
  c.num_envs, c.steps, c.chunk = 2, 6, 3
  with tqdm(total=c.steps, disable=True) as bar:
    r = rollout.simulate(c, "cheetah", jax.random.PRNGKey(0), bar)
  assert len(r["return"]) == 2 and r["episodes_started"] == 2 and r["divergences"] == 0
  assert np.isfinite(r["return"]).all() and r["env_steps_per_s"] > 0
  assert all(0.6 <= s["alpha_len"] <= 1.4 for s in r["scenarios"])
  path = os.path.join(tmp_path, "rollout.png")
  rollout.plot({"cheetah": r}, path, c)
  assert os.path.getsize(path) > 10_000
