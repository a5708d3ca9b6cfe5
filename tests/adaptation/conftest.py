"""Session fixtures of the adaptation-program tests: plain-SAC programs on cheetah.

Compilation dominates on CPU (10–20 s per program on the `mujoco` backend, 50–130 s on MJX), so
the tests share three programs: two (scenario, seed) pairs in one call (`plain2`), one pair
(`plain1`, for the one-by-one comparison), both on the `mujoco` backend, and `plain2` on MJX
(`plain2_mjx`, for the comparison of the backends and MJX's exact resume). They take 250-step
episodes, chunks of 250 real steps, no world model and no prompt: the learning threshold, the vmap
equality and exact resume need no pretrained model. The rollout programs are tested on the shared
pretraining run in tests/experiments/test_adapt.py.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.envs import scenarios as scen

EPISODE = 250  # control steps per real episode in these tests
SCENARIO = scen.Scenario("cheetah", 1.0, 1.0, 0.5)  # v* = 0.5 · v_max


def plain_spec(pairs: int, **overrides) -> program_lib.AdaptSpec:
  spec = program_lib.AdaptSpec(
    domains=(("cheetah", pairs),), context_len=8, real_steps=3000, chunk=250,
    updates_per_step=2,
    sac=sac_lib.SACConfig(hidden=(64, 64), actor_lr=1e-4, critic_lr=2e-4, batch_size=64),
    real_ratio=1.0, model_rollouts=False, rollout_every=250, rollout_start=250,
    rollout_starts=16, horizon=5, keep_rounds=5, prompt=False,
    behaviour_sac=sac_lib.SACConfig(hidden=(64, 64)),
  )  # fmt: skip
  return dataclasses.replace(spec, **overrides)


def pair_keys(seeds) -> np.ndarray:
  return np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(s), 2)) for s in seeds])


def params_for(
  program: program_lib.Program,
  seeds,
  random_steps=500,
  update_after=50,
  episode_length=EPISODE,
  scenarios=None,
):
  """AdaptParams of one pair per seed, at `SCENARIO` (or `scenarios`, one per seed)."""
  env = program.envs[0]
  p = env.make_params(scenarios or [SCENARIO] * len(seeds), episode_length=episode_length)
  p = p.replace(stream=np.asarray([1000 + s for s in seeds], np.int32))
  return program.make_params(
    [p], pair_keys(seeds), [0] * len(seeds), random_steps=random_steps, update_after=update_after
  )


@pytest.fixture(scope="session")
def plain2() -> program_lib.Program:
  return program_lib.make_program(plain_spec(2), backend="mujoco")


@pytest.fixture(scope="session")
def plain1() -> program_lib.Program:
  return program_lib.make_program(plain_spec(1), backend="mujoco")


@pytest.fixture(scope="session")
def plain2_mjx() -> program_lib.Program:
  return program_lib.make_program(plain_spec(2), backend="mjx")
