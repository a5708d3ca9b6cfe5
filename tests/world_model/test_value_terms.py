"""The value terms by hand (METHOD.md Eq. 13-15): TD target, L_V, L_mv and its normalisation.

Also Polyak averaging of the target value network V̄ (Eq. 14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.world_model import losses
from mrcom_jax.world_model import model as model_lib
from tests.world_model import conftest

KEY = jax.random.key(3)


def _perturbed(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def vbatch(batch):
  """The session's batch with rewards × 30, so that r_t's place in the TD target shows."""
  return batch.replace(reward=30.0 * batch.reward)


@pytest.fixture(scope="module")
def target(state):
  """V̄'s params, moved away from V's so that bootstrapping from the wrong network shows."""
  return {"v": _perturbed(state.values["v"], jax.random.key(11), 0.05)}


@pytest.fixture(scope="module")
def by_hand(world_model, variables, state, target, vbatch):
  batch = vbatch
  """Eq. 13-15 recomputed from `observe`'s outputs and the value networks, in numpy."""
  spec = world_model.spec
  k = spec.context_len
  win = batch.window(k)
  s0 = world_model.start(variables, batch)
  _, out = jax.jit(world_model.observe)(
    variables, s0, win.obs, batch.action[:, k - 1 : -1], win.reward, win.first, win.valid, KEY
  )
  value_net, meta_net = losses.make_values(spec)
  xi = jnp.broadcast_to(batch.xi[:, None], (*win.reward.shape, spec.xi_dim))
  v = np.asarray(value_net.apply({"params": state.values["v"]}, out.feat, xi))
  v_bar = np.asarray(value_net.apply({"params": target["v"]}, out.feat, xi))
  v_meta = np.asarray(meta_net.apply({"params": state.values["v_meta"]}, out.z, out.h))
  z_hat = out.prior_z.mean[:, 1:]  # ŝ_{t+1}: the prior mean, then one GRU step under a_t
  h_hat = world_model.net.apply(
    {"params": variables["params"]}, out.h[:, :-1], z_hat, out.ga[:, 1:], method="recur"
  )
  v_hat = np.asarray(meta_net.apply({"params": state.values["v_meta"]}, z_hat, h_hat))
  valid, first = np.asarray(win.valid), np.asarray(win.first)
  pairs = valid[:, :-1] & valid[:, 1:] & ~first[:, 1:]
  assert (~pairs & valid[:, :-1]).any()  # episode starts and invalid steps cut some pairs
  r = np.where(valid, np.asarray(win.reward), 0.0)
  g = spec.discount
  td = (v[:, :-1] - ((1 - g) * r[:, :-1] + g * v_bar[:, 1:])) ** 2
  mv_target = v_meta[:, 1:][pairs]
  var = np.mean((mv_target - mv_target.mean()) ** 2)
  align = (v_hat - v_meta[:, 1:]) ** 2
  return dict(
    td=td[pairs].mean(),
    td_from_v=((v[:, :-1] - ((1 - g) * r[:, :-1] + g * v[:, 1:])) ** 2)[pairs].mean(),
    td_next_reward=((v[:, :-1] - ((1 - g) * r[:, 1:] + g * v_bar[:, 1:])) ** 2)[pairs].mean(),
    meta_value=((v_meta - v) ** 2)[valid].mean(),
    meta_value_align_raw=align[pairs].mean(),
    meta_value_align=(align / (var + 1e-6))[pairs].mean(),
    mv_target_var=var,
  )


@pytest.fixture(scope="module")
def metrics(loss_fn, variables, state, target, vbatch):
  _, m = loss_fn(variables, state.values, target, vbatch, KEY)
  return jax.tree.map(float, m)


def test_td_target_bootstraps_from_the_target_network_with_r_t(metrics, by_hand):
  """Eq. 14: V(s̃_t, ξ) ← (1 − γ) r_t + γ V̄(s̃_{t+1}, ξ) over the pairs of one episode."""
  np.testing.assert_allclose(metrics["td"], by_hand["td"], rtol=1e-4)
  # The alternatives differ by far more than the tolerance, so the check can tell them apart.
  for wrong in ("td_from_v", "td_next_reward"):
    assert abs(by_hand[wrong] - by_hand["td"]) > 1e-2 * by_hand["td"], wrong


def test_meta_value_terms_by_hand(metrics, by_hand):
  """Eq. 13 and Eq. 15 ("match"), L_mv divided by the batch variance of sg V_meta(s̃_{t+1})."""
  for name in ("meta_value", "meta_value_align_raw", "mv_target_var", "meta_value_align"):
    np.testing.assert_allclose(metrics[name], by_hand[name], rtol=1e-4, err_msg=name)
  # At initialisation V_meta varies little over the batch (variance 0.03 here), so the
  # normalised term is far from the raw one and the check tells them apart.
  assert by_hand["mv_target_var"] < 0.1
  assert metrics["meta_value_align"] > 10 * metrics["meta_value_align_raw"]


def test_mv_normalize_off_gives_the_raw_term(variables, state, target, vbatch, metrics):
  c = conftest.make_test_config()
  c.mv_normalize = False
  loss = jax.jit(losses.make_loss(model_lib.make_world_model(c)))
  _, m = loss(variables, state.values, target, vbatch, KEY)
  np.testing.assert_allclose(m["meta_value_align"], metrics["meta_value_align_raw"], rtol=1e-6)
  np.testing.assert_allclose(m["recon"], metrics["recon"], rtol=1e-6)


def test_polyak_moves_the_target_by_tau_toward_the_new_values(state, target, batch):
  """V̄ ← τ V + (1 − τ) V̄ with V after this update's step, τ = 0.005 (Eq. 14)."""
  tau = conftest.make_test_config().target_tau
  new, _ = conftest.train_step_for("")(state.replace(target=target), batch)
  for v_new, t_old, t_new in zip(
    jax.tree.leaves(new.values["v"]), jax.tree.leaves(target["v"]), jax.tree.leaves(new.target)
  ):
    expect = tau * np.asarray(v_new) + (1 - tau) * np.asarray(t_old)
    np.testing.assert_allclose(t_new, expect, rtol=1e-6, atol=1e-7)
  moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(
    jax.tree.leaves(new.values["v"]), jax.tree.leaves(state.values["v"])
  )]  # fmt: skip
  assert max(moved) > 1e-4  # V took a step, so V̄ follows the new V, not the old one
