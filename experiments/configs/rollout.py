"""Config of `python -m experiments.rollout`: random-action rollouts of randomised scenarios.

Presets: `rollout.py` (default: 256 scenarios per domain, one whole episode) and
`rollout.py:smoke` (4 per domain; a 2-core CPU finishes in a few minutes, mostly compiling).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("default", "smoke")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for rollout.py: choose one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.domains = ("hopper", "walker", "cheetah")  # which domains to simulate
  c.num_envs = 256  # scenarios per domain, simulated as one batch
  c.steps = 1000  # control steps per domain (one episode)
  c.chunk = 50  # control steps per jitted scan (progress and logging granularity)
  c.setting = "c"  # scenario distribution: setting a/b/c/d of PROTOCOL.md
  c.split = "train"  # 'train' or 'eval' distribution of that setting
  c.obs_fn = "none"  # observation function (PROTOCOL.md, Table 3)
  c.mass_rule = "fixed"  # 'fixed' or 'density'
  c.seed = 0  # scenario draws, resets, actions and observation functions
  c.env = ml_collections.ConfigDict()
  c.env.backend = "auto"  # 'auto' (mjx on a GPU or TPU, mujoco on a CPU), 'mjx' or 'mujoco'
  if preset == "smoke":
    c.num_envs = 4
  c.lock()
  return c
