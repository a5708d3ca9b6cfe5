"""Per-domain observation normaliser (METHOD.md Eq. 5): fitted once on data, then frozen.

It is a pytree stored in the world model's variables next to the parameters
(`variables = {'params': ..., 'normalizer': Normalizer}`), so it is checkpointed with them and
never receives a gradient. Padded entries get mean 0 and std 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mrcom_jax.envs import specs


@struct.dataclass
class Normalizer:
  """Per-domain mean and standard deviation.

  Attributes:
    mean: [NUM_DOMAINS, OBS_PAD] float32.
    std: [NUM_DOMAINS, OBS_PAD] float32, > 0.
  """

  mean: jax.Array
  std: jax.Array

  @classmethod
  def identity(cls) -> Normalizer:
    shape = (specs.NUM_DOMAINS, specs.OBS_PAD)
    return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32))

  def normalize(self, obs: jax.Array, domain: jax.Array) -> jax.Array:
    """(obs − mean_d) / std_d for each row's domain d.

    Args:
      obs: [B, ..., OBS_PAD] float32 raw observations.
      domain: [B] int32.

    Returns:
      [B, ..., OBS_PAD] float32.
    """
    mean, std = self._rows(domain, obs.ndim)
    return (obs - mean) / std

  def denormalize(self, obs: jax.Array, domain: jax.Array) -> jax.Array:
    """The inverse of `normalize`: obs · std_d + mean_d. Shapes as in `normalize`."""
    mean, std = self._rows(domain, obs.ndim)
    return obs * std + mean

  def _rows(self, domain, ndim):
    shape = (domain.shape[0],) + (1,) * (ndim - 2) + (specs.OBS_PAD,)
    return self.mean[domain].reshape(shape), self.std[domain].reshape(shape)


def fit(obs, domain, valid, obs_mask, min_std: float = 1e-3) -> Normalizer:
  """Fits per-domain mean and std over the valid steps and entries of a dataset.

  Computed in float64 with numpy. A domain without data, and every padded entry, keep mean 0
  and std 1; std is floored at `min_std` (constant entries such as a masked dimension).

  Args:
    obs: [N, L, OBS_PAD] raw observations (e.g. a Batch's `obs`).
    domain: [N] int domain ids.
    valid: [N, L] bool.
    obs_mask: [N, OBS_PAD] float, valid entries of each row.
    min_std: floor of the standard deviation.

  Returns:
    A Normalizer with float32 leaves.
  """
  obs = np.asarray(obs, np.float64)
  domain = np.asarray(domain)
  weight = np.asarray(valid, np.float64)[..., None] * np.asarray(obs_mask, np.float64)[:, None]
  mean = np.zeros((specs.NUM_DOMAINS, specs.OBS_PAD))
  std = np.ones((specs.NUM_DOMAINS, specs.OBS_PAD))
  for d in range(specs.NUM_DOMAINS):
    w = weight[domain == d].reshape(-1, specs.OBS_PAD)
    x = obs[domain == d].reshape(-1, specs.OBS_PAD)
    count = w.sum(0)
    seen = count > 0
    m = (w * x).sum(0) / np.maximum(count, 1)
    v = (w * np.square(x - m)).sum(0) / np.maximum(count, 1)
    mean[d] = np.where(seen, m, 0.0)
    std[d] = np.where(seen, np.maximum(np.sqrt(v), min_std), 1.0)
  return Normalizer(jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
