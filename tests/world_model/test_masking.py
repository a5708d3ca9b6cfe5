"""Masking: padded entries, invalid steps and what lies under `empty` slots reach nothing.

Context from an earlier episode of the same scenario does reach c_t (METHOD.md Eq. 4-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _outputs(world_model, variables, batch):
  k = world_model.spec.context_len
  s0 = world_model.start(variables, batch)
  win = batch.window(k)
  return world_model.observe(
    variables, s0, win.obs, batch.action[:, k - 1 : -1], win.reward, win.first, win.valid,
    jax.random.key(5),
  )  # fmt: skip


@pytest.fixture(scope="module")
def evaluate(world_model, loss_fn, state):
  @jax.jit
  def f(variables, batch):
    _, metrics = loss_fn(variables, state.values, state.target, batch, jax.random.key(5))
    s, out = _outputs(world_model, variables, batch)
    s_img, img = world_model.rollout(variables, s, jnp.full((8, 3, 6), 0.2), jax.random.key(6))
    return metrics, out, s_img, img

  return f


def _scramble(batch, key):
  """Garbage (huge values and NaN) in every padded entry and every invalid step."""
  k1, k2, k3 = jax.random.split(key, 3)
  pad_o = (batch.obs_mask[:, None] == 0) | ~batch.valid[..., None]
  pad_a = (batch.act_mask[:, None] == 0) | ~batch.valid[..., None]
  junk_o = 1e3 * jax.random.normal(k1, batch.obs.shape)
  junk_o = junk_o.at[..., -1].set(jnp.nan)
  return batch.replace(
    obs=jnp.where(pad_o, junk_o, batch.obs),
    action=jnp.where(pad_a, 1e3 * jax.random.normal(k2, batch.action.shape), batch.action),
    reward=jnp.where(batch.valid, batch.reward, jax.random.normal(k3, batch.reward.shape)),
    first=jnp.where(batch.valid, batch.first, True),
  )


def test_padding_and_empty_slots_change_nothing(evaluate, variables, batch):
  assert (~batch.valid).any()  # rows 1 and 4 have empty context slots (and one training step)
  assert (batch.obs_mask == 0).any() and (batch.act_mask == 0).any()
  ref = evaluate(variables, batch)
  got = evaluate(variables, _scramble(batch, jax.random.key(0)))
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite(float(ref[0]["total"]))


def test_earlier_episode_in_context_changes_c(evaluate, variables, batch):
  """A row whose context holds an earlier episode: changing that episode changes c_t."""
  k = 8
  first = np.asarray(batch.first)
  valid = np.asarray(batch.valid)
  rows = [b for b in range(8) if valid[b, 0] and first[b, 1:k].any()]
  assert rows  # an episode boundary inside a full context: the steps before it are older
  row = rows[0]
  boundary = int(np.nonzero(first[row, 1:k])[0][0]) + 1
  changed = batch.replace(obs=batch.obs.at[row, :boundary].add(1.0))
  ref, got = evaluate(variables, batch), evaluate(variables, changed)
  c_ref, c_got = np.asarray(ref[1].c), np.asarray(got[1].c)
  assert np.abs(c_ref[row, 0] - c_got[row, 0]).max() > 1e-4
  others = [b for b in range(8) if b != row]
  np.testing.assert_array_equal(c_ref[others], c_got[others])  # other rows untouched
  assert float(ref[0]["total"]) != float(got[0]["total"])
