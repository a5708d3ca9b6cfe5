"""Hand-computed numbers: KL, masked reconstruction, Bellman target, total loss (Eq. 10-16)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.models import context, gaussian
from mrcom_jax.world_model import losses

KEY = jax.random.key(3)


def test_diagonal_gaussian_kl_by_hand():
  q = gaussian.DiagGaussian(jnp.array([1.0, 0.0]), jnp.array([1.0, 2.0]))
  p = gaussian.DiagGaussian(jnp.array([0.0, 0.0]), jnp.array([2.0, 1.0]))
  # dim 0: ln(2/1) + (1² + 1²)/(2·2²) − ½ = 0.693147 + 0.25 − 0.5 = 0.443147
  # dim 1: ln(1/2) + (2² + 0²)/(2·1²) − ½ = −0.693147 + 2 − 0.5 = 0.806853
  np.testing.assert_allclose(gaussian.kl_divergence(q, p), 1.25, rtol=1e-6)
  np.testing.assert_allclose(gaussian.kl_divergence(q, q), 0.0, atol=1e-7)


def test_gaussian_sample_is_reparameterised():
  g = gaussian.DiagGaussian(jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0]))
  np.testing.assert_allclose(g.sample(jnp.array([2.0, -1.0])), [2.0, -3.0])


def test_free_bits_floor():
  np.testing.assert_allclose(losses.free_bits(jnp.array([0.3, 1.0, 2.5]), 1.0), [1.0, 1.0, 2.5])


def test_masked_reconstruction_by_hand():
  pred = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.0, 9.0]])
  target = jnp.zeros((2, 3))
  mask = jnp.array([1.0, 1.0, 0.0])  # the third entry is padding
  # ½ (1 + 4) = 2.5 and ½ (0.25 + 0) = 0.125; the 3 and 9 never count
  np.testing.assert_allclose(losses.gaussian_nll(pred, target, mask), [2.5, 0.125])
  np.testing.assert_allclose(losses.gaussian_nll(pred, target), [7.0, 40.625])


def test_masked_mean_by_hand():
  x = jnp.array([[1.0, 2.0], [3.0, jnp.nan]])
  mask = jnp.array([[True, True], [True, False]])
  np.testing.assert_allclose(losses.masked_mean(x, mask), 2.0)  # (1 + 2 + 3) / 3, NaN masked
  np.testing.assert_allclose(losses.masked_mean(x, jnp.zeros((2, 2), bool)), 0.0)


def test_bellman_target_by_hand():
  # (1 − 0.9)·0.5 + 0.9·0.8 = 0.05 + 0.72 = 0.77 (the (1 − γ) scale of Eq. 14)
  np.testing.assert_allclose(losses.td_target(jnp.array(0.5), jnp.array(0.8), 0.9), 0.77)
  # A constant reward r has the fixed point V = r on this scale.
  np.testing.assert_allclose(losses.td_target(0.3, 0.3, 0.99), 0.3, rtol=1e-6)


def test_total_loss_from_given_terms():
  terms = dict(
    kl_z=1.0, kl_u=2.0, recon=3.0, reward=4.0, meta_state=5.0, meta_value_align=6.0,
    meta_value=7.0, td=8.0,
  )  # fmt: skip
  terms = {k: jnp.array(v) for k, v in terms.items()}
  spec = types.SimpleNamespace(lambda_ms=0.1, lambda_mv=1.0, lambda_v=1.0)
  # L_wm = 1 + 2 + 3 + 4 = 10; + 0.1·5 + 1·6 + 1·(7 + 8) = 31.5
  np.testing.assert_allclose(losses.total_loss(terms, spec), 31.5, rtol=1e-6)
  np.testing.assert_allclose(losses.world_model_loss(terms), 10.0)
  off = types.SimpleNamespace(lambda_ms=0.0, lambda_mv=0.0, lambda_v=0.0)
  np.testing.assert_allclose(losses.total_loss(terms, off), 10.0)
  wm_only = {k: terms[k] for k in ("kl_z", "kl_u", "recon", "reward")}
  np.testing.assert_allclose(losses.total_loss(wm_only, spec), 10.0)


def test_pair_mask_never_spans_episodes():
  first = jnp.array([[True, False, True, False]])
  valid = jnp.array([[True, True, True, False]])
  # (0,1) ok; (1,2) crosses an episode start; (2,3) reaches an invalid step
  np.testing.assert_array_equal(losses.pair_mask(first, valid), [[True, False, False]])


@pytest.mark.parametrize(("embed", "heads", "width"), [(128, 3, 43), (33, 3, 11), (64, 4, 16)])
def test_head_width(embed, heads, width):
  assert context.head_width(embed, heads) == width


def test_loss_terms_match_hand_computation_on_model_outputs(
  world_model, variables, batch, loss_fn, state
):
  """The loss's recon, reward and KL terms equal the formulas applied to `observe`'s outputs.

  Every KL is KL(q ‖ p) with q the posterior (checked against the reverse direction); Eq. 10's
  KLs are logged before and after free bits, and L_ms has none.
  """

  k = world_model.spec.context_len
  key = jax.random.key(3)
  _, metrics = loss_fn(variables, state.values, state.target, batch, key)
  s0 = world_model.start(variables, batch)
  win = batch.window(k)
  _, out = jax.jit(world_model.observe)(
    variables, s0, win.obs, batch.action[:, k - 1 : -1], win.reward, win.first, win.valid, key
  )
  valid = np.asarray(win.valid)
  mask = np.asarray(batch.obs_mask)[:, None]
  norm = variables["normalizer"]
  target = np.asarray(norm.normalize(win.obs, batch.domain)) * mask
  sq = 0.5 * np.sum(mask * (np.asarray(out.obs_pred) - target) ** 2, -1)
  np.testing.assert_allclose(metrics["recon"], sq[valid].mean(), rtol=1e-5)
  rew = 0.5 * (np.asarray(out.reward_pred) - np.asarray(win.reward)) ** 2
  np.testing.assert_allclose(metrics["reward"], rew[valid].mean(), rtol=1e-5)

  def kl(q, p):  # KL(q ‖ p) of diagonal Gaussians, summed over dimensions
    q_m, q_s, p_m, p_s = (np.asarray(x) for x in (q.mean, q.std, p.mean, p.std))
    return np.sum(np.log(p_s / q_s) + (q_s**2 + (q_m - p_m) ** 2) / (2 * p_s**2) - 0.5, -1)

  # Eq. 10: KL(posterior ‖ prior), before (raw) and after the 1-nat floor, for z and for u.
  for name, q, p in [
    ("kl_z", out.posterior_z, out.prior_z),
    ("kl_u", out.posterior_u, out.prior_u),
  ]:
    forward, reverse = kl(q, p)[valid].mean(), kl(p, q)[valid].mean()
    assert abs(forward - reverse) > 0.05 * forward  # the directions differ on this batch
    np.testing.assert_allclose(metrics[f"{name}_raw"], forward, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics[name], np.maximum(kl(q, p), 1.0)[valid].mean(), rtol=1e-5)
  # Eq. 12: KL(q(z | e(o), ...) ‖ r_ψ(z | ...)), without a floor (see the test below).
  ms = kl(out.posterior_z, out.meta_state)
  np.testing.assert_allclose(metrics["meta_state"], ms[valid].mean(), rtol=1e-5)
  assert abs(kl(out.meta_state, out.posterior_z)[valid].mean() - ms[valid].mean()) > 1e-3
  np.testing.assert_allclose(
    metrics["total"], losses.total_loss(metrics, world_model.spec), rtol=1e-6
  )


def _constant_head(params, head: str, mean: float):
  """`head`'s Gaussian made constant: N(mean, softplus(0) + 0.1) whatever its input."""
  out = params[head]["mlp"]["out"]
  stoch = out["bias"].shape[-1] // 2
  bias = jnp.concatenate([jnp.full((stoch,), mean), jnp.zeros(stoch)])
  new_out = {"kernel": jnp.zeros_like(out["kernel"]), "bias": bias}
  return {**params, head: {**params[head], "mlp": {**params[head]["mlp"], "out": new_out}}}


def test_meta_state_has_no_free_bits(loss_fn, variables, state, batch):
  """L_ms counts a KL below 1 nat as it is (Eq. 12); Eq. 10's KLs are floored at 1 nat."""
  params = _constant_head(variables["params"], "posterior_z", 0.0)
  params = _constant_head(params, "r_psi", 0.2)
  _, m = loss_fn({**variables, "params": params}, state.values, state.target, batch, KEY)
  std = float(jax.nn.softplus(0.0)) + 0.1
  stoch = variables["params"]["r_psi"]["mlp"]["out"]["bias"].shape[-1] // 2
  expect = stoch * 0.2**2 / (2 * std**2)  # KL of two Gaussians 0.2 apart per dimension: 0.51
  assert expect < 1.0
  np.testing.assert_allclose(m["meta_state"], expect, rtol=1e-5)
  assert float(m["kl_z"]) >= 1.0 and float(m["kl_u"]) >= 1.0  # Eq. 10's floors
