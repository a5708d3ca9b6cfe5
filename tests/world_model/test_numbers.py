"""Hand-computed numbers: KL, masked reconstruction, Bellman target, total loss (Eq. 10-16)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.models import context, gaussian
from mrcom_jax.world_model import losses


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
  """The loss's recon, reward and KL terms equal the formulas applied to `observe`'s outputs."""

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
  q, p = out.posterior_z, out.prior_z
  kl = np.sum(
    np.log(p.std / q.std) + (q.std**2 + (q.mean - p.mean) ** 2) / (2 * p.std**2) - 0.5, -1
  )
  np.testing.assert_allclose(metrics["kl_z"], np.maximum(kl, 1.0)[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(
    metrics["total"], losses.total_loss(metrics, world_model.spec), rtol=1e-6
  )
