"""MrCoM's losses (METHOD.md Eq. 10-16) as pure functions.

`make_loss(world_model, config)` returns `loss(variables, values, target, batch, key)`, the total
of Eq. 16 with every term in its metrics. Gradients are routed by stop-gradients alone, so one
gradient of the total with respect to (world-model params, value params) gives each optimiser
exactly its terms:
- L_wm (Eq. 10) and λ_ms L_ms (Eq. 12) train the world model and r_ψ;
- λ_mv L_mv (Eq. 15) trains the world model only: V_meta's parameters are held fixed;
- λ_V (L_V + L_TD) (Eq. 13-14) trains V_meta and V only: their inputs and targets are stopped.

Reduction (METHOD.md [choice]): sum over feature dimensions, then mean over the valid steps of
the batch (pairs (t, t+1) for L_TD and L_mv). Free bits apply to each step's summed KL; the
metrics hold each KL before (`kl_z_raw`, `kl_u_raw`) and after (`kl_z`, `kl_u`) its floor, and
L_ms (`meta_state`) has none. With `mv_normalize` L_mv is divided by the batch variance of its
target sg V_meta (Eq. 15 [choice]); `meta_value_align_raw` and `mv_target_var` log its parts.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from mrcom_jax.envs import specs
from mrcom_jax.models import gaussian
from mrcom_jax.world_model import batch as batch_lib
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import networks

sg = jax.lax.stop_gradient


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ x·mask / max(Σ mask, 1): x, mask [B, T] -> []. Masked entries never reach the result."""
  chex.assert_equal_shape([x, mask])
  mask = mask.astype(bool)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def free_bits(kl: jax.Array, nats: float) -> jax.Array:
  """max(KL, nats) per step (Eq. 10 [choice]): no gradient while the KL is below `nats`."""
  return jnp.maximum(kl, nats)


