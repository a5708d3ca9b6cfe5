"""Soft actor-critic as pure functions: tanh-Gaussian actor, twin critics, learned temperature.

PROTOCOL.md ("Behaviour policies, datasets, recipes"): twin critics, learned temperature with
target entropy `−d_a`, Polyak-averaged target critics (τ = 0.005), and bootstrapping through
truncation. Episodes are truncated, never terminated, so the TD target always bootstraps,
`y = r + γ · (min_i Q̄_i(s', a') − α log π(a' | s'))` with `a' ~ π(· | s')` and no done mask;
a "transition" out of an episode's `last` state is no transition at all and carries mask 0.

Actor and critics read `[o, ξ · xi_gate]`: the clean observation [d_o] and the scenario
descriptor ξ [6] times a scalar gate given as data (1 for behaviour SACs, which get ξ as input,
0 for experts and specialists), so one compiled program serves both kinds.

Padded networks (adaptation vmaps one SAC per (scenario, seed) across domains): observations
padded to `OBS_PAD` and actions to `ACT_PAD`, with `obs_mask` [OBS_PAD] and `act_mask` [ACT_PAD]
given as data. Masked entries never reach a loss: padded observation entries are zeroed at the
input, padded action entries are zeroed in every action the critics see, their log-densities are
left out of log π, and the entropy target is −Σ act_mask (the domain's −d_a).

`init(config, key, obs_dim, act_dim) -> SACState`, `update(config, state, batch, key, xi_gate)
-> (state, metrics)`, `act(config, actor_params, obs, xi, xi_gate, key)` (a sample) and
`act(..., key=None)` (deterministic: tanh of the mean). Everything is jittable and vmappable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from mrcom_jax.envs import specs
from mrcom_jax.models import mlp

Params = Any


@dataclasses.dataclass(frozen=True)
class SACConfig:
  """SAC hyperparameters (PROTOCOL.md recipes; the smoke preset uses hidden=(64, 64), batch 64)."""

  hidden: Sequence[int] = (256, 256)  # hidden widths of the actor and of each critic (ReLU)
  lr: float = 3e-4  # Adam learning rate of the temperature (and of actor / critics if unset)
  actor_lr: float | None = None  # the actor's learning rate; None uses `lr`
  critic_lr: float | None = None  # the critics' learning rate; None uses `lr`
  batch_size: int = 512  # transitions per update
  discount: float = 0.99  # γ
  tau: float = 0.005  # Polyak rate of the target critics
  init_temperature: float = 1.0  # α at initialisation
  target_entropy: float | None = None  # entropy target H̄; None means −d_a
  log_std_min: float = -5.0  # the actor's log σ is squashed into [log_std_min, log_std_max]
  log_std_max: float = 2.0


@struct.dataclass
class SACState:
  """All of one agent's learning state (a pytree of arrays; vmap it for several agents).

  Attributes:
    actor: actor params.
    critic: twin critic params.
    target_critic: Polyak average of `critic`.
    log_alpha: [] float32 log temperature.
    actor_opt: Adam state of the actor.
    critic_opt: Adam state of the critics.
    alpha_opt: Adam state of `log_alpha`.
    step: [] int32 updates taken.
  """

  actor: Params
  critic: Params
  target_critic: Params
  log_alpha: jax.Array
  actor_opt: Any
  critic_opt: Any
  alpha_opt: Any
  step: jax.Array


@struct.dataclass
class Transition:
  """A batch of transitions (s, a, r', s'), all with leading axis [B].

  Attributes:
    obs: [B, d_o] clean observation o_t.
    xi: [B, 6] scenario descriptor ξ (ungated; the gate is applied by the networks' input).
    action: [B, d_a] action a_t in [-1, 1].
    reward: [B] reward r_{t+1} of the next state.
    next_obs: [B, d_o] o_{t+1}.
    mask: [B] float32, 1 for a real transition, 0 for one out of an episode's `last` state.
  """

  obs: jax.Array
  xi: jax.Array
  action: jax.Array
  reward: jax.Array
  next_obs: jax.Array
  mask: jax.Array


# ---- networks -----------------------------------------------------------------------------------
class Actor(nn.Module):
  """Tanh-Gaussian policy head: an MLP giving the pre-tanh mean and log σ.

  Attributes:
    hidden: hidden widths.
    act_dim: d_a.
    log_std_min: lower bound of log σ.
    log_std_max: upper bound of log σ.
  """

  hidden: Sequence[int]
  act_dim: int
  log_std_min: float
  log_std_max: float

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [..., d_in] -> (mean, log_std), each [..., act_dim]."""
    out = mlp.MLP(self.hidden, 2 * self.act_dim, name="mlp")(x)
    mean, raw = jnp.split(out, 2, axis=-1)
    # Smooth squash of log σ into [min, max] (keeps gradients, unlike a clip).
    half = 0.5 * (self.log_std_max - self.log_std_min)
    return mean, self.log_std_min + half * (jnp.tanh(raw) + 1.0)


class TwinCritic(nn.Module):
  """Two independent Q MLPs on `[x, a]`.

  Attributes:
    hidden: hidden widths of each critic.
  """

  hidden: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array, action: jax.Array) -> jax.Array:
    """x: [..., d_in], action: [..., d_a] -> Q values [..., 2]."""
    xa = jnp.concatenate([x, action], axis=-1)
    q = [mlp.MLP(self.hidden, 1, name=f"q{i}")(xa)[..., 0] for i in range(2)]
    return jnp.stack(q, axis=-1)


