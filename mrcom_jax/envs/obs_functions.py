"""The observation functions of Table 3 (PROTOCOL.md), selected as data.

Each is a pure function of the clean observation and (experiment seed, domain, stream, step):
the key for a step is `fold_in(fold_in(fold_in(fold_in(PRNGKey(seed), domain), stream), step)`,
so a transition looks the same wherever it is seen (environment wrapper, context window,
training target). The function id is data (`lax.switch`): changing it does not recompile.
Outputs are padded to `specs.OBS_PAD` with zeros.

| id | name           | what                                                            |
|----|----------------|-----------------------------------------------------------------|
| 0  | none           | the suite's observation                                         |
| 1  | add_gaussian   | + N(0, (0.1·σ_d)²) on every dimension, σ_d from `obs_scale`     |
| 2  | add_distractor | append ⌈0.1·d_o⌉ dimensions of N(0, 1), fresh every step        |
| 3  | mask_random    | zero exactly ⌈0.1·d_o⌉ dimensions, fresh every step             |
| 4  | mask_fixed     | zero the same ⌈0.1·d_o⌉ dimensions, chosen once per (domain, seed) |
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mrcom_jax.envs import specs

OBS_FUNCTIONS = ("none", "add_gaussian", "add_distractor", "mask_random", "mask_fixed")
GAUSSIAN_SCALE = 0.1  # noise std as a fraction of σ_d
_FIXED_MASK_TAG = 0x5EED  # fold-in tag of the once-per-(domain, seed) mask draw
OBS_SCALE_FILE = os.path.join(os.path.dirname(__file__), "data", "obs_scale_v1.json")


def obs_fn_id(name: str) -> int:
  """Index of an observation function, with an error that lists the valid names."""
  if name not in OBS_FUNCTIONS:
    raise ValueError(f"unknown observation function {name!r}: choose one of {OBS_FUNCTIONS}")
  return OBS_FUNCTIONS.index(name)


def obs_width(domain: specs.DomainSpec, fn_id=None):
  """Observation width after the function (int, or an int32 array when `fn_id` is traced)."""
  if fn_id is None:
    return domain.obs_dim
  if isinstance(fn_id, int | np.integer):
    return domain.obs_dim + (domain.n_extra if fn_id == 2 else 0)
  return domain.obs_dim + jnp.where(fn_id == 2, domain.n_extra, 0)


@functools.cache
def obs_scale(domain: str) -> np.ndarray:
  """σ_d: [d_o] float32 per-dimension std of clean observations (shipped, versioned table)."""
  with open(OBS_SCALE_FILE) as f:
    table = json.load(f)
  sigma = np.asarray(table["sigma"][domain], np.float32)
  if sigma.shape != (specs.get_domain(domain).obs_dim,):
    raise ValueError(f"{OBS_SCALE_FILE}: σ for {domain} has shape {sigma.shape}")
  return sigma


def step_key(seed_key, domain_id: int, stream, step):
  """The key of one (domain, stream, step); `seed_key` is `jax.random.PRNGKey(seed)`."""
  key = jax.random.fold_in(jax.random.fold_in(seed_key, domain_id), stream)
  return jax.random.fold_in(key, step)


def fixed_mask_dims(seed_key, domain: specs.DomainSpec):
  """[n_extra] int32: the dimensions `mask_fixed` zeroes for this (domain, seed)."""
  key = jax.random.fold_in(jax.random.fold_in(seed_key, domain.id), _FIXED_MASK_TAG)
  return jax.random.permutation(key, domain.obs_dim)[: domain.n_extra]


def _pad(x):
  return jnp.pad(x, (0, specs.OBS_PAD - x.shape[0]))


def apply(fn_id, obs, seed_key, domain: specs.DomainSpec, stream, step, sigma=None):
  """Applies observation function `fn_id` to one clean observation.

  Args:
    fn_id: int32 scalar (data), an index into OBS_FUNCTIONS.
    obs: [d_o] float32 clean observation of `domain`.
    seed_key: PRNG key of the experiment seed.
    domain: the static DomainSpec.
    stream: int32 scalar, the env slot / stored stream the observation belongs to.
    step: int32 scalar, its step index within that stream.
    sigma: [d_o] σ_d; defaults to the shipped table.

  Returns:
    [OBS_PAD] float32: the perturbed observation, zero-padded.
  """
  d_o, n = domain.obs_dim, domain.n_extra
  if obs.shape != (d_o,):
    raise ValueError(f"{domain.name} observation must have shape ({d_o},), got {obs.shape}")
  sigma = jnp.asarray(obs_scale(domain.name) if sigma is None else sigma)
  key = step_key(seed_key, domain.id, stream, step)

  def mask(dims):
    return _pad(obs.at[dims].set(0.0))

  branches = (
    lambda: _pad(obs),
    lambda: _pad(obs + GAUSSIAN_SCALE * sigma * jax.random.normal(key, (d_o,))),
    lambda: _pad(jnp.concatenate([obs, jax.random.normal(key, (n,))])),
    lambda: mask(jax.random.permutation(key, d_o)[:n]),
    lambda: mask(fixed_mask_dims(seed_key, domain)),
  )
  return jax.lax.switch(jnp.clip(fn_id, 0, len(OBS_FUNCTIONS) - 1), branches)


def reapply_stochastic(fn_id, obs, domain_id, key, seed_key):
  """The observation function's stochastic part, re-applied to a padded model prediction.

  Imagined observations are decoded means (METHOD.md, Algorithm 2): this adds back what the
  function draws afresh every step, with the domain given as data, so one program serves padded
  rows of every domain. `add_gaussian` adds its noise to the suite's entries, `add_distractor`
  draws its appended entries afresh, `mask_random` zeroes ⌈0.1·d_o⌉ fresh entries and
  `mask_fixed` zeroes its fixed entries (deterministic, so the prediction's near-zeros become
  exact); `none` returns the prediction.

  Args:
    fn_id: int32 scalar (data), an index into OBS_FUNCTIONS.
    obs: [OBS_PAD] a predicted observation in raw units, zero beyond the domain's width.
    domain_id: int32 scalar (data), the row's domain.
    key: PRNG key of this draw.
    seed_key: PRNG key of the experiment seed (the `mask_fixed` dimensions).

  Returns:
    [OBS_PAD] float32.
  """
  pad = specs.OBS_PAD
  d_o = jnp.asarray([d.obs_dim for d in specs.DOMAINS])[domain_id]
  n = jnp.asarray([d.n_extra for d in specs.DOMAINS])[domain_id]
  sigma = jnp.asarray(np.stack([specs.pad(obs_scale(d.name), pad) for d in specs.DOMAINS]))
  idx = jnp.arange(pad)
  suite = idx < d_o

  def mask(dims_rank):  # zero the entries whose rank among the suite's entries is below n
    return jnp.where(suite & (dims_rank < n), 0.0, obs)

  def random_rank(k):
    scores = jnp.where(suite, jax.random.uniform(k, (pad,)), 2.0)
    return jnp.argsort(jnp.argsort(scores))

  def fixed_rank():
    masks = [jnp.zeros(pad, bool).at[fixed_mask_dims(seed_key, d)].set(True) for d in specs.DOMAINS]
    chosen = jnp.stack(masks)[domain_id]
    return jnp.where(chosen, 0, pad)  # rank 0 (< n) on the fixed entries, pad elsewhere

  branches = (
    lambda: obs,
    lambda: obs + GAUSSIAN_SCALE * sigma[domain_id] * jax.random.normal(key, (pad,)),
    lambda: jnp.where((idx >= d_o) & (idx < d_o + n), jax.random.normal(key, (pad,)), obs),
    lambda: mask(random_rank(key)),
    lambda: mask(fixed_rank()),
  )
  return jax.lax.switch(jnp.clip(fn_id, 0, len(OBS_FUNCTIONS) - 1), branches).astype(jnp.float32)
