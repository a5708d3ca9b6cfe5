"""A small synthetic multi-domain system for tests and benchmarks, in the `Batch` layout.

Each domain d has a fixed linear system in a latent x ∈ R^n, observed through its own matrix at
the domain's true observation width:
  x_0 ~ N(0, σ0² I) at every episode start,
  x_{t+1} = ρ x_t + W_d a_t + θ v_d,   o_t = C_d x_t,   r_t = sigmoid(x_t[0]) (0 at `first`),
with uniform random actions. θ is a hidden per-scenario parameter: the drift it adds is visible
only across transitions, i.e. through the context, never in o_0. It is written into ξ's β slot
(the model never reads ξ; only the scenario value does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mrcom_jax.envs import specs
from mrcom_jax.world_model import batch as batch_lib


@dataclasses.dataclass(frozen=True)
class System:
  """Fixed matrices, padded: w [ND, n, ACT_PAD], v [ND, n], c [ND, OBS_PAD, n]."""

  w: np.ndarray
  v: np.ndarray
  c: np.ndarray
  rho: float
  init_std: float
  episode_length: int


def make_system(seed: int = 0, latent: int = 3, rho: float = 0.6, episode_length: int = 12):
  """Draws the per-domain matrices (fixed for a seed)."""
  rng = np.random.default_rng(seed)
  nd = specs.NUM_DOMAINS
  w = np.zeros((nd, latent, specs.ACT_PAD), np.float32)
  c = np.zeros((nd, specs.OBS_PAD, latent), np.float32)
  v = np.zeros((nd, latent), np.float32)
  for d, dom in enumerate(specs.DOMAINS):
    w[d, :, : dom.act_dim] = rng.normal(size=(latent, dom.act_dim)) * 0.5 / np.sqrt(dom.act_dim)
    c[d, : dom.obs_dim] = rng.normal(size=(dom.obs_dim, latent)) / np.sqrt(latent)
    vd = rng.normal(size=latent)
    v[d] = vd / np.linalg.norm(vd)
  return System(w, v, c, rho, 0.5, episode_length)


def obs_mask(domain: jax.Array) -> jax.Array:
  """[B, OBS_PAD] float32: the suite's observation width of each row's domain."""
  widths = jnp.asarray([d.obs_dim for d in specs.DOMAINS])[domain]
  return (jnp.arange(specs.OBS_PAD) < widths[:, None]).astype(jnp.float32)


def act_mask(domain: jax.Array) -> jax.Array:
  """[B, ACT_PAD] float32: the action width of each row's domain."""
  widths = jnp.asarray([d.act_dim for d in specs.DOMAINS])[domain]
  return (jnp.arange(specs.ACT_PAD) < widths[:, None]).astype(jnp.float32)


def sample_thetas(key: jax.Array, n: int, held_out: bool = False, band=(0.45, 0.75)) -> jax.Array:
  """θ in [-1, 1] outside ±band (training) or inside ±band (held out): [n] float32."""
  key_m, key_s = jax.random.split(key)
  lo, hi = band
  if held_out:
    mag = jax.random.uniform(key_m, (n,), minval=lo, maxval=hi)
  else:  # uniform on [0, lo) ∪ (hi, 1]
    x = jax.random.uniform(key_m, (n,), maxval=lo + 1.0 - hi)
    mag = jnp.where(x < lo, x, x - lo + hi)
  return jnp.where(jax.random.bernoulli(key_s, 0.5, (n,)), mag, -mag)


def sample_batch(
  system: System,
  key: jax.Array,
  batch_size: int,
  length: int,
  domain: jax.Array | None = None,
  theta: jax.Array | None = None,
  start_at: int | None = None,
  p_short: float = 0.0,
) -> batch_lib.Batch:
  """Streams of `length` (= K + T) steps of one scenario each.

  Args:
    system: `make_system()`.
    key: PRNG key.
    batch_size: B.
    length: K + T.
    domain: [B] int32, or None for uniform domains.
    theta: [B] hidden parameters, or None for `sample_thetas` (training values).
    start_at: if set, step `start_at` of every row is an episode start (e.g. K, for open-loop
      evaluation); otherwise each row starts at a random phase.
    p_short: probability that a row's first steps (fewer than `length // 2`) hold no transition.

  Returns:
    A `Batch` with B rows.
  """
  keys = jax.random.split(key, 8)
  b, n = batch_size, system.v.shape[1]
  ep = system.episode_length
  if domain is None:
    domain = jax.random.randint(keys[0], (b,), 0, specs.NUM_DOMAINS)
  if theta is None:
    theta = sample_thetas(keys[1], b)
  if start_at is None:
    phase = jax.random.randint(keys[2], (b,), 0, ep)
  else:
    phase = jnp.full((b,), (-start_at) % ep)
  amask = act_mask(domain)
  actions = jax.random.uniform(keys[3], (length, b, specs.ACT_PAD), minval=-1, maxval=1) * amask
  x0 = jax.random.normal(keys[4], (length, b, n)) * system.init_std
  w, v = jnp.asarray(system.w)[domain], jnp.asarray(system.v)[domain]
  c = jnp.asarray(system.c)[domain]

  def step(x, inp):
    j, a, x_new = inp
    first = (phase + j) % ep == 0
    x = jnp.where(first[:, None], x_new, x)
    o = jnp.einsum("boi,bi->bo", c, x)
    r = jnp.where(first, 0.0, jax.nn.sigmoid(x[:, 0]))
    x_next = system.rho * x + jnp.einsum("bia,ba->bi", w, a) + theta[:, None] * v
    return x_next, (o, r, first)

  _, (obs, reward, first) = jax.lax.scan(step, x0[0], (jnp.arange(length), actions, x0))
  swap = lambda x: jnp.swapaxes(x, 0, 1)
  short = jax.random.bernoulli(keys[5], p_short, (b,))
  n_empty = jnp.where(short, jax.random.randint(keys[6], (b,), 1, max(length // 2, 2)), 0)
  valid = jnp.arange(length)[None] >= n_empty[:, None]
  xi = jnp.concatenate(
    [jax.nn.one_hot(domain, specs.NUM_DOMAINS), jnp.ones((b, 2)), theta[:, None]], axis=1
  )
  return batch_lib.Batch(
    obs=swap(obs),
    action=swap(actions),
    reward=swap(reward),
    first=swap(first),
    valid=valid,
    domain=domain.astype(jnp.int32),
    obs_mask=obs_mask(domain),
    act_mask=amask,
    xi=xi.astype(jnp.float32),
  )
