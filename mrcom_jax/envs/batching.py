"""A batch of scenarios of one domain as one stacked `mjx.Model` plus an `in_axes` pytree.

`mjx.put_model` of different morphologies gives pytrees whose static metadata differs
(PROTOCOL.md, "Batching"), so whole models cannot be stacked. Instead, per domain, the default
morphology's `mjx.Model` is a fixed template, and the array fields that a torso edit changes
(`BATCHED_FIELDS`) are stacked from the member `MjModel`s into that template. The compiled
program therefore never depends on which scenarios are in a batch.

Two static fields of the template are widened so that they hold for every member:
`body_sameframe` / `geom_sameframe` flag bodies and geoms whose frames coincide at the default
morphology (the walker torso), which an edit breaks; the template sets such entries to 0
(compute the transform), which is always correct.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import mjx

from mrcom_jax.envs import morphology

# Array fields of `mjx.Model` that differ between morphologies (checked against probe models).
BATCHED_FIELDS = (
  "body_pos",
  "body_ipos",
  "body_iquat",
  "body_mass",
  "body_subtreemass",
  "body_inertia",
  "body_invweight0",
  "dof_invweight0",
  "dof_M0",
  "geom_pos",
  "geom_size",
  "geom_aabb",
  "geom_rbound",
  "cam_poscom0",
  "light_poscom0",
  "actuator_acc0",
  "stat.meaninertia",
  "stat.meanmass",
  "stat.meansize",
)
_SAMEFRAME_FIELDS = ("body_sameframe", "geom_sameframe")
_IGNORED_STATIC = ("_impl.geom_rbound_hfield",)  # height fields only; these models have none
# Extreme morphologies used to check that only BATCHED_FIELDS vary.
_PROBES = ((0.4, 1.6), (1.6, 0.4), (1.6, 1.6), (0.4, 0.4), (1.1, 0.9))


def _path_name(path) -> str:
  return jax.tree_util.keystr(path).lstrip(".")


def _static_arrays(x, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for f in dataclasses.fields(x):
    v = getattr(x, f.name)
    if dataclasses.is_dataclass(v):
      out.update(_static_arrays(v, f"{prefix}{f.name}."))
    elif isinstance(v, np.ndarray):
      out[prefix + f.name] = v
  return out


def _mj_field(m: mujoco.MjModel, name: str) -> np.ndarray:
  obj = m
  for part in name.split("."):
    obj = getattr(obj, part)
  return np.asarray(obj)


@functools.cache
def template(
  domain: str,
  mass_rule: str = "fixed",
  solver: morphology.SolverOptions = morphology.DEFAULT_SOLVER,
) -> mjx.Model:
  """The domain's fixed `mjx.Model` template (default morphology, widened static flags).

  Also checks, on extreme probe morphologies, that no field outside BATCHED_FIELDS varies.
  """
  default = mjx.put_model(morphology.build_model(domain, mass_rule=mass_rule, solver=solver))
  default_static = _static_arrays(default)
  default_leaves = {
    _path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(default)[0]
  }
  sameframe = {k: default_static[k].copy() for k in _SAMEFRAME_FIELDS}
  for alpha_len, alpha_size in _PROBES:
    for rule in morphology.MASS_RULES:
      probe = mjx.put_model(morphology.build_model(domain, alpha_len, alpha_size, rule, solver))
      for path, leaf in jax.tree_util.tree_flatten_with_path(probe)[0]:
        name = _path_name(path)
        if name not in BATCHED_FIELDS and not np.array_equal(
          np.asarray(leaf), default_leaves[name]
        ):
          raise AssertionError(
            f"{domain}: field {name} varies with morphology; add it to BATCHED_FIELDS"
          )
      for name, value in _static_arrays(probe).items():
        if name in _SAMEFRAME_FIELDS:
          sameframe[name][value != default_static[name]] = 0
        elif name not in _IGNORED_STATIC and not np.array_equal(value, default_static[name]):
          raise AssertionError(f"{domain}: static field {name} varies with morphology")
  return default.replace(**{k: v for k, v in sameframe.items()})


def in_axes(tmpl: mjx.Model) -> mjx.Model:
  """A pytree like `tmpl` with 0 on BATCHED_FIELDS and None elsewhere (for `jax.vmap`)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: 0 if _path_name(p) in BATCHED_FIELDS else None, tmpl
  )


def stack(tmpl: mjx.Model, models: list[mujoco.MjModel]) -> mjx.Model:
  """Stacks the BATCHED_FIELDS of `models` (one domain) into `tmpl`: leading axis = member."""
  if not models:
    raise ValueError("stack() needs at least one model")

  def leaf(path, value):
    name = _path_name(path)
    if name not in BATCHED_FIELDS:
      return value
    stacked = np.stack([_mj_field(m, name) for m in models])
    if stacked.shape[1:] != value.shape:
      raise ValueError(f"model field {name} has shape {stacked.shape[1:]}, template {value.shape}")
    return jnp.asarray(stacked, dtype=value.dtype)

  return jax.tree_util.tree_map_with_path(leaf, tmpl)


def member(batched: mjx.Model, index: int) -> mjx.Model:
  """The `index`-th member of a stacked model, as an unbatched `mjx.Model`."""
  return jax.tree_util.tree_map_with_path(
    lambda p, v: v[index] if _path_name(p) in BATCHED_FIELDS else v, batched
  )
