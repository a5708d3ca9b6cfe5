"""Randomised torso morphologies, built by editing the Control Suite XMLs with `mujoco.MjSpec`.

The XMLs are read at run time from the installed `dm_control` package (never copied here), their
`./common/*.xml` includes passed to `MjSpec.from_string`. Each scenario scales the torso capsule's
length by `α_len` and its radius by `α_size` with the anchor rules of PROTOCOL.md:

- hopper: the torso grows upward from the pelvis joint; the nose moves with its top end.
- walker: the torso grows upward from the hips; hips and legs stay where they are.
- cheetah: the torso scales about its centre; both thighs move with its ends and the head with
  its front end.

Mass rule: `fixed` (default) gives each torso geom its default mass, `density` keeps density.
The cheetah's `settotalmass` is replaced by the density that reproduces its default masses, so
all three domains follow one rule. MuJoCo compiles every edited spec; nothing is patched by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import mujoco
import numpy as np

from mrcom_jax.envs import specs

MASS_RULES = ("fixed", "density")


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """MJX-oriented solver settings (MJX_NOTES.md); `None` keeps the XML's value."""

  iterations: int | None = None
  ls_iterations: int | None = None
  disable_eulerdamp: bool = False


DEFAULT_SOLVER = SolverOptions()


def _suite_dir() -> str:
  found = importlib.util.find_spec("dm_control")
  if found is None or not found.submodule_search_locations:
    raise ImportError("dm_control is not installed: `pip install dm_control==1.0.50`")
  return os.path.join(found.submodule_search_locations[0], "suite")


@functools.cache
def suite_xml(domain: str) -> tuple[str, dict[str, bytes]]:
  """The suite's XML text for `domain` and its `./common/*.xml` includes, from dm_control."""
  specs.get_domain(domain)
  root = _suite_dir()
  with open(os.path.join(root, f"{domain}.xml")) as f:
    xml = f.read()
  common = os.path.join(root, "common")
  include = {}
  for name in sorted(os.listdir(common)):
    if name.endswith(".xml"):
      with open(os.path.join(common, name), "rb") as f:
        include[f"./common/{name}"] = f.read()
  return xml, include


def capsule_volume(radius: float, half_length: float) -> float:
  """Volume of a capsule: cylinder of length 2·half_length plus a sphere."""
  return math.pi * radius**2 * 2.0 * half_length + 4.0 / 3.0 * math.pi * radius**3


def _capsule_geometry(geom) -> tuple[float, float]:
  """(radius, half_length) of a capsule geom given either by `fromto` or by `size`."""
  if not np.isnan(geom.fromto[0]):
    a, b = np.asarray(geom.fromto[:3]), np.asarray(geom.fromto[3:])
    return float(geom.size[0]), float(np.linalg.norm(b - a)) / 2.0
  return float(geom.size[0]), float(geom.size[1])


def validate(domain: str, alpha_len: float, alpha_size: float, mass_rule: str = "fixed") -> None:
  """Raises ValueError (naming the field and the fix) for parameters no model can be built from."""
  specs.get_domain(domain)
  if mass_rule not in MASS_RULES:
    raise ValueError(f"unknown mass_rule {mass_rule!r}: choose one of {MASS_RULES}")
  for name, value in (("alpha_len", alpha_len), ("alpha_size", alpha_size)):
    if not (np.isfinite(value) and value > 0):
      raise ValueError(
        f"{name}={value} would give a non-positive torso {name[6:]}: every α must be > 0 "
        "(with a range 1 ± δ, choose δ < 1)"
      )


def _geom(spec: mujoco.MjSpec, name: str):
  geom = spec.geom(name)
  if geom is None:
    raise KeyError(f"geom {name!r} not found in the suite XML")
  return geom


def _without_totalmass(domain: str) -> tuple[str, dict[str, bytes]]:
  xml, include = suite_xml(domain)
  return xml.replace('<compiler settotalmass="14"/>', ""), include


