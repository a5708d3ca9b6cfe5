"""The world model's networks (METHOD.md Eq. 5-9, 11) and the value networks (Eq. 13-14).

`WorldModelNet` holds every world-model parameter; its methods are single stages called through
`apply(..., method=...)` by the pure functions of `model.py`, which own the scan. Which
submodules exist follows the ablation switches of the resolved `Spec`, so an ablation removes
its parameters from the tree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcom_jax.models import context, gaussian, mlp
from mrcom_jax.world_model import config as config_lib


class WorldModelNet(nn.Module):
  """Encoders, context encoder, latent dynamics and heads of MrCoM.

  Attributes:
    spec: resolved sizes and switches (`config.resolve`).
  """

  spec: config_lib.Spec

  def setup(self):
    s = self.spec
    nd = s.num_domains
    self.obs_encoder = mlp.DomainMLP(s.hidden, s.embed, nd)  # e_i (Eq. 5)
    self.action_embed = mlp.DomainDense(s.embed, nd)  # g_i (Eq. 5), linear
    self.decoder = mlp.DomainMLP(s.hidden, s.obs_dim, nd)  # per-domain decoder (Eq. 9)
    if s.use_context:
      self.token_map = mlp.DomainMLP(s.hidden, s.embed, nd)  # φ_i(o, a, r, first) (Eq. 5)
      self.context_encoder = context.ContextEncoder(
        s.embed, s.context_len, s.num_heads, s.num_layers, s.ff_mult
      )
    else:  # no_context: c_t is a learned constant
      self.constant_context = self.param("constant_context", nn.initializers.zeros, (s.embed,))
    self.prior_z = gaussian.GaussianHead(s.hidden, s.stoch, s.min_std)  # Eq. 6
    self.posterior_z = gaussian.GaussianHead(s.hidden, s.stoch, s.min_std)  # Eq. 9
    if s.deter:
      self.gru = nn.GRUCell(features=s.deter)  # Eq. 7
    self.prior_u = gaussian.GaussianHead(s.hidden, s.aux, s.min_std)  # Eq. 8
    self.posterior_u = gaussian.GaussianHead(s.hidden, s.aux, s.min_std)  # Eq. 9
    self.reward_head = mlp.MLP(s.hidden, 1)  # Eq. 9
    if s.use_meta_state:
      self.r_psi = gaussian.GaussianHead(s.hidden, s.stoch, s.min_std)  # Eq. 11-12

  def encode(self, obs: jax.Array, domain: jax.Array) -> jax.Array:
    """e_i(o): obs [B, ..., 27] normalised and masked, domain [B] -> [B, ..., E]."""
    return self.obs_encoder(obs, domain)

  def embed_action(self, action: jax.Array, domain: jax.Array) -> jax.Array:
    """g_i(a): action [B, ..., 6] masked, domain [B] -> [B, ..., E]."""
    return self.action_embed(action, domain)

  def tokens(self, obs, action, reward, first, domain) -> jax.Array:
    """φ_i(o, a, r, first): [B, L, 27], [B, L, 6], [B, L], [B, L] -> [B, L, E] (Eq. 4-5)."""
    x = jnp.concatenate(
      [obs, action, reward[..., None], first[..., None].astype(jnp.float32)], axis=-1
    )
    return self.token_map(x, domain)

  def context(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """c_t from windows: tokens [N, k, E], valid [N, k] bool -> [N, E]."""
    return self.context_encoder(tokens, valid)

  def constant(self, batch_shape: tuple[int, ...]) -> jax.Array:
    """The learned constant context of `no_context`: [*batch_shape, E]."""
    return jnp.broadcast_to(self.constant_context, (*batch_shape, self.spec.embed))

  def prior(self, c, h, ga) -> gaussian.DiagGaussian:
    """p(z_t | c_t, h_{t-1}, g(a_{t-1})) (Eq. 6): [..., E], [..., D], [..., E] -> [..., S]."""
    return self.prior_z(jnp.concatenate([c, h, ga], axis=-1))

  def posterior(self, eo, c, h, ga) -> gaussian.DiagGaussian:
    """q(z_t | e(o_t), c_t, h_{t-1}, g(a_{t-1})) (Eq. 9) -> [..., S]."""
    return self.posterior_z(jnp.concatenate([eo, c, h, ga], axis=-1))

  def meta_state(self, c, h, ga) -> gaussian.DiagGaussian:
    """r_ψ(z_t | c_t, h_{t-1}, g(a_{t-1})) (Eq. 12): the posterior's inputs but o_t."""
    return self.r_psi(jnp.concatenate([c, h, ga], axis=-1))

  def recur(self, h, z, ga) -> jax.Array:
    """h_t = GRU(h_{t-1}, [z_t, g(a_{t-1})]) (Eq. 7): [..., D] -> [..., D]."""
    if not self.spec.deter:
      return h
    h_new, _ = self.gru(h, jnp.concatenate([z, ga], axis=-1))
    return h_new

  def aux_prior(self, c) -> gaussian.DiagGaussian:
    """p(u_t | c_t) (Eq. 8): [..., E] -> [..., U]."""
    return self.prior_u(c)

  def aux_posterior(self, eo, c) -> gaussian.DiagGaussian:
    """q(u_t | e(o_t), c_t) (Eq. 9): [..., E], [..., E] -> [..., U]."""
    return self.posterior_u(jnp.concatenate([eo, c], axis=-1))

  def decode(self, feat: jax.Array, domain: jax.Array) -> jax.Array:
    """Mean of p(o_t | s̃_t) (Eq. 9): feat [B, ..., S+D+U] -> [B, ..., 27] (normalised)."""
    return self.decoder(feat, domain)

  def reward(self, feat: jax.Array) -> jax.Array:
    """Mean of p(r_t | s̃_t) (Eq. 9): [..., S+D+U] -> [...]."""
    return self.reward_head(feat)[..., 0]

  def init_all(self, obs, action, reward, first, valid, domain):
    """Touches every submodule once, for `init`. obs [B, k, 27], action [B, k, 6]."""
    s = self.spec
    b = obs.shape[0]
    eo = self.encode(obs[:, -1], domain)
    ga = self.embed_action(action[:, -1], domain)
    if s.use_context:
      c = self.context(self.tokens(obs, action, reward, first, domain), valid)
    else:
      c = self.constant((b,))
    h = jnp.zeros((b, s.deter))
    z = self.posterior(eo, c, h, ga).mean + self.prior(c, h, ga).mean
    if s.use_meta_state:
      z = z + self.meta_state(c, h, ga).mean
    h = self.recur(h, z, ga)
    u = self.aux_posterior(eo, c).mean + self.aux_prior(c).mean
    feat = jnp.concatenate([z, h, u], axis=-1)
    return self.decode(feat, domain), self.reward(feat)


class ScenarioValue(nn.Module):
  """V(s̃, ξ) (Eq. 14), on the (1 − γ) scale: a 3-layer MLP on [s̃, ξ].

  Attributes:
    hidden: hidden widths.
  """

  hidden: tuple[int, ...]

  @nn.compact
  def __call__(self, feat: jax.Array, xi: jax.Array) -> jax.Array:
    """feat [..., S+D+U], xi [..., 6] -> [...]."""
    return mlp.MLP(self.hidden, 1, name="mlp")(jnp.concatenate([feat, xi], axis=-1))[..., 0]


class MetaValue(nn.Module):
  """V_meta(z, h) (Eq. 13), on the (1 − γ) scale: a 3-layer MLP on [z, h].

  Attributes:
    hidden: hidden widths.
  """

  hidden: tuple[int, ...]

  @nn.compact
  def __call__(self, z: jax.Array, h: jax.Array) -> jax.Array:
    """z [..., S], h [..., D] -> [...]."""
    return mlp.MLP(self.hidden, 1, name="mlp")(jnp.concatenate([z, h], axis=-1))[..., 0]
