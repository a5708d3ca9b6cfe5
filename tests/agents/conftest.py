"""Session fixtures for the agent tests: one compiled cheetah runner per backend, shared by all.

Compilation dominates on CPU (the runner's program holds the env step and the SAC update: about
10 s on the `mujoco` backend, 50–130 s on MJX), so all runner tests, the SAC-learns test
included, use this one RunnerConfig: A = 2 agents × N = 4 envs, chunks of 251 iterations (one
250-step episode per chunk), the smoke preset's 2×64 networks and batch 64, and 4 updates per
iteration (1 per env step). Episode length and every other scenario property are data, so the
tests' different env params reuse the same program.

The tests about the runner itself run on the `mujoco` backend (`runner`, `trained`); those about
the backends take `runners(backend)` and `trained_runs(backend)`, which compile a backend's
program on first use.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import scenarios

A, N = 2, 4  # agents, envs per agent
CHUNK = 251
CONFIG = runner_lib.RunnerConfig(
  domain="cheetah",
  num_envs=N,
  num_agents=A,
  chunk=CHUNK,
  replay_capacity=50_000,
  updates_per_iter=4,
  sac=sac_lib.SACConfig(hidden=(64, 64), batch_size=64),
)
# The backends: MJX's variant of a test that only repeats the runner's logic is `slow`.
BACKENDS = ["mujoco", pytest.param("mjx", marks=pytest.mark.slow)]


def copy(tree):
  """A host copy of a pytree (what saving it would write); pass it to `run` to restore it."""
  return jax.tree.map(np.array, jax.device_get(tree))


def cheetah_params(runner, episode_length: int, beta: float = 0.5):
  """Default morphology, target speed β · v_max, all A·N members alike."""
  scenario = scenarios.Scenario("cheetah", 1.0, 1.0, beta)
  return runner.env.make_params([scenario] * (A * N), episode_length=episode_length)


def _cached(make):
  cache = {}

  def get(backend: str):
    if backend not in cache:
      cache[backend] = make(backend)
    return cache[backend]

  return get


@pytest.fixture(scope="session")
def runners():
  """`runners(backend)`: the session's cheetah runner on 'mjx' or 'mujoco'."""
  return _cached(lambda b: runner_lib.make_runner(env_lib.make_env("cheetah", backend=b), CONFIG))


@pytest.fixture(scope="session")
def runner(runners) -> runner_lib.Runner:
  return runners("mujoco")


@pytest.fixture(scope="session")
def short_params(runner):
  """Episodes of 20 control steps: 21 records each, crossing chunk boundaries."""
  return cheetah_params(runner, 20)


@pytest.fixture(scope="session")
def trained_runs(runners):
  """`trained_runs(backend)`: two TRAIN chunks from `init(key 0)` at 20-step episodes (random
  for the first 200 env steps per agent).

  Returns host copies: (initial state, final state, [out_1, out_2]).
  """

  def make(backend):
    runner = runners(backend)
    params = cheetah_params(runner, 20)
    state = runner.init(params, jax.random.PRNGKey(0))
    initial = copy(state)
    controls = runner_lib.make_controls("train", random_steps=200)
    outs = []
    for _ in range(2):
      state, out = runner.run(state, params, controls)
      outs.append(copy(out))
    return initial, copy(state), outs

  return _cached(make)


@pytest.fixture(scope="session")
def trained(trained_runs):
  return trained_runs("mujoco")
