"""Session-scoped env fixtures: one jitted `initial` and `step` per domain and backend at batch N.

Every env test that steps physics uses these programs (scenarios, observation functions and
episode length are data), so each domain compiles once per backend and session (and once per
machine with the persistent compilation cache): MJX programs take 30–130 s to compile on this
CPU, the `mujoco` backend's a few seconds. Tests about the env run on both backends through the
`backend` fixture; tests about MJX itself (its batched models, contacts, `data._impl`) pin
`stepper(domain, "mjx")` and say so.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import scenarios, specs

N = 20  # batch size of every physics test
BACKENDS = ("mjx", "mujoco")


class Stepper:
  """A domain's env on one backend with its shared jitted programs and a trace counter."""

  def __init__(self, domain: str, backend: str):
    self.env = env_lib.make_env(domain, backend=backend)
    self.traces = 0

    def step(params, state, action):
      self.traces += 1
      return self.env.step(params, state, action)

    self.step = jax.jit(step)
    self.initial = jax.jit(self.env.initial)

  def reset(self, params, key):
    return self.step(params, self.initial(params, key), np.zeros((N, self.env.domain.act_dim)))

  def params(self, scenario_list=None, seed: int = 0, **kwargs):
    if scenario_list is None:
      dist = scenarios.get_distribution("c", "train")
      scenario_list = dist.sample(np.random.default_rng(seed), self.env.domain.name, N)
    assert len(scenario_list) == N
    return self.env.make_params(scenario_list, **kwargs)


@functools.cache
def stepper(domain: str, backend: str) -> Stepper:
  return Stepper(domain, backend)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
  return request.param


@pytest.fixture(scope="session", params=specs.DOMAIN_NAMES)
def domain_stepper(request, backend) -> Stepper:
  return stepper(request.param, backend)
