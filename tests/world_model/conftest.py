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
def train_step_for(name: str = ""):
  """One jitted train step per ablation, shared by every test (not donating its input)."""
  return train.make_train_step(config_for(name), donate=False)


@functools.cache
def init_state_for(name: str = ""):
  """The initial TrainState of an ablation (fitted normaliser, seed 0)."""
  c = config_for(name)
  norm = fitted_normalizer()
  return jax.jit(lambda key: train.init_train_state(c, key, norm))(jax.random.key(0))


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
