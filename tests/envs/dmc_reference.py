"""The reference simulator for parity tests: dm_control's own tasks on our compiled models."""

from __future__ import annotations

import numpy as np
from dm_control.mujoco import wrapper
from dm_control.rl import control
from dm_control.suite import cheetah, hopper, walker

from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import morphology, specs


def make(domain: str, alpha_len=1.0, alpha_size=1.0, seed=0, suite_reward=True):
  """A dm_control Environment running the suite task on one of our (edited) models."""
  spec = specs.get_domain(domain)
  m = env_lib._model(domain, alpha_len, alpha_size, "fixed", morphology.DEFAULT_SOLVER)
  if domain == "hopper":
    physics, task = hopper.Physics.from_model(wrapper.MjModel(m)), hopper.Hopper(True, random=seed)
  elif domain == "walker":
    physics = walker.Physics.from_model(wrapper.MjModel(m))
    task = walker.PlanarWalker(move_speed=walker._RUN_SPEED, random=seed)
  else:
    physics, task = cheetah.Physics.from_model(wrapper.MjModel(m)), cheetah.Cheetah(random=seed)
  del suite_reward
  return control.Environment(
    physics, task, time_limit=float("inf"), control_timestep=spec.control_dt
  )


def flat_obs(ts) -> np.ndarray:
  return np.concatenate([np.atleast_1d(v).ravel() for v in ts.observation.values()])


def quantities(env) -> tuple[float, float, float]:
  """(speed v_x, height, upright) as our env reports them, read from dm_control's physics."""
  p = env.physics
  if isinstance(p, hopper.Physics):
    return p.speed(), p.height(), 1.0
  if isinstance(p, walker.Physics):
    return p.horizontal_velocity(), p.torso_height(), p.torso_upright()
  return p.speed(), p.named.data.xpos["torso", "z"], 1.0


def gait(t_step: int, d_a: int, control_dt: float, freq: float = 1.0) -> np.ndarray:
  """The open-loop sinusoidal gait a_j = sin(2π f t + j), t in seconds."""
  return np.sin(2 * np.pi * freq * t_step * control_dt + np.arange(d_a))