def actor_module(config: SACConfig, act_dim: int) -> Actor:
  return Actor(tuple(config.hidden), act_dim, config.log_std_min, config.log_std_max)


def critic_module(config: SACConfig) -> TwinCritic:
  return TwinCritic(tuple(config.hidden))


def act_dim_of(actor_params: Params) -> int:
  """d_a read off the actor params (the output layer holds mean and log σ)."""
  return actor_params["params"]["mlp"]["out"]["bias"].shape[-1] // 2


def network_input(
  obs: jax.Array, xi: jax.Array, xi_gate: jax.Array | float, obs_mask: jax.Array | None = None
) -> jax.Array:
  """`[o, ξ · xi_gate]`: obs [..., d_o], xi [..., 6], xi_gate [] -> [..., d_o + 6].

  With `obs_mask` [d_o] (padded networks), masked observation entries are zeroed first.
  """
  if obs_mask is not None:
    obs = obs * obs_mask
  return jnp.concatenate([obs, xi * jnp.asarray(xi_gate, obs.dtype)], axis=-1)


def target_entropy(config: SACConfig, act_dim: int, act_mask: jax.Array | None = None):
  """H̄: the configured value, or −d_a (−Σ act_mask for a padded actor)."""
  if config.target_entropy is not None:
    return float(config.target_entropy)
  return -float(act_dim) if act_mask is None else -jnp.sum(act_mask)


# ---- the tanh-Gaussian ------------------------------------------------------------------------
def tanh_gaussian_log_prob(
  u: jax.Array, mean: jax.Array, log_std: jax.Array, act_mask: jax.Array | None = None
) -> jax.Array:
  """log π(tanh u) for u ~ N(mean, σ²): Σ_j [log N(u_j) − log(1 − tanh² u_j)].

  Uses log(1 − tanh² u) = 2 (log 2 − u − softplus(−2u)), which stays finite for large |u|.

  Args:
    u: [..., d_a] pre-tanh sample.
    mean: [..., d_a].
    log_std: [..., d_a].
    act_mask: [d_a] or None; the sum runs over unmasked entries only.

  Returns:
    [...] log density of the squashed action a = tanh(u).
  """
  z = (u - mean) * jnp.exp(-log_std)
  normal = -0.5 * jnp.square(z) - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
  log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
  per_dim = normal - log_det
  if act_mask is not None:
    per_dim = jnp.where(act_mask > 0, per_dim, 0.0)
  return jnp.sum(per_dim, axis=-1)


