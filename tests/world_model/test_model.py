"""The explicit-carry API: initial, start, observe, imagine, rollout (METHOD.md Eq. 4-9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.envs import specs


@pytest.fixture(scope="module")
def observe(world_model):
  return jax.jit(world_model.observe, static_argnames="sample")


def _window_inputs(world_model, batch, lo, hi):
  """observe's arguments for training-window steps [lo, hi)."""
  k = world_model.spec.context_len
  sl = slice(k + lo, k + hi)
  return (
    batch.obs[:, sl], batch.action[:, k + lo - 1 : k + hi - 1], batch.reward[:, sl],
    batch.first[:, sl], batch.valid[:, sl],
  )  # fmt: skip


def test_initial_is_empty(world_model):
  s = world_model.initial(jnp.array([0, 2]), jnp.ones((2, specs.OBS_PAD)), jnp.ones((2, 6)))
  spec = world_model.spec
  assert s.latent.feat.shape == (2, spec.stoch + spec.deter + spec.aux)
  assert not s.window.valid.any() and not s.valid.any()
  assert s.window.obs.shape == (2, spec.context_len, specs.OBS_PAD)
  np.testing.assert_array_equal(s.latent.feat, 0.0)


def test_start_holds_the_context_before_the_first_training_step(world_model, variables, batch):
  k = world_model.spec.context_len
  s = jax.jit(world_model.start)(variables, batch)
  norm = variables["normalizer"]
  expect = norm.normalize(batch.obs, batch.domain) * batch.obs_mask[:, None]
  expect = expect * batch.valid[..., None]  # invalid steps hold zeros
  # slot 0 is empty; slots 1..k−1 hold steps 0..k−2; step k−1 is the pending o_t.
  np.testing.assert_array_equal(s.window.valid[:, 0], False)
  np.testing.assert_array_equal(s.window.valid[:, 1:], batch.valid[:, : k - 1])
  valid = np.asarray(batch.valid[:, : k - 1])
  np.testing.assert_allclose(
    np.asarray(s.window.obs[:, 1:])[valid], np.asarray(expect[:, : k - 1])[valid], rtol=1e-6
  )
  np.testing.assert_allclose(s.obs, expect[:, k - 1], rtol=1e-6)
  np.testing.assert_array_equal(s.window.action[:, 1:], batch.action[:, : k - 1] * valid[..., None])


