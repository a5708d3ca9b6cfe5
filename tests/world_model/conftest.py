"""Session-scoped fixtures for the world-model tests: one tiny config, batch and model.

Compilation dominates on CPU, so every test that can shares these objects and their jitted
functions (and the persistent compilation cache, when JAX_COMPILATION_CACHE_DIR is set).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from mrcom_jax.world_model import config as config_lib
from mrcom_jax.world_model import losses, synthetic, train
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import normalizer as normalizer_lib

DOMAINS = jnp.array([0, 0, 1, 1, 2, 2, 0, 1], jnp.int32)  # B = 8: divisible by 4 devices


def make_test_config():
  """tiny() with a learning rate that moves in a few hundred updates."""
  c = config_lib.tiny()
  c.model_opt.lr = 3e-3
  c.value_opt.lr = 3e-3
  return c


@pytest.fixture(scope="session")
def config():
  return make_test_config()


@pytest.fixture(scope="session")
def system():
  return synthetic.make_system(seed=0)


@functools.cache
def fitted_normalizer() -> normalizer_lib.Normalizer:
  """Fitted on 256 synthetic streams of the session's system."""
  system = synthetic.make_system(seed=0)
  big = synthetic.sample_batch(system, jax.random.key(123), 256, 24)
  return normalizer_lib.fit(big.obs, big.domain, big.valid, big.obs_mask)


@pytest.fixture(scope="session")
def normalizer():
  return fitted_normalizer()


@pytest.fixture(scope="session")
def batch(system, config):
  """B = 8 (domains 0 0 1 1 2 2 0 1), K + T = 8 + 16 steps; rows 1 and 4 start with empty slots."""
  b = synthetic.sample_batch(
    system, jax.random.key(7), 8, config.context_len + config.seq_len, domain=DOMAINS
  )
  n_empty = jnp.array([0, 5, 0, 0, 11, 0, 0, 0])
  return b.replace(valid=jnp.arange(b.length)[None] >= n_empty[:, None])


def config_for(name: str = ""):
  """The test config, with the ablation `name` switched on (none for "")."""
  return make_test_config() if not name else config_lib.with_ablation(make_test_config(), name)


@functools.cache
def world_model_for(name: str = "") -> model_lib.WorldModel:
  return model_lib.make_world_model(config_for(name))


@functools.cache
def train_step_for(name: str = "", diagnostics: bool = False):
  """One jitted train step per ablation, shared by every test (not donating its input).

  Without `diagnostics` (the per-term gradient norms, `train.make_update`) it compiles and runs
  about 2.4× faster on CPU; the tests of the diagnostics use the full model's with them.
  """
  return train.make_train_step(config_for(name), donate=False, diagnostics=diagnostics)


@functools.cache
def init_state_for(name: str = ""):
  """The initial TrainState of an ablation (fitted normaliser, seed 0)."""
  c = config_for(name)
  norm = fitted_normalizer()
  return jax.jit(lambda key: train.init_train_state(c, key, norm))(jax.random.key(0))


# Per-term gradients of `term_gradients`: Eq. 10's terms, L_ms, L_mv, L_V, L_TD, L_wm, unscaled.
TERMS = ("kl_z", "kl_u", "recon", "reward", "meta_state", "meta_value_align", "meta_value", "td")
TERMS += ("wm",)


@functools.cache
def term_gradients():
  """Jitted `(variables, values, target, batch, keys) -> {term: (d/d params, d/d values)}`.

  One jacrev of the full model's loss terms (TERMS), shared by the routing and diagnostics
  tests; a new batch of the same shape reuses the compiled program.
  """
  loss = losses.make_loss(world_model_for(""))

  def terms(params, values, variables, target, batch, keys):
    _, m = loss({**variables, "params": params}, values, target, batch, keys)
    return jnp.stack([m[t] for t in TERMS])

  jac = jax.jit(jax.jacrev(terms, argnums=(0, 1)))

  def grads(variables, values, target, batch, keys):
    g = jac(variables["params"], values, variables, target, batch, keys)
    return {t: jax.tree.map(lambda x, i=i: x[i], g) for i, t in enumerate(TERMS)}

  return grads


def train_keys(state, batch_size: int):
  """The [B] row keys a train step from `state` draws its loss noise from (`train.make_update`)."""
  return model_lib.row_keys(jax.random.split(state.key)[1], batch_size)


@pytest.fixture(scope="session")
def world_model():
  return world_model_for("")


@pytest.fixture(scope="session")
def state():
  """The initial TrainState of the full model."""
  return init_state_for("")


@pytest.fixture(scope="session")
def variables(state):
  return state.variables


@pytest.fixture(scope="session")
def loss_fn(world_model):
  """Jitted `loss(variables, values, target, batch, key)` of the full model."""
  return jax.jit(losses.make_loss(world_model))