def sample_action(
  config: SACConfig,
  actor_params: Params,
  x: jax.Array,
  key: jax.Array,
  act_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """A reparameterised sample and its log-probability.

  Args:
    config: SACConfig.
    actor_params: actor params.
    x: [..., d_o + 6] network input.
    key: PRNG key.
    act_mask: [d_a] or None: masked entries of the action are 0 and left out of log π.

  Returns:
    action [..., d_a] in (−1, 1) and log π(action) [...].
  """
  mean, log_std = actor_module(config, act_dim_of(actor_params)).apply(actor_params, x)
  u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
  action = jnp.tanh(u) if act_mask is None else jnp.tanh(u) * act_mask
  return action, tanh_gaussian_log_prob(u, mean, log_std, act_mask)


def act(
  config: SACConfig,
  actor_params: Params,
  obs: jax.Array,
  xi: jax.Array,
  xi_gate: jax.Array | float,
  key: jax.Array | None = None,
  obs_mask: jax.Array | None = None,
  act_mask: jax.Array | None = None,
) -> jax.Array:
  """The policy's action: a sample (given `key`) or, with `key=None`, tanh of the mean.

  Args:
    config: SACConfig.
    actor_params: actor params.
    obs: [..., d_o] clean observation.
    xi: [..., 6] scenario descriptor.
    xi_gate: [] float, 1 to feed ξ, 0 to hide it.
    key: PRNG key, or None for the deterministic action.
    obs_mask: [d_o] or None (padded networks: masked entries are zeroed).
    act_mask: [d_a] or None (padded networks: masked action entries are 0).

  Returns:
    [..., d_a] actions in [−1, 1].
  """
  x = network_input(obs, xi, xi_gate, obs_mask)
  if key is None:
    mean, _ = actor_module(config, act_dim_of(actor_params)).apply(actor_params, x)
    return jnp.tanh(mean) if act_mask is None else jnp.tanh(mean) * act_mask
  return sample_action(config, actor_params, x, key, act_mask)[0]


# ---- init and losses ----------------------------------------------------------------------------
def _optimizer(lr: float) -> optax.GradientTransformation:
  # Flattened: the same Adam arithmetic in a few fused ops (shorter compiles on CPU).
  return optax.flatten(optax.adam(lr))


def learning_rates(config: SACConfig) -> tuple[float, float, float]:
  """(actor, critic, temperature) learning rates: `actor_lr` / `critic_lr` default to `lr`."""
  actor = config.lr if config.actor_lr is None else config.actor_lr
  critic = config.lr if config.critic_lr is None else config.critic_lr
  return actor, critic, config.lr


def init(config: SACConfig, key: jax.Array, obs_dim: int, act_dim: int) -> SACState:
  """Fresh actor, critics (target = critic), temperature and optimiser states.

  Args:
    config: SACConfig.
    key: PRNG key.
    obs_dim: d_o (ξ's 6 entries are added to the input here).
    act_dim: d_a.
  """
  key_actor, key_critic = jax.random.split(key)
  x = jnp.zeros((1, obs_dim + specs.XI_DIM), jnp.float32)
  actor = actor_module(config, act_dim).init(key_actor, x)
  critic = critic_module(config).init(key_critic, x, jnp.zeros((1, act_dim), jnp.float32))
  log_alpha = jnp.asarray(jnp.log(config.init_temperature), jnp.float32)
  lr_actor, lr_critic, lr_alpha = learning_rates(config)
  return SACState(
    actor=actor,
    critic=critic,
    target_critic=critic,
    log_alpha=log_alpha,
    actor_opt=_optimizer(lr_actor).init(actor),
    critic_opt=_optimizer(lr_critic).init(critic),
    alpha_opt=_optimizer(lr_alpha).init(log_alpha),
    step=jnp.zeros((), jnp.int32),
  )


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def td_target(
  reward: jax.Array,
  next_q: jax.Array,
  next_log_prob: jax.Array,
  alpha: jax.Array,
  discount: float,
) -> jax.Array:
  """y = r + γ (min_i Q̄_i(s', a') − α log π(a' | s')): truncation only, so no done mask.

  Args:
    reward: [B] r_{t+1}.
    next_q: [B, 2] target twin Q at (s', a').
    next_log_prob: [B] log π(a' | s').
    alpha: [] temperature.
    discount: γ.

  Returns:
    [B] targets (no gradient flows through them in `critic_loss`).
  """
  return reward + discount * (jnp.min(next_q, axis=-1) - alpha * next_log_prob)


def critic_loss(
  critic_params: Params, config: SACConfig, q_target: jax.Array, batch: Transition, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """½ Σ_i mean_B mask · (Q_i(s, a) − y)²; returns (loss, mean Q)."""
  q = critic_module(config).apply(critic_params, x, batch.action)  # [B, 2]
  err = jnp.sum(jnp.square(q - jax.lax.stop_gradient(q_target)[:, None]), axis=-1)
  return 0.5 * _masked_mean(err, batch.mask), _masked_mean(jnp.mean(q, axis=-1), batch.mask)


def actor_loss(
  actor_params: Params,
  config: SACConfig,
  critic_params: Params,
  alpha: jax.Array,
  x: jax.Array,
  mask: jax.Array,
  key: jax.Array,
  act_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """mean_B mask · (α log π(a|s) − min_i Q_i(s, a)), a ~ π (reparameterised); (loss, log π)."""
  action, log_prob = sample_action(config, actor_params, x, key, act_mask)
  q = jnp.min(critic_module(config).apply(critic_params, x, action), axis=-1)
  return _masked_mean(alpha * log_prob - q, mask), log_prob


def temperature_loss(
  log_alpha: jax.Array, log_prob: jax.Array, mask: jax.Array, target: float
) -> jax.Array:
  """α · mean_B mask · (−log π − H̄): α falls while the entropy −log π is above its target H̄."""
  entropy = -jax.lax.stop_gradient(log_prob)
  return jnp.exp(log_alpha) * _masked_mean(entropy - target, mask)


def polyak(target: Params, online: Params, tau: float) -> Params:
  """(1 − τ) · target + τ · online, leaf by leaf."""
  return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


def update(
  config: SACConfig,
  state: SACState,
  batch: Transition,
  key: jax.Array,
  xi_gate: jax.Array | float = 1.0,
  obs_mask: jax.Array | None = None,
  act_mask: jax.Array | None = None,
) -> tuple[SACState, dict[str, jax.Array]]:
  """One SAC update: critics, then the Polyak target, then the actor, then the temperature.

  Args:
    config: SACConfig.
    state: SACState.
    batch: Transition with leading axis [B].
    key: PRNG key.
    xi_gate: [] float, the ξ gate of the networks' input.
    obs_mask: [d_o] or None: padded networks zero the masked observation entries.
    act_mask: [d_a] or None: padded networks zero the masked action entries and leave them out
      of log π and of the entropy target (see the module docstring).

  Returns:
    The new state and scalar metrics: critic_loss, actor_loss, alpha_loss, alpha, entropy, q.
  """
  chex.assert_rank([batch.obs, batch.action, batch.reward, batch.mask], [2, 2, 1, 1])
  act_dim = batch.action.shape[-1]
  lr_actor, lr_critic, lr_alpha = learning_rates(config)
  key_next, key_pi = jax.random.split(key)
  alpha = jnp.exp(state.log_alpha)
  x = network_input(batch.obs, batch.xi, xi_gate, obs_mask)
  x_next = network_input(batch.next_obs, batch.xi, xi_gate, obs_mask)
  if act_mask is not None:
    batch = batch.replace(action=batch.action * act_mask)

  # Critics.
  next_action, next_log_prob = sample_action(config, state.actor, x_next, key_next, act_mask)
  next_q = critic_module(config).apply(state.target_critic, x_next, next_action)
  y = td_target(batch.reward, next_q, next_log_prob, alpha, config.discount)
  (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(
    state.critic, config, y, batch, x
  )
  updates, critic_opt = _optimizer(lr_critic).update(grads, state.critic_opt, state.critic)
  critic = optax.apply_updates(state.critic, updates)
  target_critic = polyak(state.target_critic, critic, config.tau)

  # Actor, against the updated critics.
  (a_loss, log_prob), grads = jax.value_and_grad(actor_loss, has_aux=True)(
    state.actor, config, critic, alpha, x, batch.mask, key_pi, act_mask
  )
  updates, actor_opt = _optimizer(lr_actor).update(grads, state.actor_opt, state.actor)
  actor = optax.apply_updates(state.actor, updates)

  # Temperature, from the actor's sampled log-probabilities.
  h_target = target_entropy(config, act_dim, act_mask)
  t_loss, grad = jax.value_and_grad(temperature_loss)(
    state.log_alpha, log_prob, batch.mask, h_target
  )
  updates, alpha_opt = _optimizer(lr_alpha).update(grad, state.alpha_opt, state.log_alpha)
  log_alpha = optax.apply_updates(state.log_alpha, updates)

  new = SACState(
    actor=actor,
    critic=critic,
    target_critic=target_critic,
    log_alpha=log_alpha,
    actor_opt=actor_opt,
    critic_opt=critic_opt,
    alpha_opt=alpha_opt,
    step=state.step + 1,
  )
  metrics = {
    "critic_loss": c_loss,
    "actor_loss": a_loss,
    "alpha_loss": t_loss,
    "alpha": jnp.exp(log_alpha),
    "entropy": _masked_mean(-log_prob, batch.mask),
    "q": q_mean,
  }
  return new, metrics
