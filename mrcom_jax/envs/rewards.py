"""Reward terms: the suite's `tolerance`, the target-speed objective and the per-domain rewards.

PROTOCOL.md, "Objective: target speed": the speed term is
`tolerance(v_x, bounds=(v*, v*), margin=v*, value_at_margin=0, sigmoid='linear')` with
`v* = β · v_max`, combined with each domain's stand/upright terms as the suite combines its own.
`reward_mode` selects, as data, the target-speed reward (0) or the suite's own run/hop reward (1),
which the `v_max` expert trains on.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TARGET_SPEED, SUITE = 0, 1
REWARD_MODES = {"target_speed": TARGET_SPEED, "suite": SUITE}

# Provisional `v_max` (m/s), PROTOCOL.md: estimated from typical published returns. The `v_max`
# expert measures the real values later; downstream stages read those from dataset metadata.
PROVISIONAL_V_MAX = {"cheetah": 8.0, "walker": 5.0, "hopper": 1.0}

# Constants of the suite's tasks (dm_control/suite/{hopper,walker,cheetah}.py).
HOPPER_STAND_HEIGHT, HOPPER_HOP_SPEED = 0.6, 2.0
WALKER_STAND_HEIGHT, WALKER_RUN_SPEED = 1.2, 8.0
CHEETAH_RUN_SPEED = 10.0


def _sigmoid(x, value_at_1: float, kind: str):
  if kind == "gaussian":
    scale = np.sqrt(-2 * np.log(value_at_1))
    return jnp.exp(-0.5 * (x * scale) ** 2)
  if kind == "linear":
    scaled = x * (1 - value_at_1)
    return jnp.where(jnp.abs(scaled) < 1, 1 - scaled, 0.0)
  raise ValueError(f"unknown sigmoid {kind!r}: choose 'gaussian' or 'linear'")


def tolerance(x, bounds=(0.0, 0.0), margin=0.0, sigmoid: str = "gaussian", value_at_margin=0.1):
  """The suite's `rewards.tolerance` in jnp: 1 inside `bounds`, falling off over `margin`.

  Args:
    x: array of any shape.
    bounds: (lower, upper), scalars or arrays broadcastable with `x`.
    margin: scalar or array; a Python 0 gives the indicator of the bounds.
    sigmoid: 'gaussian' or 'linear'.
    value_at_margin: value at distance `margin` outside the bounds.

  Returns:
    float32 array shaped like `x`, in [0, 1].
  """
  lower, upper = bounds
  in_bounds = (lower <= x) & (x <= upper)
  if isinstance(margin, int | float) and margin == 0:
    return jnp.where(in_bounds, 1.0, 0.0)
  d = jnp.where(x < lower, lower - x, x - upper) / margin
  return jnp.where(in_bounds, 1.0, _sigmoid(d, value_at_margin, sigmoid))


def speed_term(v_x, v_target):
  """1 at `v_target`, 0 at standstill and at twice the target (PROTOCOL.md)."""
  return tolerance(v_x, (v_target, v_target), v_target, "linear", 0.0)


def cheetah(v_x, v_target, mode):
  """Cheetah: the speed term (mode 0) or the suite's run reward (mode 1)."""
  run = tolerance(v_x, (CHEETAH_RUN_SPEED, jnp.inf), CHEETAH_RUN_SPEED, "linear", 0.0)
  return jnp.where(mode == SUITE, run, speed_term(v_x, v_target))


def walker_stand(torso_height, torso_upright):
  """The walker's stand reward: (3·standing + upright) / 4, as the suite computes it."""
  standing = tolerance(torso_height, (WALKER_STAND_HEIGHT, jnp.inf), WALKER_STAND_HEIGHT / 2)
  upright = (1 + torso_upright) / 2
  return (3 * standing + upright) / 4


def walker(v_x, torso_height, torso_upright, v_target, mode):
  """Walker: stand × (5·speed + 1) / 6, with the target-speed term or the suite's run term."""
  run = tolerance(v_x, (WALKER_RUN_SPEED, jnp.inf), WALKER_RUN_SPEED / 2, "linear", 0.5)
  move = jnp.where(mode == SUITE, run, speed_term(v_x, v_target))
  return walker_stand(torso_height, torso_upright) * (5 * move + 1) / 6


def hopper_standing(height):
  """The hopper's standing indicator: torso-over-foot height within (0.6, 2)."""
  return tolerance(height, (HOPPER_STAND_HEIGHT, 2.0))


def hopper(v_x, height, v_target, mode):
  """Hopper: standing × speed term, or the suite's hop reward."""
  hop = tolerance(v_x, (HOPPER_HOP_SPEED, jnp.inf), HOPPER_HOP_SPEED / 2, "linear", 0.5)
  move = jnp.where(mode == SUITE, hop, speed_term(v_x, v_target))
  return hopper_standing(height) * move
