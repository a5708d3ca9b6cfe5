"""Diagonal Gaussians: the distribution of z, u and r_ψ (METHOD.md Eq. 6, 8, 9, 11)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mrcom_jax.models import mlp


@struct.dataclass
class DiagGaussian:
  """N(mean, diag std²); `mean` and `std` share one shape [..., n]."""

  mean: jax.Array
  std: jax.Array

  def sample(self, noise: jax.Array) -> jax.Array:
    """Reparameterised sample mean + std · noise, noise ~ N(0, I) of the same shape."""
    return self.mean + self.std * noise

  def stop_gradient(self) -> DiagGaussian:
    return DiagGaussian(jax.lax.stop_gradient(self.mean), jax.lax.stop_gradient(self.std))


def kl_divergence(q: DiagGaussian, p: DiagGaussian) -> jax.Array:
  """KL(q ‖ p) of diagonal Gaussians, summed over the last axis.

  KL = Σ_i [ln(σp_i / σq_i) + (σq_i² + (μq_i − μp_i)²) / (2 σp_i²) − ½].

  Args:
    q: the first argument, [..., n].
    p: the second argument, [..., n].

  Returns:
    [...] float32, in nats.
  """
  var_ratio = jnp.square(q.std / p.std)
  mahalanobis = jnp.square((q.mean - p.mean) / p.std)
  return 0.5 * jnp.sum(var_ratio + mahalanobis - 1.0 - jnp.log(var_ratio), axis=-1)


class GaussianHead(nn.Module):
  """An MLP whose output is a diagonal Gaussian with σ = softplus(·) + min_std (METHOD.md).

  Attributes:
    hidden: hidden widths of the MLP.
    features: dimension n of the Gaussian.
    min_std: the floor added to softplus (0.1).
  """

  hidden: Sequence[int]
  features: int
  min_std: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array) -> DiagGaussian:
    """x: [..., d_in] -> DiagGaussian with mean and std [..., features]."""
    out = mlp.MLP(self.hidden, 2 * self.features, name="mlp")(x)
    mean, raw_std = jnp.split(out, 2, axis=-1)
    return DiagGaussian(mean, jax.nn.softplus(raw_std) + self.min_std)
