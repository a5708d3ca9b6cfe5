"""One jitted update of the world model and the value networks (METHOD.md Eq. 16, Alg. 1).

`make_train_step(config, mesh)` returns `train_step(state, batch) -> (state, metrics)`: it
donates its state, takes one AdamW step for the world model (with r_ψ) and one for the values
(each with its own state and global-norm clipping), and moves the target V̄ by Polyak averaging.
Given a mesh, the batch is sharded along 'data' and the state replicated; each device computes
its rows' share of the loss and gradients and one all-reduce combines them (`make_update`).

Diagnostics (METHOD.md, "Diagnostics logged with every update"): for every summand of Eq. 16
that reaches the world model (`losses.weighted_terms`: kl_z, kl_u, recon, reward, meta_state,
meta_value_align, each with its λ), `grad_norm/<term>` is the global norm of its gradient on the
world-model parameters and `grad_share/<term>` that norm over the sum of these norms (so the
shares lie in [0, 1] and add to 1, whatever the terms' cancellation); `grad_norm/wm` is L_wm's
(Eq. 10) and `grad_norm_model` the applied total's, which is at most the sum of the norms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from mrcom_jax.training import sharding
from mrcom_jax.world_model import losses
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import normalizer as normalizer_lib


@struct.dataclass
class TrainState:
  """Everything an update reads and writes.

  Attributes:
    step: [] int32 updates taken.
    variables: world-model variables {'params', 'normalizer'}.
    values: value params {'v', 'v_meta'}, or None under no_meta_value.
    target: target value params {'v'} (V̄), or None.
    opt_model: AdamW state of the world model (with r_ψ).
    opt_values: AdamW state of the values, or None.
    key: PRNG key for the next update.
  """

  step: jax.Array
  variables: dict[str, Any]
  values: dict[str, Any] | None
  target: dict[str, Any] | None
  opt_model: Any
  opt_values: Any
  key: jax.Array


def make_optimizer(opt_config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (lr, weight decay) [METHOD.md choice]."""
  # Flattened into one vector: the same arithmetic, a few fused ops instead of a few per leaf,
  # which halves the update's compile time on CPU.
  return optax.flatten(
    optax.chain(
      optax.clip_by_global_norm(opt_config.clip_norm),
      optax.adamw(opt_config.lr, weight_decay=opt_config.weight_decay),
    )
  )


def init_train_state(
  config, key: jax.Array, normalizer: normalizer_lib.Normalizer | None = None
) -> TrainState:
  """Fresh parameters, optimiser states and key; `normalizer` (fitted) or the identity."""
  world_model = model_lib.make_world_model(config)
  key_model, key_values, key_state = jax.random.split(key, 3)
  variables = world_model.init(key_model)
  if normalizer is not None:
    variables = {**variables, "normalizer": normalizer}
  values = losses.init_values(world_model.spec, key_values)
  target = None if values is None else {"v": jax.tree.map(jnp.copy, values["v"])}
  opt_values = None if values is None else make_optimizer(config.value_opt).init(values)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    variables=variables,
    values=values,
    target=target,
    opt_model=make_optimizer(config.model_opt).init(variables["params"]),
    opt_values=opt_values,
    key=key_state,
  )


