"""Multilayer perceptrons, shared and per-domain (METHOD.md Eq. 5).

A "3-layer MLP" (METHOD.md, [choice]) is two ReLU hidden layers and a linear output layer.
Per-domain layers hold one weight matrix per domain, stacked on a leading axis, and select it
per batch row by domain id, so one jitted program takes a batch that mixes all domains.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Fan-in scaling per domain: the leading (domain) axis is a batch axis of the initialiser.
_domain_kernel_init = nn.initializers.variance_scaling(
  1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


class MLP(nn.Module):
  """ReLU hidden layers, then a linear output layer.

  Attributes:
    hidden: widths of the hidden layers, e.g. (256, 256).
    features: output width.
  """

  hidden: Sequence[int]
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., d_in] -> [..., features]."""
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
    return nn.Dense(self.features, name="out")(x)


class DomainDense(nn.Module):
  """A dense layer with one kernel and bias per domain, chosen per row by `domain`.

  Attributes:
    features: output width.
    num_domains: number of domains (leading axis of the kernel).
  """

  features: int
  num_domains: int

  @nn.compact
  def __call__(self, x: jax.Array, domain: jax.Array) -> jax.Array:
    """Applies the row's domain layer.

    Args:
      x: [B, ..., d_in] float32.
      domain: [B] int32 domain ids.

    Returns:
      [B, ..., features] float32.
    """
    d_in = x.shape[-1]
    kernel = self.param(
      "kernel", _domain_kernel_init, (self.num_domains, d_in, self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.num_domains, self.features))
    w = kernel[domain]  # [B, d_in, features]
    b = bias[domain].reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (self.features,))
    return jnp.einsum("b...i,bio->b...o", x, w) + b


class DomainMLP(nn.Module):
  """An MLP whose every layer is per-domain (observation encoder, token map, decoder; Eq. 5).

  Attributes:
    hidden: widths of the hidden layers.
    features: output width.
    num_domains: number of domains.
  """

  hidden: Sequence[int]
  features: int
  num_domains: int

  @nn.compact
  def __call__(self, x: jax.Array, domain: jax.Array) -> jax.Array:
    """x: [B, ..., d_in], domain: [B] int32 -> [B, ..., features]."""
    for i, width in enumerate(self.hidden):
      x = nn.relu(DomainDense(width, self.num_domains, name=f"hidden_{i}")(x, domain))
    return DomainDense(self.features, self.num_domains, name="out")(x, domain)
