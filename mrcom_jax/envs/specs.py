"""Static facts about the three domains, and the padded layout shared by every batch.

Everything downstream (datasets, world model, adaptation) agrees on these widths, so a batch
can mix hopper, walker and cheetah: observations and actions are padded to the widest domain
(observation widths counted after the widest observation function) and carry a mask.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  """One Control Suite domain as PROTOCOL.md fixes it."""

  name: str
  id: int  # index into DOMAINS and into the descriptor's one-hot
  obs_dim: int  # the suite's observation width
  act_dim: int
  physics_dt: float  # seconds per physics step (from the XML)
  control_dt: float  # seconds per control step

  @property
  def n_substeps(self) -> int:
    return round(self.control_dt / self.physics_dt)

  @property
  def n_extra(self) -> int:
    """⌈0.1·d_o⌉: distractor dimensions appended / dimensions masked (PROTOCOL.md, Table 3)."""
    return math.ceil(0.1 * self.obs_dim)


HOPPER = DomainSpec("hopper", 0, obs_dim=15, act_dim=4, physics_dt=0.005, control_dt=0.02)
WALKER = DomainSpec("walker", 1, obs_dim=24, act_dim=6, physics_dt=0.0025, control_dt=0.025)
CHEETAH = DomainSpec("cheetah", 2, obs_dim=17, act_dim=6, physics_dt=0.01, control_dt=0.01)

DOMAINS: tuple[DomainSpec, ...] = (HOPPER, WALKER, CHEETAH)
DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in DOMAINS)
NUM_DOMAINS = len(DOMAINS)

EPISODE_LENGTH = 1000  # control steps; truncated, never terminated
OBS_PAD = max(d.obs_dim + d.n_extra for d in DOMAINS)  # 27: walker with add_distractor
ACT_PAD = max(d.act_dim for d in DOMAINS)  # 6
XI_DIM = NUM_DOMAINS + 3  # ξ = (domain one-hot, α_len, α_size, β)


def get_domain(name: str) -> DomainSpec:
  """Looks a domain up by name, with an error that lists the valid ones."""
  for d in DOMAINS:
    if d.name == name:
      return d
  raise ValueError(f"unknown domain {name!r}: choose one of {', '.join(DOMAIN_NAMES)}")


def obs_mask(domain_id, obs_fn_id=None) -> np.ndarray:
  """[OBS_PAD] float32 mask of the valid observation entries of a domain.

  Args:
    domain_id: int domain index.
    obs_fn_id: observation-function index (see `obs_functions.OBS_FUNCTIONS`); with
      `add_distractor` the appended dimensions are valid too. None counts the suite's width.
  """
  from mrcom_jax.envs import obs_functions  # local: avoids an import cycle

  width = obs_functions.obs_width(DOMAINS[domain_id], obs_fn_id)
  return (np.arange(OBS_PAD) < width).astype(np.float32)


def act_mask(domain_id) -> np.ndarray:
  """[ACT_PAD] float32 mask of the valid action entries of a domain."""
  return (np.arange(ACT_PAD) < DOMAINS[domain_id].act_dim).astype(np.float32)


def descriptor(domain_id, alpha_len, alpha_size, beta) -> np.ndarray:
  """ξ = (domain one-hot, α_len, α_size, β): [XI_DIM] float32 (METHOD.md, Notation)."""
  xi = np.zeros(XI_DIM, np.float32)
  xi[domain_id] = 1.0
  xi[NUM_DOMAINS:] = (alpha_len, alpha_size, beta)
  return xi


def pad(x, width: int):
  """Zero-pads the last axis of `x` to `width` (numpy or jax arrays)."""
  extra = width - x.shape[-1]
  if extra < 0:
    raise ValueError(f"cannot pad width {x.shape[-1]} down to {width}")
  return (
    np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    if isinstance(x, np.ndarray)
    else (__import__("jax").numpy.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]))
  )


def pad_obs(obs):
  """[..., d] → [..., OBS_PAD]."""
  return pad(obs, OBS_PAD)


def pad_action(action):
  """[..., d_a] → [..., ACT_PAD]."""
  return pad(action, ACT_PAD)


def unpad_obs(obs, domain: str | DomainSpec, obs_fn: int | str = 0):
  """[..., OBS_PAD] → the domain's width after observation function `obs_fn`."""
  from mrcom_jax.envs import obs_functions  # local: avoids an import cycle

  spec = domain if isinstance(domain, DomainSpec) else get_domain(domain)
  fn = obs_functions.obs_fn_id(obs_fn) if isinstance(obs_fn, str) else obs_fn
  return obs[..., : obs_functions.obs_width(spec, fn)]


def unpad_action(action, domain: str | DomainSpec):
  """[..., ACT_PAD] → [..., d_a]."""
  spec = domain if isinstance(domain, DomainSpec) else get_domain(domain)
  return action[..., : spec.act_dim]