def make_update(config, mesh=None, diagnostics: bool = True):
  """The un-jitted update `(state, batch) -> (state, metrics)`.

  Without a mesh it is one program on one device. With one, the loss and its gradients are
  computed under `shard_map`: each device differentiates its own rows (every mean divides by
  the whole batch's count, `losses.make_loss(axis_name=...)`), and one `psum` of the gradients
  and metrics at the end makes them the whole batch's. Letting XLA partition the plain program
  instead all-reduces the recurrent cell's gradients inside the backward scan, once per time
  step; here there is one all-reduce per update. Randomness is one key per row either way, so
  both give the same numbers up to summation order.

  The gradient of each summand of Eq. 16 comes from one forward pass and one backward pass
  batched over the summands (`jax.vjp`, vmapped over one-hot cotangents); the applied gradient is
  their sum, so the per-term norms cost no second forward, but the backward pass runs once per
  term, batched (CPU, tiny, B 8: 7.1 → 16.8 ms per update, compile 12 → 16 s), and the all-reduce
  moves (number of terms) × the world model's parameters. `diagnostics=False` takes one plain
  gradient and leaves the `grad_norm/*` and `grad_share/*` metrics out, for callers that discard
  them (adaptation's fine-tuning).
  """
  world_model = model_lib.make_world_model(config)
  spec = world_model.spec
  axis = None if mesh is None else sharding.DATA_AXIS
  loss_fn = losses.make_loss(world_model, axis_name=axis)
  tx_model = make_optimizer(config.model_opt)
  tx_values = make_optimizer(config.value_opt)

  names = losses.term_names(spec)
  model_terms = tuple(name for name in names if name != "values")  # all but λ_V (L_V + L_TD)

  def gradients(variables, values, target, batch, keys):
    """(([terms] world-model gradients, the values' gradient), metrics): rows in `model_terms`.

    Without diagnostics the world-model gradient is one row, the total's.
    """
    if not diagnostics:

      def total(params, values):
        return loss_fn({**variables, "params": params}, values, target, batch, keys)

      grad_fn = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)
      (_, metrics), (g_model, g_values) = grad_fn(variables["params"], values)
      if axis is not None:
        g_model, g_values, metrics = jax.lax.psum((g_model, g_values, metrics), axis)
      return (jax.tree.map(lambda g: g[None], g_model), g_values), metrics

    def objective(params, values):
      _, metrics = loss_fn({**variables, "params": params}, values, target, batch, keys)
      parts = losses.weighted_terms(metrics, spec)
      return jnp.stack([parts[name] for name in names]), metrics

    _, vjp_fn, metrics = jax.vjp(objective, variables["params"], values, has_aux=True)
    g_params, g_values = jax.vmap(vjp_fn)(jnp.eye(len(names)))
    # `values` alone reaches the value networks, and it does not reach the world model.
    rows = jax.tree.map(lambda g: g[: len(model_terms)], g_params)
    if values is not None:
      g_values = jax.tree.map(lambda g: g[names.index("values")], g_values)
    if axis is not None:
      rows, g_values, metrics = jax.lax.psum((rows, g_values, metrics), axis)
    return (rows, g_values), metrics

  def term_norms(rows):
    """Per-term global norms and shares of the world-model gradient (module docstring)."""
    sq = [jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(rows)]
    norms = jnp.sqrt(sum(sq))
    total = jnp.maximum(jnp.sum(norms), jnp.finfo(norms.dtype).tiny)
    out = {}
    for j, name in enumerate(model_terms):
      out[f"grad_norm/{name}"] = norms[j]
      out[f"grad_share/{name}"] = norms[j] / total
    n_wm = len(losses.WM_TERMS)  # the first rows are Eq. 10's terms
    out["grad_norm/wm"] = optax.tree.norm(jax.tree.map(lambda g: jnp.sum(g[:n_wm], 0), rows))
    return out

  if mesh is not None:
    row_spec = P(sharding.DATA_AXIS)
    # check_vma=False: the model builds its initial latents from shapes (not device-varying),
    # so the type check would reject the scans; the one psum above is the only reduction.
    gradients = jax.shard_map(
      gradients,
      mesh=mesh,
      in_specs=(P(), P(), P(), row_spec, row_spec),
      out_specs=P(),
      check_vma=False,
    )

  def update(state: TrainState, batch):
    key, key_loss = jax.random.split(state.key)
    keys = model_lib.row_keys(key_loss, batch.reward.shape[0])
    (rows, g_values), metrics = gradients(state.variables, state.values, state.target, batch, keys)
    g_model = jax.tree.map(lambda g: jnp.sum(g, 0), rows)  # Eq. 16: the sum of its terms
    params = state.variables["params"]
    updates, opt_model = tx_model.update(g_model, state.opt_model, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm_model=optax.tree.norm(g_model))
    if diagnostics:
      metrics.update(term_norms(rows))
    values, target, opt_values = state.values, state.target, state.opt_values
    if values is not None:
      updates, opt_values = tx_values.update(g_values, opt_values, values)
      values = optax.apply_updates(values, updates)
      target = {"v": optax.incremental_update(values["v"], target["v"], spec.target_tau)}
      metrics["grad_norm_values"] = optax.tree.norm(g_values)
    new_state = state.replace(
      step=state.step + 1,
      variables={**state.variables, "params": params},
      values=values,
      target=target,
      opt_model=opt_model,
      opt_values=opt_values,
      key=key,
    )
    return new_state, metrics

  return update


def make_train_step(config, mesh=None, donate: bool = True, diagnostics: bool = True):
  """The jitted update. With a mesh: batch sharded on 'data', state and metrics replicated."""
  update = make_update(config, mesh, diagnostics)
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(update, donate_argnums=donate_argnums)
  rep, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(
    update, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=donate_argnums
  )