def build_spec(
  domain: str,
  alpha_len: float = 1.0,
  alpha_size: float = 1.0,
  mass_rule: str = "fixed",
  solver: SolverOptions = DEFAULT_SOLVER,
) -> mujoco.MjSpec:
  """The edited `MjSpec` of one scenario (see the module docstring for the rules)."""
  validate(domain, alpha_len, alpha_size, mass_rule)
  if domain == "cheetah":
    xml, _ = suite_xml(domain)
    if 'settotalmass="14"' not in xml:
      raise RuntimeError("the installed dm_control cheetah.xml no longer sets settotalmass=14")
    spec = mujoco.MjSpec.from_string(*_without_totalmass(domain))
    for geom in spec.geoms:
      geom.density = _cheetah_density()
  else:
    spec = mujoco.MjSpec.from_string(*suite_xml(domain))
  _EDITS[domain](spec, alpha_len, alpha_size)
  if mass_rule == "fixed":
    for name, default_mass in _default_torso_masses(domain).items():
      _geom(spec, name).mass = default_mass
  if solver.iterations is not None:
    spec.option.iterations = solver.iterations
  if solver.ls_iterations is not None:
    spec.option.ls_iterations = solver.ls_iterations
  if solver.disable_eulerdamp:
    spec.option.disableflags |= mujoco.mjtDisableBit.mjDSBL_EULERDAMP
  return spec


def build_model(
  domain: str,
  alpha_len: float = 1.0,
  alpha_size: float = 1.0,
  mass_rule: str = "fixed",
  solver: SolverOptions = DEFAULT_SOLVER,
) -> mujoco.MjModel:
  """Compiles one scenario's `MjModel` with MuJoCo."""
  return build_spec(domain, alpha_len, alpha_size, mass_rule, solver).compile()


@functools.cache
def _cheetah_density() -> float:
  raw = mujoco.MjSpec.from_string(*_without_totalmass("cheetah")).compile()
  return 1000.0 * 14.0 / float(np.sum(raw.body_mass))


TORSO_GEOMS = {"hopper": ("torso", "nose"), "walker": ("torso",), "cheetah": ("torso", "head")}


@functools.cache
def _default_torso_masses(domain: str) -> dict[str, float]:
  """Default mass of each torso geom: density × capsule volume at the default morphology."""
  density = _cheetah_density() if domain == "cheetah" else 1000.0
  spec = mujoco.MjSpec.from_string(*suite_xml(domain))
  return {
    name: density * capsule_volume(*_capsule_geometry(_geom(spec, name)))
    for name in TORSO_GEOMS[domain]
  }


def _edit_hopper(spec: mujoco.MjSpec, alpha_len: float, alpha_size: float) -> None:
  torso = _geom(spec, "torso")
  bottom, top = np.array(torso.fromto[:3]), np.array(torso.fromto[3:])
  new_top = bottom + alpha_len * (top - bottom)  # grows upward from the pelvis joint
  torso.fromto = np.concatenate([bottom, new_top])
  torso.size[0] = torso.size[0] * alpha_size
  shift = new_top - top
  nose = _geom(spec, "nose")  # moves with the torso's top end
  nose.fromto = np.asarray(nose.fromto) + np.concatenate([shift, shift])


def _edit_walker(spec: mujoco.MjSpec, alpha_len: float, alpha_size: float) -> None:
  torso = _geom(spec, "torso")  # capsule along z, centred at the body origin
  radius, half = torso.size[0], torso.size[1]
  bottom = torso.pos[2] - half  # the hips: thighs hang from here and stay
  torso.size[0] = radius * alpha_size
  torso.size[1] = half * alpha_len
  torso.pos[2] = bottom + half * alpha_len


def _edit_cheetah(spec: mujoco.MjSpec, alpha_len: float, alpha_size: float) -> None:
  torso = _geom(spec, "torso")
  a, b = np.array(torso.fromto[:3]), np.array(torso.fromto[3:])
  centre = (a + b) / 2
  new_a, new_b = centre + alpha_len * (a - centre), centre + alpha_len * (b - centre)
  torso.fromto = np.concatenate([new_a, new_b])
  torso.size[0] = torso.size[0] * alpha_size
  spec.body("bthigh").pos = np.asarray(spec.body("bthigh").pos) + (new_a - a)
  spec.body("fthigh").pos = np.asarray(spec.body("fthigh").pos) + (new_b - b)
  head = _geom(spec, "head")  # moves with the front end
  head.pos = np.asarray(head.pos) + (new_b - b)


_EDITS = {"hopper": _edit_hopper, "walker": _edit_walker, "cheetah": _edit_cheetah}
