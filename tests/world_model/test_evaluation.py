"""Open-loop prediction errors: per-step errors, their prefix means and horizon independence."""

from __future__ import annotations

import jax
import numpy as np

from mrcom_jax.world_model import evaluation


def test_per_step_errors_do_not_depend_on_horizon(world_model, variables, batch):
  key = jax.random.key(3)
  long = np.asarray(evaluation.open_loop_errors(world_model, variables, batch, 2, 6, key))
  short = np.asarray(evaluation.open_loop_errors(world_model, variables, batch, 2, 3, key))
  assert long.shape == (8, 6) and short.shape == (8, 3)
  np.testing.assert_allclose(long[:, :3], short, rtol=1e-5, atol=1e-6)
  mean3 = np.asarray(evaluation.open_loop_error(world_model, variables, batch, 2, 3, key))
  np.testing.assert_allclose(mean3, short.mean(axis=1), rtol=1e-5)
  assert np.all(long >= 0) and np.all(np.isfinite(long))
