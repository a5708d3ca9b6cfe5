"""MrCoM's world model as pure functions with an explicit carry (METHOD.md Eq. 4-9).

`make_world_model(config)` returns closures over one `WorldModelNet`:
- `init(key)` -> variables `{'params': ..., 'normalizer': Normalizer}`;
- `initial(domain, obs_mask, act_mask)` -> an empty `WorldState` (zero latent, empty window);
- `start(variables, batch)` -> the state at step K−1 of a `Batch`, primed with its context;
- `observe(variables, state, obs, prev_action, reward, first, valid, key)` -> posterior
  filtering over a sequence, a scan of the one-step posterior;
- `imagine(variables, state, policy, horizon, key)` / `rollout(variables, state, actions, key)`
  -> prior rollouts that decode observations and rewards, the context sliding with them;
- `step(variables, state, action, key)` -> one prior step (for callers that write their own
  rollout loop, e.g. adaptation, which perturbs every decoded observation before acting on it).

A `WorldState` is the model at step t *before* a_t is chosen: the latent s̃_t, the context window
C_t (the k complete tokens before t) and the pending o_t, r_t whose token waits for a_t.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from mrcom_jax.models import gaussian
from mrcom_jax.world_model import batch as batch_lib
from mrcom_jax.world_model import config as config_lib
from mrcom_jax.world_model import networks
from mrcom_jax.world_model import normalizer as normalizer_lib

Variables = dict[str, Any]


@struct.dataclass
class LatentState:
  """s̃_t = [z_t, h_t, u_t]: z [B, S], h [B, D] (D = 0 without h), u [B, U]."""

  z: jax.Array
  h: jax.Array
  u: jax.Array

  @property
  def feat(self) -> jax.Array:
    return jnp.concatenate([self.z, self.h, self.u], axis=-1)


@struct.dataclass
class ContextWindow:
  """The k most recent complete tokens (o, a, r, first), oldest first.

  Attributes:
    obs: [B, k, 27] normalised, masked. action: [B, k, 6] masked. reward: [B, k].
    first: [B, k] bool. valid: [B, k] bool; False slots are the learned `empty` token.
  """

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  first: jax.Array
  valid: jax.Array

  def push(self, obs, action, reward, first, valid) -> ContextWindow:
    """First-in-first-out: drops the oldest slot, appends one token ([B, ...] each)."""
    new = (obs, action, reward, first, valid)
    old = (self.obs, self.action, self.reward, self.first, self.valid)
    return ContextWindow(*(jnp.concatenate([o[:, 1:], n[:, None]], 1) for o, n in zip(old, new)))


@struct.dataclass
class WorldState:
  """The explicit carry: s̃_t, C_t and the pending (o_t, r_t) of step t.

  Attributes:
    latent: s̃_t. window: C_t. obs: [B, 27] normalised o_t. reward: [B] r_t.
    first: [B] bool. valid: [B] bool. domain: [B] int32. obs_mask: [B, 27]. act_mask: [B, 6].
  """

  latent: LatentState
  window: ContextWindow
  obs: jax.Array
  reward: jax.Array
  first: jax.Array
  valid: jax.Array
  domain: jax.Array
  obs_mask: jax.Array
  act_mask: jax.Array


@struct.dataclass
class Filtered:
  """Per-step outputs of `observe`, each [B, T, ...].

  c: context c_t. h_prev: h_{t-1} after the reset at `first`. ga: g(a_{t-1}). z, h, u: the
  posterior state s̃_t. prior_z, posterior_z, prior_u, posterior_u, meta_state (r_ψ, or None):
  Gaussians. obs_pred: decoded mean, normalised, 0 on padded entries. reward_pred: r̂_t.
  obs_target: the normalised observation, 0 on padded entries and invalid steps.
  """

  c: jax.Array
  h_prev: jax.Array
  ga: jax.Array
  z: jax.Array
  h: jax.Array
  u: jax.Array
  prior_z: gaussian.DiagGaussian
  posterior_z: gaussian.DiagGaussian
  prior_u: gaussian.DiagGaussian
  posterior_u: gaussian.DiagGaussian
  meta_state: gaussian.DiagGaussian | None
  obs_pred: jax.Array
  reward_pred: jax.Array
  obs_target: jax.Array

  @property
  def feat(self) -> jax.Array:
    return jnp.concatenate([self.z, self.h, self.u], axis=-1)


@struct.dataclass
class Imagined:
  """A prior rollout, [B, H, ...]: obs ô_{t+1} (raw units, 0 on padded entries), action a_t,
  reward r̂_{t+1} (reward head at ŝ_{t+1}), feat ŝ_{t+1}."""

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  feat: jax.Array


def row_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """One key per row: `key` is split B ways, or returned if it already holds [B] keys.

  Per-row keys make a row's noise independent of the rest of the batch and of sharding.
  """
  is_typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == (0 if is_typed else 1)
  return jax.random.split(key, batch_size) if single else key


def _fan_in(path: tuple[str, ...], shape: tuple[int, ...]) -> int:
  if len(shape) == 2:  # Dense [in, out]
    return shape[0]
  if "attn" in path:  # DenseGeneral: query/key/value [E, H, Dh], out [H, Dh, E]
    return shape[0] * shape[1] if path[-2] == "out" else shape[0]
  return shape[-2]  # DomainDense [domains, in, out]


def init_params(shapes, key: jax.Array):
  """Initial parameters for a tree of shapes, drawn with a single random call.

  Kernels are LeCun normal (truncated at 2σ, std 1/√fan_in), biases 0, LayerNorm scales 1,
  the `empty` token and positions N(0, 0.02²), the constant context 0. One draw compiles in about
  a second; Flax's per-parameter initialisers compile a PRNG program per parameter (~20 s per
  model on a 2-core CPU).

  Args:
    shapes: a params tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape` of `init`).
    key: PRNG key.

  Returns:
    The params tree, float32.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  sizes = [leaf.size for _, leaf in flat]
  noise = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),)) / 0.87962566
  out, offset = [], 0
  for (path, leaf), size in zip(flat, sizes):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    x = noise[offset : offset + size].reshape(leaf.shape)
    offset += size
    if names[-1] == "kernel":
      out.append(x / jnp.sqrt(_fan_in(names, leaf.shape)))
    elif names[-1] in ("empty", "pos"):
      out.append(0.02 * x)
    elif names[-1] == "scale":
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:  # biases, the constant context
      out.append(jnp.zeros(leaf.shape, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class WorldModel:
  """The world model's pure functions (see the module docstring) and its networks."""

  spec: config_lib.Spec
  net: networks.WorldModelNet
  init: Callable[..., Variables]
  initial: Callable[..., WorldState]
  start: Callable[..., WorldState]
  observe: Callable[..., tuple[WorldState, Filtered]]
  imagine: Callable[..., tuple[WorldState, Imagined]]
  rollout: Callable[..., tuple[WorldState, Imagined]]
  step: Callable[..., tuple[WorldState, Imagined]]


def make_world_model(config) -> WorldModel:
  """Builds the world model's pure functions from a config (`config.get_config()`)."""
  spec = config_lib.resolve(config)
  net = networks.WorldModelNet(spec)
  k = spec.context_len

  def call(variables, method, *args):
    return net.apply({"params": variables["params"]}, *args, method=method)

  def init(key: jax.Array) -> Variables:
    b = 1
    obs = jnp.zeros((b, k, spec.obs_dim))
    action = jnp.zeros((b, k, spec.act_dim))
    reward, first, valid = jnp.zeros((b, k)), jnp.zeros((b, k), bool), jnp.ones((b, k), bool)
    args = (obs, action, reward, first, valid, jnp.zeros(b, jnp.int32))
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), *args, method="init_all"))
    return {
      "params": init_params(shapes["params"], key),
      "normalizer": normalizer_lib.Normalizer.identity(),
    }

  def initial(domain, obs_mask, act_mask) -> WorldState:
    """The empty state: zero latent, all-empty window, an invalid pending token."""
    b = domain.shape[0]
    window = ContextWindow(
      obs=jnp.zeros((b, k, spec.obs_dim)),
      action=jnp.zeros((b, k, spec.act_dim)),
      reward=jnp.zeros((b, k)),
      first=jnp.zeros((b, k), bool),
      valid=jnp.zeros((b, k), bool),
    )
    latent = LatentState(
      z=jnp.zeros((b, spec.stoch)), h=jnp.zeros((b, spec.deter)), u=jnp.zeros((b, spec.aux))
    )
    return WorldState(
      latent=latent, window=window, obs=jnp.zeros((b, spec.obs_dim)), reward=jnp.zeros(b),
      first=jnp.zeros(b, bool), valid=jnp.zeros(b, bool), domain=domain,
      obs_mask=obs_mask, act_mask=act_mask,
    )  # fmt: skip

  def clean(variables, state, obs, action, reward, valid):
    """Normalises and zeroes padded entries and invalid steps ([B, L, ...] each)."""
    norm = variables["normalizer"]
    keep_o = valid[..., None] & (state.obs_mask[:, None] > 0)
    keep_a = valid[..., None] & (state.act_mask[:, None] > 0)
    obs = jnp.where(keep_o, norm.normalize(obs, state.domain), 0.0)
    return obs, jnp.where(keep_a, action, 0.0), jnp.where(valid, reward, 0.0)

  def start(variables, batch: batch_lib.Batch) -> WorldState:
    """The state at step K−1 of every row: window = [empty, steps 0..K−2], zero latent."""
    chex.assert_shape(batch.obs, (None, None, spec.obs_dim))
    state = initial(batch.domain, batch.obs_mask, batch.act_mask)
    obs, action, reward = clean(
      variables, state, batch.obs[:, :k], batch.action[:, :k], batch.reward[:, :k],
      batch.valid[:, :k],
    )  # fmt: skip
    window = ContextWindow(obs, action, reward, batch.first[:, :k], batch.valid[:, :k])
    window = jax.tree.map(lambda x: jnp.roll(x, 1, axis=1), window)
    window = window.replace(valid=window.valid.at[:, 0].set(False))
    return state.replace(
      window=window, obs=obs[:, -1], reward=reward[:, -1], first=batch.first[:, k - 1],
      valid=batch.valid[:, k - 1],
    )  # fmt: skip

  def contexts(variables, state, s_obs, s_act, s_rew, s_first, s_valid, t):
    """c for the last t windows of a token stream [B, L >= k + t − 1, ...]: [B, t, E]."""
    b = s_obs.shape[0]
    if not spec.use_context:
      return call(variables, "constant", (b, t))
    tokens = call(variables, "tokens", s_obs, s_act, s_rew, s_first, state.domain)
    offset = s_obs.shape[1] - k - t + 1  # window i covers tokens offset + i .. offset + i + k − 1
    idx = offset + jnp.arange(t)[:, None] + jnp.arange(k)[None]
    windows, valid = tokens[:, idx], s_valid[:, idx]  # [B, t, k, E]
    c = call(variables, "context", windows.reshape(b * t, k, -1), valid.reshape(b * t, k))
    return c.reshape(b, t, -1)

  def observe(
    variables, state: WorldState, obs, prev_action, reward, first, valid, key, sample: bool = True
  ):
    """Posterior filtering (Eq. 6-9) over T steps after `state`.

    Args:
      variables: `init`'s variables.
      state: the WorldState at the step before the first of these.
      obs: [B, T, 27] raw o_t.
      prev_action: [B, T, 6] a_{t-1}, the action taken at the previous step.
      reward: [B, T] r_t. first: [B, T] bool. valid: [B, T] bool.
      key: a PRNG key, or [B] keys (one per row).
      sample: draw z and u from the posteriors; False takes their means.

    Returns:
      (the WorldState at the last step, Filtered outputs [B, T, ...]).
    """
    b, t = obs.shape[:2]
    chex.assert_shape(obs, (b, t, spec.obs_dim))
    chex.assert_shape(prev_action, (b, t, spec.act_dim))
    chex.assert_shape([reward, first, valid], (b, t))
    obs, _, reward = clean(variables, state, obs, prev_action, reward, valid)
    # The token stream: window (k) ++ steps t0−1 .. t0+T−2 (the pending one first).
    s_obs = jnp.concatenate([state.window.obs, state.obs[:, None], obs[:, :-1]], 1)
    s_rew = jnp.concatenate([state.window.reward, state.reward[:, None], reward[:, :-1]], 1)
    s_first = jnp.concatenate([state.window.first, state.first[:, None], first[:, :-1]], 1)
    s_valid = jnp.concatenate([state.window.valid, state.valid[:, None], valid[:, :-1]], 1)
    keep_a = s_valid[:, k:, None] & (state.act_mask[:, None] > 0)
    s_act = jnp.concatenate([state.window.action, jnp.where(keep_a, prev_action, 0.0)], 1)
    c = contexts(variables, state, s_obs, s_act, s_rew, s_first, s_valid, t)
    eo = call(variables, "encode", obs, state.domain)
    a_prev = jnp.where(first[..., None], 0.0, s_act[:, k:])  # zeroed at an episode start
    ga = call(variables, "embed_action", a_prev, state.domain)
    post_u = call(variables, "aux_posterior", eo, c)
    noise = jax.vmap(lambda r: jax.random.normal(r, (t, spec.stoch + spec.aux)))(row_keys(key, b))
    noise = noise if sample else jnp.zeros_like(noise)
    noise_z, noise_u = noise[..., : spec.stoch], noise[..., spec.stoch :]
    u = post_u.sample(noise_u)

    def step(carry: LatentState, x):
      eo_t, c_t, ga_t, first_t, valid_t, noise_t, u_t = x
      h_prev = jnp.where(first_t[:, None], 0.0, carry.h)
      post = call(variables, "posterior", eo_t, c_t, h_prev, ga_t)
      z = post.sample(noise_t)
      h = call(variables, "recur", h_prev, z, ga_t)
      keep = valid_t[:, None]
      new = LatentState(
        z=jnp.where(keep, z, carry.z),
        h=jnp.where(keep, h, carry.h),
        u=jnp.where(keep, u_t, carry.u),
      )
      return new, (h_prev, z, h, post)

    xs = (eo, c, ga, first, valid, noise_z, u)
    latent, (h_prev, z, h, post_z) = jax.lax.scan(
      step, state.latent, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs), unroll=spec.scan_unroll
    )
    h_prev, z, h, post_z = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (h_prev, z, h, post_z))
    feat = jnp.concatenate([z, h, u], axis=-1)
    obs_pred = call(variables, "decode", feat, state.domain)
    out = Filtered(
      c=c, h_prev=h_prev, ga=ga, z=z, h=h, u=u,
      prior_z=call(variables, "prior", c, h_prev, ga), posterior_z=post_z,
      prior_u=call(variables, "aux_prior", c), posterior_u=post_u,
      meta_state=call(variables, "meta_state", c, h_prev, ga) if spec.use_meta_state else None,
      obs_pred=jnp.where(state.obs_mask[:, None] > 0, obs_pred, 0.0),
      reward_pred=call(variables, "reward", feat), obs_target=obs,
    )  # fmt: skip
    window = ContextWindow(s_obs[:, t:], s_act[:, t:], s_rew[:, t:], s_first[:, t:], s_valid[:, t:])
    new_state = state.replace(
      latent=latent, window=window, obs=obs[:, -1], reward=reward[:, -1], first=first[:, -1],
      valid=valid[:, -1],
    )  # fmt: skip
    return new_state, out

  def imagine_step(variables, state: WorldState, action, key, sample: bool = True):
    """One prior step from s̃_t under a_t [B, 6]: returns s̃_{t+1} with ô_{t+1}, r̂_{t+1}.

    The Imagined fields are [B, ...] (no time axis): ô_{t+1} in raw units, 0 on padded entries.
    """
    b = action.shape[0]
    action = jnp.where(state.act_mask > 0, action, 0.0)
    window = state.window.push(state.obs, action, state.reward, state.first, state.valid)
    w = window
    c = contexts(variables, state, w.obs, w.action, w.reward, w.first, w.valid, 1)[:, 0]
    ga = call(variables, "embed_action", action, state.domain)
    prior = call(variables, "prior", c, state.latent.h, ga)
    prior_u = call(variables, "aux_prior", c)
    key_z, key_u = jax.random.split(key)
    z = prior.sample(jax.random.normal(key_z, prior.mean.shape)) if sample else prior.mean
    u = prior_u.sample(jax.random.normal(key_u, prior_u.mean.shape)) if sample else prior_u.mean
    h = call(variables, "recur", state.latent.h, z, ga)
    latent = LatentState(z=z, h=h, u=u)
    obs = jnp.where(state.obs_mask > 0, call(variables, "decode", latent.feat, state.domain), 0.0)
    reward = call(variables, "reward", latent.feat)
    new_state = state.replace(
      latent=latent, window=window, obs=obs, reward=reward, first=jnp.zeros(b, bool),
      valid=jnp.ones(b, bool),
    )  # fmt: skip
    raw = jnp.where(state.obs_mask > 0, variables["normalizer"].denormalize(obs, state.domain), 0)
    return new_state, Imagined(obs=raw, action=action, reward=reward, feat=latent.feat)

  def swap(out: Imagined) -> Imagined:
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)

  def imagine(variables, state: WorldState, policy, horizon: int, key, sample: bool = True):
    """Prior rollout for H steps under `policy(key, obs) -> action` (Eq. 6-9).

    The policy sees the current observation in raw units ([B, 27], 0 on padded entries): the
    real o_t first, then decoded means. The context window slides with (ô, a, r̂).

    Returns:
      (the final WorldState, Imagined [B, H, ...]).
    """

    def body(s, key_t):
      key_pi, key_m = jax.random.split(key_t)
      raw = jnp.where(s.obs_mask > 0, variables["normalizer"].denormalize(s.obs, s.domain), 0)
      return imagine_step(variables, s, policy(key_pi, raw), key_m, sample)

    state, out = jax.lax.scan(body, state, jax.random.split(key, horizon))
    return state, swap(out)

  def rollout(variables, state: WorldState, actions, key, sample: bool = True):
    """Open-loop prior rollout under given actions [B, H, 6]; returns as `imagine`."""
    chex.assert_shape(actions, (state.domain.shape[0], None, spec.act_dim))
    xs = (jnp.swapaxes(actions, 0, 1), jax.random.split(key, actions.shape[1]))
    state, out = jax.lax.scan(lambda s, x: imagine_step(variables, s, *x, sample), state, xs)
    return state, swap(out)

  return WorldModel(spec, net, init, initial, start, observe, imagine, rollout, imagine_step)


def fit_normalizer(variables: Variables, batch: batch_lib.Batch) -> Variables:
  """Variables with a normaliser fitted on `batch` (METHOD.md Eq. 5), params unchanged."""
  norm = normalizer_lib.fit(batch.obs, batch.domain, batch.valid, batch.obs_mask)
  return {**variables, "normalizer": norm}
