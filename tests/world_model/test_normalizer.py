"""The per-domain normaliser: fitted on valid data only, frozen, invertible."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mrcom_jax.envs import specs
from mrcom_jax.world_model import batch as batch_lib
from mrcom_jax.world_model import normalizer as normalizer_lib


def test_fit_by_hand():
  obs = np.zeros((3, 3, specs.OBS_PAD), np.float32)
  obs[0, :, 0] = [1.0, 3.0, 100.0]  # domain 0; the 100 is an invalid step
  obs[1, :, 0] = [5.0, 5.0, 5.0]  # domain 2: constant -> std floored
  obs[2, :, 0] = [2.0, 4.0, 6.0]  # domain 0
  obs[:, :, 1] = 7.0  # a padded entry
  valid = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], bool)
  mask = np.zeros((3, specs.OBS_PAD), np.float32)
  mask[:, 0] = 1
  norm = normalizer_lib.fit(obs, np.array([0, 2, 0]), valid, mask)
  # domain 0 entry 0: values 1, 3, 2, 4, 6 -> mean 3.2, std sqrt(14.8 / 5) = 1.720465
  np.testing.assert_allclose(norm.mean[0, 0], 3.2, rtol=1e-6)
  np.testing.assert_allclose(norm.std[0, 0], np.sqrt(14.8 / 5), rtol=1e-6)
  np.testing.assert_allclose([norm.mean[2, 0], norm.std[2, 0]], [5.0, 1e-3], rtol=1e-6)
  # padded entries and the unseen domain 1 keep (0, 1)
  np.testing.assert_array_equal([norm.mean[0, 1], norm.std[0, 1]], [0.0, 1.0])
  np.testing.assert_array_equal(norm.mean[1], 0.0)
  np.testing.assert_array_equal(norm.std[1], 1.0)


def test_normalize_roundtrip_per_row_domain():
  norm = normalizer_lib.Normalizer(
    mean=jnp.arange(3 * specs.OBS_PAD, dtype=jnp.float32).reshape(3, -1),
    std=jnp.full((3, specs.OBS_PAD), 2.0),
  )
  x = jnp.ones((2, 4, specs.OBS_PAD))
  domain = jnp.array([2, 0])
  y = norm.normalize(x, domain)
  np.testing.assert_allclose(y[0, 0, 0], (1.0 - 2 * specs.OBS_PAD) / 2.0)
  np.testing.assert_allclose(y[1, 3, 1], 0.0)
  np.testing.assert_allclose(norm.denormalize(y, domain), x, rtol=1e-6)
  ident = normalizer_lib.Normalizer.identity()
  np.testing.assert_array_equal(ident.normalize(x, domain), x)


def test_batch_window_and_sizes():
  b = batch_lib.Batch(
    obs=jnp.arange(2 * 5 * 27, dtype=jnp.float32).reshape(2, 5, 27),
    action=jnp.zeros((2, 5, 6)),
    reward=jnp.arange(10, dtype=jnp.float32).reshape(2, 5),
    first=jnp.zeros((2, 5), bool),
    valid=jnp.ones((2, 5), bool),
    domain=jnp.array([0, 1]),
    obs_mask=jnp.ones((2, 27)),
    act_mask=jnp.ones((2, 6)),
    xi=jnp.zeros((2, 6)),
  )
  w = b.window(3)
  assert (b.batch_size, b.length, w.length) == (2, 5, 2)
  np.testing.assert_array_equal(w.reward, [[3, 4], [8, 9]])
  assert w.domain is b.domain
