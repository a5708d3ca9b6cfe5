"""Gradient routing (METHOD.md Eq. 13-16): each term updates exactly the parameters it names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.world_model import losses
from tests.world_model import conftest


@pytest.fixture(scope="module")
def grads(state, batch):
  """Per-term gradients {term: (d/d world-model params, d/d value params)}, one jacrev."""
  keys = conftest.train_keys(state, batch.batch_size)
  return conftest.term_gradients()(state.variables, state.values, state.target, batch, keys)


def _norm(tree) -> float:
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def _moved(tree) -> set[str]:
  return {name for name, sub in tree.items() if _norm(sub) > 0}


WORLD_MODEL = {"obs_encoder", "action_embed", "decoder", "token_map", "context_encoder"}
WORLD_MODEL |= {"prior_z", "posterior_z", "gru", "prior_u", "posterior_u", "reward_head"}


def test_world_model_loss_moves_the_world_model_only(grads):
  g_model, g_values = grads["wm"]
  assert _moved(g_model) == WORLD_MODEL  # everything but r_ψ
  assert _norm(g_values) == 0


def test_meta_state_moves_r_psi_and_the_posterior(grads):
  g_model, g_values = grads["meta_state"]
  moved = _moved(g_model)
  assert {"r_psi", "posterior_z", "obs_encoder", "context_encoder"} <= moved
  assert not moved & {"decoder", "reward_head", "prior_z", "prior_u", "posterior_u"}
  assert _norm(g_values) == 0


def test_alignment_moves_the_world_model_and_not_the_values(grads):
  g_model, g_values = grads["meta_value_align"]
  moved = _moved(g_model)
  assert {"prior_z", "gru", "context_encoder", "posterior_z", "action_embed"} <= moved
  assert "r_psi" not in moved and "decoder" not in moved
  assert _norm(g_values) == 0  # V_meta's parameters are held fixed in L_mv


@pytest.mark.parametrize("term", ["recon", "reward"])
def test_u_reaches_the_decoder_and_the_reward_head(grads, term):
  """u is part of s̃ = [z, h, u]: the likelihood terms train q(u | e(o), c) through it (Eq. 9)."""
  g_model, _ = grads[term]
  head = "decoder" if term == "recon" else "reward_head"
  assert _norm(g_model["posterior_u"]) > 1e-3 * _norm(g_model[head])
  assert _norm(g_model["prior_u"]) == 0  # p(u | c) enters Eq. 10 through KL_u alone
  assert _norm(grads["kl_u"][0]["prior_u"]) > 0


def test_meta_value_moves_v_meta_only(grads):
  g_model, g_values = grads["meta_value"]
  assert _norm(g_model) == 0
  assert _norm(g_values["v_meta"]) > 0 and _norm(g_values["v"]) == 0


def test_td_moves_v_only(grads):
  g_model, g_values = grads["td"]
  assert _norm(g_model) == 0
  assert _norm(g_values["v"]) > 0 and _norm(g_values["v_meta"]) == 0


@pytest.mark.slow
def test_total_gradient_is_the_sum_of_scaled_terms(grads, world_model, state, batch):
  """The one gradient a train step takes equals Σ λ · per-term gradients (Eq. 16)."""
  loss = losses.make_loss(world_model)
  spec = world_model.spec

  def total(params, values):
    keys = conftest.train_keys(state, batch.batch_size)
    return loss({**state.variables, "params": params}, values, state.target, batch, keys)[0]

  g_model, g_values = jax.jit(jax.grad(total, argnums=(0, 1)))(
    state.variables["params"], state.values
  )
  scale = dict(wm=1.0, meta_state=spec.lambda_ms, meta_value_align=spec.lambda_mv)
  scale.update(meta_value=spec.lambda_v, td=spec.lambda_v)
  expect = jax.tree.map(
    lambda *g: sum(s * x for s, x in zip(scale.values(), g)), *[grads[t] for t in scale]
  )
  for a, b in zip(jax.tree.leaves((g_model, g_values)), jax.tree.leaves(expect)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