def test_observe_in_two_chunks_equals_one_call(world_model, variables, batch, observe):
  """The explicit carry continues a filter exactly (posterior means, so no noise)."""
  t = batch.length - world_model.spec.context_len
  s0 = world_model.start(variables, batch)
  key = jax.random.key(0)
  s_full, out = observe(variables, s0, *_window_inputs(world_model, batch, 0, t), key, False)
  s_half, out_a = observe(variables, s0, *_window_inputs(world_model, batch, 0, t // 2), key, False)
  s_two, out_b = observe(
    variables, s_half, *_window_inputs(world_model, batch, t // 2, t), key, False
  )
  for a, b in [(out.obs_pred[:, t // 2 :], out_b.obs_pred), (out.c[:, : t // 2], out_a.c)]:
    np.testing.assert_allclose(a, b, atol=1e-4)
  for a, b in zip(jax.tree.leaves(s_full), jax.tree.leaves(s_two)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  assert out.obs_pred.shape == (8, t, specs.OBS_PAD)
  assert out.reward_pred.shape == (8, t)
  assert np.isfinite(np.asarray(out.feat)).all()
  # Padded observation entries are never produced.
  pad = np.broadcast_to(np.asarray(batch.obs_mask)[:, None] == 0, out.obs_pred.shape)
  np.testing.assert_array_equal(np.asarray(out.obs_pred)[pad], 0)


def test_first_restarts_the_latent(world_model, variables, batch, observe):
  """At `first`, h_{t-1} is zeroed, and the previous action is zeroed in g(a_{t-1})."""
  t = batch.length - world_model.spec.context_len
  s0 = world_model.start(variables, batch)
  _, out = observe(variables, s0, *_window_inputs(world_model, batch, 0, t), jax.random.key(0))
  first = np.asarray(batch.window(world_model.spec.context_len).first)
  assert first.any() and (~first).any()
  np.testing.assert_array_equal(np.asarray(out.h_prev)[first], 0.0)
  assert np.abs(np.asarray(out.h_prev)[~first][1:]).sum() > 0
  ga_zero = world_model.net.apply(
    {"params": variables["params"]}, jnp.zeros((8, 6)), batch.domain, method="embed_action"
  )
  rows, steps = np.nonzero(first)
  np.testing.assert_allclose(np.asarray(out.ga)[rows, steps], np.asarray(ga_zero)[rows], atol=1e-6)


def test_imagine_slides_the_context_and_feeds_the_policy(world_model, variables, batch, observe):
  k = world_model.spec.context_len
  s0 = world_model.start(variables, batch)
  s, _ = observe(variables, s0, *_window_inputs(world_model, batch, 0, 4), jax.random.key(0))
  policy = lambda key, obs: jnp.tanh(obs[:, :6]) * 0.5 + 0.1
  h = 3
  imagine = jax.jit(world_model.imagine, static_argnums=(2, 3, 5))
  s_end, out = imagine(variables, s, policy, h, jax.random.key(1), False)
  assert out.obs.shape == (8, h, specs.OBS_PAD) and out.reward.shape == (8, h)
  assert np.isfinite(np.asarray(out.obs)).all()
  # The policy's first input is the real o_t in raw units (0 on padded entries); actions are
  # masked to the domain's width.
  raw = batch.obs[:, k + 3] * batch.obs_mask
  np.testing.assert_allclose(out.action[:, 0], policy(None, raw) * batch.act_mask, atol=1e-5)
  # Later actions see the decoded observations ô_{t+1}, ô_{t+2}.
  np.testing.assert_allclose(
    out.action[:, 1:],
    policy(None, out.obs[:, :-1].reshape(-1, 27)).reshape(8, h - 1, 6) * batch.act_mask[:, None],
    atol=1e-5,
  )
  # The window slid by H: its newest tokens hold the imagined observations (normalised).
  norm = variables["normalizer"]
  imagined = norm.normalize(out.obs[:, : h - 1], batch.domain) * batch.obs_mask[:, None]
  np.testing.assert_allclose(s_end.window.obs[:, -(h - 1) :], imagined, atol=1e-5)
  np.testing.assert_allclose(s_end.window.reward[:, -(h - 1) :], out.reward[:, : h - 1], atol=1e-6)
  np.testing.assert_array_equal(s_end.window.valid[:, -(h - 1) :], True)
  np.testing.assert_allclose(s_end.window.obs[:, : k - h], s.window.obs[:, h:], atol=0)
  # Open-loop rollout under the same actions gives the same trajectory (prior means).
  rollout = jax.jit(world_model.rollout, static_argnums=4)
  _, again = rollout(variables, s, out.action, jax.random.key(1), False)
  np.testing.assert_allclose(again.obs, out.obs, atol=1e-5)


@pytest.mark.slow
def test_rollout_is_deterministic_without_sampling(world_model, variables, batch):
  s = world_model.start(variables, batch)
  actions = jnp.ones((8, 4, 6)) * 0.3
  rollout = jax.jit(world_model.rollout, static_argnums=4)
  _, a = rollout(variables, s, actions, jax.random.key(1), False)
  _, b = rollout(variables, s, actions, jax.random.key(2), False)
  _, c = rollout(variables, s, actions, jax.random.key(2), True)
  np.testing.assert_array_equal(a.obs, b.obs)
  assert np.abs(np.asarray(a.obs) - np.asarray(c.obs)).max() > 1e-3


def test_step_is_one_step_of_rollout(world_model, variables, batch):
  """`step` (adaptation's rollout loop) is exactly `rollout`'s step under the same key."""
  s = world_model.start(variables, batch)
  actions = jnp.ones((8, 2, 6)) * 0.3
  key = jax.random.key(3)
  s_roll, out = jax.jit(world_model.rollout)(variables, s, actions, key)
  keys = jax.random.split(key, 2)
  step = jax.jit(world_model.step)
  s1, one = step(variables, s, actions[:, 0], keys[0])
  s2, two = step(variables, s1, actions[:, 1], keys[1])
  np.testing.assert_allclose(one.obs, out.obs[:, 0], atol=1e-6)
  np.testing.assert_allclose(two.reward, out.reward[:, 1], atol=1e-6)
  np.testing.assert_allclose(s2.latent.feat, s_roll.latent.feat, atol=1e-6)


PREDICTED = ("c", "h_prev", "ga", "prior_z", "prior_u", "meta_state")  # what step t predicts
POSTERIOR = ("posterior_z", "posterior_u", "z", "h", "u", "obs_pred", "reward_pred")


@pytest.mark.parametrize("what", ["obs", "reward", "action"])
def test_step_t_inputs_reach_only_the_posterior_at_t_and_the_context_after(
  world_model, variables, batch, observe, what
):
  """Causality (METHOD.md Eq. 4-9): o_t, r_t and a_t are not seen by anything predicting step t.

  Perturbing o_t changes the posterior at t and nothing else at t; r_t and a_t change nothing
  at t. Each reaches c_{t+1} (its token); a_t also reaches g(a_t) at t+1. Earlier steps and
  other rows never change.
  """
  k = world_model.spec.context_len
  t_len = batch.length - k
  row = 0
  first = np.asarray(batch.first)[row, k:]
  assert np.asarray(batch.valid)[row].all()
  t = next(i for i in range(3, t_len - 2) if not first[i] and not first[i + 1])
  i = k + t  # the batch index of training step t
  if what == "obs":
    changed = batch.replace(obs=batch.obs.at[row, i].add(batch.obs_mask[row]))
  elif what == "reward":
    changed = batch.replace(reward=batch.reward.at[row, i].add(1.0))
  else:
    changed = batch.replace(action=batch.action.at[row, i].add(0.5 * batch.act_mask[row]))
  key = jax.random.key(0)

  def run(b):
    s0 = world_model.start(variables, b)
    return observe(variables, s0, *_window_inputs(world_model, b, 0, t_len), key, False)[1]

  ref, got = run(batch), run(changed)

  def field(out, name):
    return [np.asarray(x) for x in jax.tree.leaves(getattr(out, name))]

  def moved(name, step):
    return max(
      np.abs(a[row, step] - b[row, step]).max() for a, b in zip(field(ref, name), field(got, name))
    )

  for name in PREDICTED + POSTERIOR:
    for a, b in zip(field(ref, name), field(got, name)):
      np.testing.assert_array_equal(a[:, :t], b[:, :t], err_msg=f"{name} before t")
      np.testing.assert_array_equal(np.delete(a, row, 0), np.delete(b, row, 0), err_msg=name)
  for name in PREDICTED:
    assert moved(name, t) == 0, name
  for name in POSTERIOR:
    assert (moved(name, t) > 1e-4) == (what == "obs"), (name, moved(name, t))
  assert moved("c", t + 1) > 1e-4  # the token (o_t, a_t, r_t) enters C_{t+1}
  assert (moved("ga", t + 1) > 1e-4) == (what == "action")
