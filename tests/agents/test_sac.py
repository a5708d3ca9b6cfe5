"""Hand-computed SAC numbers: TD target, temperature loss, Polyak, tanh-Gaussian, the ξ gate."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.agents import sac
from mrcom_jax.envs import specs

CONFIG = sac.SACConfig(hidden=(16, 16), batch_size=8)
D_O, D_A = 5, 3


def test_td_target_twin_min_entropy_no_done_mask():
  reward = jnp.array([1.0, 0.5])
  next_q = jnp.array([[2.0, 3.0], [4.0, 1.0]])
  next_log_prob = jnp.array([-1.0, 0.5])
  # 1 + 0.9 · (min(2, 3) − 0.2 · (−1)) = 1 + 0.9 · 2.2 = 2.98
  # 0.5 + 0.9 · (min(4, 1) − 0.2 · 0.5) = 0.5 + 0.9 · 0.9 = 1.31
  y = sac.td_target(reward, next_q, next_log_prob, jnp.asarray(0.2), 0.9)
  np.testing.assert_allclose(y, [2.98, 1.31], rtol=1e-6)


def test_temperature_loss_sign():
  # entropy −log π = mean(1, 3) = 2 lies above the target −6: loss = α · (2 + 6) = 8 at α = 1,
  # d loss / d log α = 8 > 0, so gradient descent lowers α.
  log_prob, mask = jnp.array([-1.0, -3.0]), jnp.ones(2)
  loss, grad = jax.value_and_grad(sac.temperature_loss)(jnp.asarray(0.0), log_prob, mask, -6.0)
  np.testing.assert_allclose([loss, grad], [8.0, 8.0], rtol=1e-6)
  # below the target (entropy 2 < 4) the gradient is negative: α grows.
  grad = jax.grad(sac.temperature_loss)(jnp.asarray(0.0), log_prob, mask, 4.0)
  np.testing.assert_allclose(grad, -2.0, rtol=1e-6)


def test_polyak():
  target = {"w": jnp.array([1.0, -2.0])}
  online = {"w": jnp.array([3.0, 2.0])}
  # 0.75 · 1 + 0.25 · 3 = 1.5 and 0.75 · (−2) + 0.25 · 2 = −1
  np.testing.assert_allclose(sac.polyak(target, online, 0.25)["w"], [1.5, -1.0])


def test_tanh_gaussian_log_prob_by_hand():
  u, mean, std = 0.5, 0.2, 0.5
  # log N(0.5; 0.2, 0.5²) = −½ · 0.6² − ln 0.5 − ½ ln 2π = −0.18 + 0.693147 − 0.918939 = −0.405791
  # log(1 − tanh² 0.5) = ln(1 − 0.462117²) = ln 0.786448 = −0.240229
  # so log π = −0.405791 + 0.240229 = −0.165562 per dimension
  normal = -0.5 * ((u - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
  by_hand = normal - math.log(1 - math.tanh(u) ** 2)
  assert by_hand == pytest.approx(-0.165562, abs=1e-6)
  got = sac.tanh_gaussian_log_prob(
    jnp.array([u, u]), jnp.array([mean, mean]), jnp.log(jnp.array([std, std]))
  )
  np.testing.assert_allclose(got, 2 * by_hand, rtol=1e-5)
  # the stable form stays finite where 1 − tanh² underflows
  assert np.isfinite(sac.tanh_gaussian_log_prob(jnp.array([20.0]), jnp.zeros(1), jnp.zeros(1)))


@pytest.fixture(scope="module")
def state():
  return sac.init(CONFIG, jax.random.PRNGKey(0), D_O, D_A)


def _batch(key, b=8, reward_scale=1.0):
  k = jax.random.split(key, 5)
  return sac.Transition(
    obs=jax.random.normal(k[0], (b, D_O)),
    xi=jax.random.normal(k[1], (b, 6)),
    action=jax.random.uniform(k[2], (b, D_A), minval=-1, maxval=1),
    reward=reward_scale * jax.random.uniform(k[3], (b,)),
    next_obs=jax.random.normal(k[4], (b, D_O)),
    mask=jnp.ones((b,)),
  )


def test_xi_gate_zero_hides_xi(state):
  obs = jax.random.normal(jax.random.PRNGKey(1), (4, D_O))
  xi_a, xi_b = jnp.zeros((4, 6)), jnp.ones((4, 6))
  for key in (None, jax.random.PRNGKey(2)):
    act = lambda xi, gate, key=key: sac.act(CONFIG, state.actor, obs, xi, gate, key)
    np.testing.assert_array_equal(act(xi_a, 0.0), act(xi_b, 0.0))
    assert not np.allclose(act(xi_a, 1.0), act(xi_b, 1.0))
  # critics too, and so the whole update: ξ changes nothing at gate 0.
  batch = _batch(jax.random.PRNGKey(3))
  update = jax.jit(lambda s, b, g: sac.update(CONFIG, s, b, jax.random.PRNGKey(4), g))
  other = batch.replace(xi=batch.xi + 5.0)
  new_a, m_a = update(state, batch, 0.0)
  new_b, m_b = update(state, other, 0.0)
  jax.tree.map(np.testing.assert_array_equal, (new_a, m_a), (new_b, m_b))
  _, m_c = update(state, other, 1.0)
  assert m_c["critic_loss"] != m_a["critic_loss"]


def test_update_masks_transitions_and_moves_params(state):
  update = jax.jit(lambda s, b: sac.update(CONFIG, s, b, jax.random.PRNGKey(4)))
  batch = _batch(jax.random.PRNGKey(5))
  # a ninth row with a huge reward: with mask 0 (a transition out of a `last` state) it does
  # not enter the loss; with mask 1 it dominates it.
  padded = jax.tree.map(lambda x: jnp.concatenate([x, x[:1]]), batch)
  padded = padded.replace(reward=padded.reward.at[-1].set(1e6), mask=padded.mask.at[-1].set(0.0))
  huge = padded.replace(mask=jnp.ones(9))
  _, m_masked = update(state, padded)
  _, m_huge = update(state, huge)
  assert abs(float(m_masked["critic_loss"])) < 1e3 < abs(float(m_huge["critic_loss"]))
  new, metrics = update(state, batch)
  assert int(new.step) == 1
  assert set(metrics) == {"critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "q"}
  # α (from 1) moves against the entropy's excess over −d_a; the target moves τ towards the critic
  excess = float(metrics["entropy"]) + D_A
  assert (float(metrics["alpha"]) - 1.0) * excess < 0
  tgt = jax.tree.leaves(new.target_critic)[0]
  old, cur = jax.tree.leaves(state.target_critic)[0], jax.tree.leaves(new.critic)[0]
  np.testing.assert_allclose(tgt, (1 - CONFIG.tau) * old + CONFIG.tau * cur, rtol=1e-5, atol=1e-7)


def test_deterministic_action_is_tanh_of_mean(state):
  obs, xi = jnp.ones((2, D_O)), jnp.zeros((2, 6))
  x = sac.network_input(obs, xi, 1.0)
  mean, _ = sac.actor_module(CONFIG, D_A).apply(state.actor, x)
  np.testing.assert_allclose(sac.act(CONFIG, state.actor, obs, xi, 1.0), np.tanh(mean), rtol=1e-6)
  assert sac.act_dim_of(state.actor) == D_A


def test_padded_entries_never_reach_the_losses():
  """A padded SAC (obs 8 with 5 valid, actions 4 with 3 valid) ignores its padded entries, and
  log π and the entropy target count only the valid action entries."""
  obs_mask, act_mask = jnp.array([1.0] * 5 + [0.0] * 3), jnp.array([1.0, 1.0, 1.0, 0.0])
  padded = sac.init(CONFIG, jax.random.PRNGKey(0), 8, 4)
  batch = _batch(jax.random.PRNGKey(5))
  batch = batch.replace(
    obs=specs.pad(batch.obs, 8), next_obs=specs.pad(batch.next_obs, 8),
    action=specs.pad(batch.action, 4),
  )  # fmt: skip
  garbage = batch.replace(
    obs=batch.obs.at[:, 5:].set(7.0), next_obs=batch.next_obs.at[:, 5:].set(-9.0),
    action=batch.action.at[:, 3].set(0.9),
  )  # fmt: skip
  update = jax.jit(
    lambda s, b: sac.update(CONFIG, s, b, jax.random.PRNGKey(4), 0.0, obs_mask, act_mask)
  )
  new_a, m_a = update(padded, batch)
  new_b, m_b = update(padded, garbage)
  jax.tree.map(np.testing.assert_array_equal, (new_a, m_a), (new_b, m_b))
  # unmasked, the garbage changes the losses
  _, m_c = jax.jit(lambda s, b: sac.update(CONFIG, s, b, jax.random.PRNGKey(4), 0.0))(
    padded, garbage
  )
  assert m_c["critic_loss"] != m_a["critic_loss"]
  # sampled actions are 0 on the padded entry; log π is the 3-dim density (by hand below)
  x = sac.network_input(batch.obs, batch.xi, 0.0, obs_mask)
  action, log_prob = sac.sample_action(CONFIG, padded.actor, x, jax.random.PRNGKey(9), act_mask)
  assert np.all(np.asarray(action)[:, 3] == 0)
  mean, log_std = sac.actor_module(CONFIG, 4).apply(padded.actor, x)
  u = mean + jnp.exp(log_std) * jax.random.normal(jax.random.PRNGKey(9), mean.shape)
  by_hand = sac.tanh_gaussian_log_prob(u[:, :3], mean[:, :3], log_std[:, :3])
  np.testing.assert_allclose(log_prob, by_hand, rtol=1e-6)
  assert float(sac.target_entropy(CONFIG, 4, act_mask)) == -3.0


def test_actor_and_critic_learning_rates(state):
  batch = _batch(jax.random.PRNGKey(5))
  for field, frozen, moved in (("actor_lr", "actor", "critic"), ("critic_lr", "critic", "actor")):
    config = dataclasses.replace(CONFIG, **{field: 0.0})
    assert sac.learning_rates(config)[0 if field == "actor_lr" else 1] == 0.0
    new, _ = sac.update(config, state, batch, jax.random.PRNGKey(4))
    same = jax.tree.leaves(getattr(new, frozen)), jax.tree.leaves(getattr(state, frozen))
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    changed = jax.tree.leaves(getattr(new, moved)), jax.tree.leaves(getattr(state, moved))
    assert not all(np.array_equal(a, b) for a, b in zip(*changed))
  assert sac.learning_rates(CONFIG) == (CONFIG.lr, CONFIG.lr, CONFIG.lr)
