"""Open-loop prediction error of a world model (METHOD.md Eq. 6-9 rolled out under the prior)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mrcom_jax.world_model import batch as batch_lib
from mrcom_jax.world_model import model as model_lib


def open_loop_errors(
  world_model: model_lib.WorldModel,
  variables,
  batch: batch_lib.Batch,
  burn_in: int,
  horizon: int,
  key: jax.Array,
) -> jax.Array:
  """Squared error of each open-loop prediction step, in normalised units, per valid entry.

  Filters the first `burn_in` steps of the training window under the posterior (with their
  context windows), then rolls the prior mean out for `horizon` steps under the recorded actions
  and compares the decoded means with the recorded observations. The rows' steps
  K .. K + burn_in + horizon − 1 should lie in one episode.

  Args:
    world_model: `make_world_model(config)`.
    variables: its variables.
    batch: a `Batch` with K + T steps, T >= burn_in + horizon.
    burn_in: filtered steps (>= 1).
    horizon: predicted steps.
    key: PRNG key (posterior samples during the burn-in).

  Returns:
    [B, horizon]: per row and predicted step k (1 … horizon), the mean squared error over the
    valid observation entries. Step k's error does not depend on `horizon` (the prior mean is
    rolled out deterministically), so one call with the longest horizon serves every shorter one.
  """
  k = world_model.spec.context_len
  state = world_model.start(variables, batch)
  sl = slice(k, k + burn_in)
  state, _ = world_model.observe(
    variables, state, batch.obs[:, sl], batch.action[:, k - 1 : k + burn_in - 1],
    batch.reward[:, sl], batch.first[:, sl], batch.valid[:, sl], key,
  )  # fmt: skip
  t0 = k + burn_in - 1
  actions = batch.action[:, t0 : t0 + horizon]
  _, out = world_model.rollout(variables, state, actions, key, sample=False)
  norm = variables["normalizer"]
  target = norm.normalize(batch.obs[:, t0 + 1 : t0 + 1 + horizon], batch.domain)
  pred = norm.normalize(out.obs, batch.domain)
  mask = batch.obs_mask[:, None] > 0
  sq = jnp.where(mask, jnp.square(pred - target), 0.0)
  return jnp.sum(sq, axis=2) / jnp.sum(batch.obs_mask, axis=1)[:, None]


def open_loop_error(
  world_model: model_lib.WorldModel,
  variables,
  batch: batch_lib.Batch,
  burn_in: int,
  horizon: int,
  key: jax.Array,
) -> jax.Array:
  """Mean squared error of open-loop predictions over `horizon` steps: [B].

  The mean over the first `horizon` entries of `open_loop_errors` (see there for the arguments).
  """
  return jnp.mean(open_loop_errors(world_model, variables, batch, burn_in, horizon, key), axis=1)