def gaussian_nll(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """−ln N(target; pred, I) without its constant: ½ Σ_i mask_i (pred_i − target_i)².

  Args:
    pred: [..., n] means.
    target: [..., n].
    mask: [..., n] (or broadcastable) 1 on the entries that count; None counts all.

  Returns:
    [...] float32.
  """
  sq = jnp.square(pred - target)
  if mask is not None:
    sq = jnp.where(mask > 0, sq, 0.0)
  return 0.5 * jnp.sum(sq, axis=-1)


def td_target(reward: jax.Array, next_value: jax.Array, discount: float) -> jax.Array:
  """Bellman target on the (1 − γ) scale (Eq. 14): (1 − γ) r_t + γ V̄(s̃_{t+1}, ξ)."""
  return (1.0 - discount) * reward + discount * next_value


WM_TERMS = ("kl_z", "kl_u", "recon", "reward")  # Eq. 10's terms
MV_VAR_EPS = 1e-6  # added to the batch variance that divides L_mv (Eq. 15 [choice])


def world_model_loss(terms: dict[str, jax.Array]) -> jax.Array:
  """Eq. 10: L_wm = KL_z + KL_u + (−ln p(o | s̃)) + (−ln p(r | s̃)), each a batch mean."""
  return terms["kl_z"] + terms["kl_u"] + terms["recon"] + terms["reward"]


def weighted_terms(terms: dict[str, jax.Array], spec) -> dict[str, jax.Array]:
  """Eq. 16's summands, each with its scale: their sum is the total loss.

  Returns {kl_z, kl_u, recon, reward} (Eq. 10), then `meta_state` (λ_ms L_ms),
  `meta_value_align` (λ_mv L_mv) and `values` (λ_V (L_V + L_TD)) where `terms` has them.
  All but `values` reach the world model; `values` reaches only the value networks.
  """
  out = {name: terms[name] for name in WM_TERMS}
  if "meta_state" in terms:
    out["meta_state"] = spec.lambda_ms * terms["meta_state"]
  if "meta_value_align" in terms:
    out["meta_value_align"] = spec.lambda_mv * terms["meta_value_align"]
  if "meta_value" in terms or "td" in terms:
    zero = jnp.zeros(())
    out["values"] = spec.lambda_v * (terms.get("meta_value", zero) + terms.get("td", zero))
  return out


def term_names(spec) -> tuple[str, ...]:
  """The keys of `weighted_terms` for a resolved spec, in order."""
  names = WM_TERMS + (("meta_state",) if spec.use_meta_state else ())
  return names + (("meta_value_align", "values") if spec.use_meta_value else ())


def total_loss(terms: dict[str, jax.Array], spec) -> jax.Array:
  """Eq. 16: L_wm + λ_ms L_ms + λ_mv L_mv + λ_V (L_V + L_TD); missing terms count 0.

  Args:
    terms: scalar terms named kl_z, kl_u, recon, reward, and optionally meta_state,
      meta_value_align, meta_value, td.
    spec: anything with lambda_ms, lambda_mv, lambda_v (a resolved `config.Spec`).
  """
  return sum(weighted_terms(terms, spec).values())


def pair_mask(first: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, T−1]: (t, t+1) is a model step of one episode: both valid, t+1 not `first`."""
  return valid[:, :-1] & valid[:, 1:] & ~first[:, 1:]


def make_values(spec):
  """The value networks V(s̃, ξ) and V_meta(z, h) (Eq. 13-14) for `spec`."""
  return networks.ScenarioValue(spec.hidden), networks.MetaValue(spec.hidden)


def init_values(spec, key: jax.Array):
  """Value params {'v': ..., 'v_meta': ...}, or None under no_meta_value."""
  if not spec.use_meta_value:
    return None
  value_net, meta_net = make_values(spec)
  feat, xi = jnp.zeros((1, spec.feat)), jnp.zeros((1, spec.xi_dim))
  z, h = jnp.zeros((1, spec.stoch)), jnp.zeros((1, spec.deter))
  shapes = {
    "v": jax.eval_shape(value_net.init, jax.random.key(0), feat, xi)["params"],
    "v_meta": jax.eval_shape(meta_net.init, jax.random.key(0), z, h)["params"],
  }
  return model_lib.init_params(shapes, key)


def make_loss(world_model: model_lib.WorldModel, axis_name: str | None = None):
  """Returns `loss(variables, values, target, batch, key) -> (total, metrics)` (Eq. 16).

  `values` holds {'v', 'v_meta'} params and `target` V̄'s params ({'v'}), both None under
  no_meta_value. `key` is one PRNG key or [B] per-row keys. Metrics hold every term, the total,
  and per-domain means `<term>/<domain>` of the per-step terms.

  With `axis_name` (inside `shard_map` over rows of the batch) every mean divides this shard's
  sum by the whole batch's count (a `psum` of the masks): the total and every metric are this
  shard's share, and their `psum` over the axis is the whole batch's value. The variance that
  divides L_mv is the whole batch's on every shard.
  """
  spec = world_model.spec

  def mean(x, mask):
    if axis_name is None:
      return masked_mean(x, mask)
    mask = mask.astype(bool)
    count = jax.lax.psum(jnp.sum(mask), axis_name)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(count, 1)

  def batch_mean(x, mask):
    """The whole batch's masked mean, on every shard."""
    m = mean(x, mask)
    return m if axis_name is None else jax.lax.psum(m, axis_name)

  def share(x):
    """A whole-batch metric as this shard's share (so that the psum of shares is x)."""
    return x if axis_name is None else x / jax.lax.psum(1, axis_name)

  k = spec.context_len
  value_net, meta_net = make_values(spec)
  gamma = spec.discount

  def loss(variables, values, target, batch: batch_lib.Batch, key):
    b, length = batch.reward.shape
    t = length - k
    chex.assert_shape(batch.obs, (b, length, spec.obs_dim))
    chex.assert_shape(batch.action, (b, length, spec.act_dim))
    chex.assert_shape(batch.xi, (b, spec.xi_dim))
    chex.assert_shape([batch.first, batch.valid], (b, length))
    state = world_model.start(variables, batch)
    win = batch.window(k)
    _, out = world_model.observe(
      variables, state, win.obs, batch.action[:, k - 1 : -1], win.reward, win.first, win.valid, key
    )
    valid = win.valid
    pairs = pair_mask(win.first, valid)
    reward = jnp.where(valid, win.reward, 0.0)
    kl_z = gaussian.kl_divergence(out.posterior_z, out.prior_z)  # KL(q ‖ p), before free bits
    kl_u = gaussian.kl_divergence(out.posterior_u, out.prior_u)
    per_step = {
      # Eq. 10
      "kl_z": free_bits(kl_z, spec.free_bits),
      "kl_u": free_bits(kl_u, spec.free_bits),
      "recon": gaussian_nll(out.obs_pred, out.obs_target, batch.obs_mask[:, None]),
      "reward": gaussian_nll(out.reward_pred[..., None], reward[..., None]),
    }
    if spec.use_meta_state:  # Eq. 12: KL(q(z|e(o), c, h, g(a)) ‖ r_ψ(z|c, h, g(a))), no free bits
      per_step["meta_state"] = gaussian.kl_divergence(out.posterior_z, out.meta_state)
    per_pair = {}
    extra = {"kl_z_raw": mean(kl_z, valid), "kl_u_raw": mean(kl_u, valid)}
    if spec.use_meta_value:
      xi = jnp.broadcast_to(batch.xi[:, None], (b, t, spec.xi_dim))
      feat = sg(out.feat)
      v = value_net.apply({"params": values["v"]}, feat, xi)  # V(sg s̃_t, ξ)
      v_bar = value_net.apply({"params": target["v"]}, feat, xi)  # V̄(sg s̃_t, ξ)
      # Eq. 14 (TD): V(sg s̃_t, ξ) ← (1 − γ) r_t + γ V̄(sg s̃_{t+1}, ξ)
      target_td = sg(td_target(reward[:, :-1], v_bar[:, 1:], gamma))
      per_pair["td"] = jnp.square(v[:, :-1] - target_td)
      # Eq. 13: (V_meta(sg z_t, sg h_t) − sg V(s̃_t, ξ))²
      v_meta = meta_net.apply({"params": values["v_meta"]}, sg(out.z), sg(out.h))
      per_step["meta_value"] = jnp.square(v_meta - sg(v))
      # Eq. 15: ŝ_{t+1} = (prior mean ẑ_{t+1}, GRU(h_t, [ẑ_{t+1}, g(a_t)])), V_meta held fixed.
      z_hat = out.prior_z.mean[:, 1:]
      h_hat = world_model.net.apply(
        {"params": variables["params"]}, out.h[:, :-1], z_hat, out.ga[:, 1:], method="recur"
      )
      frozen = {"params": sg(values["v_meta"])}
      v_hat = meta_net.apply(frozen, z_hat, h_hat)
      if spec.mv_mode == "match":  # (V_meta(ŝ_{t+1}) − sg V_meta(s̃_{t+1}))²
        mv_target = sg(v_meta[:, 1:])
        align = jnp.square(v_hat - mv_target)
      else:  # Bellman residual: ((1 − γ) r_t + γ V_meta(ŝ_{t+1}) − sg V_meta(s̃_t))²
        mv_target = sg(v_meta[:, :-1])
        align = jnp.square(td_target(reward[:, :-1], v_hat, gamma) - mv_target)
      # The whole batch's variance of the target over its valid pairs (Eq. 15 [choice]).
      mv_var = batch_mean(jnp.square(mv_target - batch_mean(mv_target, pairs)), pairs)
      extra["meta_value_align_raw"] = mean(align, pairs)
      extra["mv_target_var"] = share(mv_var)
      per_pair["meta_value_align"] = align / (mv_var + MV_VAR_EPS) if spec.mv_normalize else align
    terms = {name: mean(x, valid) for name, x in per_step.items()}
    terms.update({name: mean(x, pairs) for name, x in per_pair.items()})
    total = total_loss(terms, spec)
    metrics = dict(terms, **extra, total=total, wm=world_model_loss(terms))
    for d, name in enumerate(specs.DOMAIN_NAMES):
      in_domain = (batch.domain == d)[:, None]
      for term, x in per_step.items():
        metrics[f"{term}/{name}"] = mean(x, valid & in_domain)
      for term, x in per_pair.items():
        metrics[f"{term}/{name}"] = mean(x, pairs & in_domain)
    if spec.use_meta_value:
      metrics["value_mean"] = mean(v, valid)
    return total, metrics

  return loss
