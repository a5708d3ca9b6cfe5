"""Morphology edits do what they say (MuJoCo C models, no JAX compile)."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
from dm_control import suite

from mrcom_jax.envs import batching, morphology

TASK = {"hopper": "hop", "walker": "run", "cheetah": "run"}


def _body(m, name):
  return mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, name)


def _geom(m, name):
  return mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, name)


@pytest.mark.parametrize("domain", ["hopper", "walker", "cheetah"])
def test_default_morphology_reproduces_the_suite_model(domain):
  ours = morphology.build_model(domain)
  ref = suite.load(domain, TASK[domain]).physics.model
  np.testing.assert_allclose(ours.body_mass, ref.body_mass, rtol=1e-12)
  np.testing.assert_allclose(ours.body_inertia, ref.body_inertia, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(ours.body_pos, ref.body_pos)
  np.testing.assert_allclose(ours.geom_size, ref.geom_size)
  assert ours.opt.timestep == ref.opt.timestep


def test_capsule_volume_by_hand():
  # r = 1, half-length 1: π·1·2 + 4/3·π = 10/3·π
  assert morphology.capsule_volume(1.0, 1.0) == pytest.approx(10 / 3 * np.pi)


@pytest.mark.parametrize("domain", ["hopper", "walker", "cheetah"])
@pytest.mark.parametrize("alpha_len,alpha_size", [(1.4, 0.7), (0.6, 1.5)])
def test_torso_geometry_scales_by_the_factors(domain, alpha_len, alpha_size):
  m0, m1 = morphology.build_model(domain), morphology.build_model(domain, alpha_len, alpha_size)
  g = _geom(m0, "torso")
  assert m1.geom_size[g, 0] == pytest.approx(alpha_size * m0.geom_size[g, 0])  # radius
  assert m1.geom_size[g, 1] == pytest.approx(alpha_len * m0.geom_size[g, 1])  # half-length


def test_hopper_anchor_torso_grows_up_from_pelvis_nose_moves_with_top():
  a = 1.4
  m0, m1 = morphology.build_model("hopper"), morphology.build_model("hopper", a, 1.0)
  g, nose = _geom(m0, "torso"), _geom(m0, "nose")
  half0 = m0.geom_size[g, 1]
  bottom0 = m0.geom_pos[g, 2] - half0
  bottom1 = m1.geom_pos[g, 2] - m1.geom_size[g, 1]
  assert bottom1 == pytest.approx(bottom0)  # the pelvis end stays at z = -0.05
  assert bottom0 == pytest.approx(-0.05)
  top_shift = 2 * half0 * (a - 1)  # 0.25 · 0.4 = 0.1
  assert m1.geom_pos[nose, 2] - m0.geom_pos[nose, 2] == pytest.approx(top_shift)
  np.testing.assert_allclose(m1.body_pos[_body(m0, "pelvis")], m0.body_pos[_body(m0, "pelvis")])


def test_walker_anchor_hips_and_legs_stay():
  a = 1.5
  m0, m1 = morphology.build_model("walker"), morphology.build_model("walker", a, 1.0)
  g = _geom(m0, "torso")
  assert m1.geom_pos[g, 2] - m1.geom_size[g, 1] == pytest.approx(-0.3)  # bottom at the hips
  assert m1.geom_pos[g, 2] + m1.geom_size[g, 1] == pytest.approx(-0.3 + 0.6 * a)
  for leg in ("right_thigh", "left_thigh"):
    np.testing.assert_allclose(m1.body_pos[_body(m0, leg)], m0.body_pos[_body(m0, leg)])


def test_cheetah_anchor_thighs_and_head_follow_the_ends():
  a = 1.3
  m0, m1 = morphology.build_model("cheetah"), morphology.build_model("cheetah", a, 1.0)
  assert m1.body_pos[_body(m0, "bthigh"), 0] == pytest.approx(-0.5 * a)
  assert m1.body_pos[_body(m0, "fthigh"), 0] == pytest.approx(0.5 * a)
  head = _geom(m0, "head")
  assert m1.geom_pos[head, 0] - m0.geom_pos[head, 0] == pytest.approx(0.5 * (a - 1))
  assert m1.geom_pos[_geom(m0, "torso"), 0] == pytest.approx(0.0)  # scales about its centre


@pytest.mark.parametrize("domain", ["hopper", "walker", "cheetah"])
def test_mass_rules(domain):
  a_len, a_size = 1.5, 1.4
  m0 = morphology.build_model(domain)
  fixed = morphology.build_model(domain, a_len, a_size, "fixed")
  dense = morphology.build_model(domain, a_len, a_size, "density")
  torso = _body(m0, "torso")
  # fixed: the torso keeps its default mass, but its inertia changes with the geometry
  assert fixed.body_mass[torso] == pytest.approx(m0.body_mass[torso], rel=1e-9)
  assert not np.allclose(fixed.body_inertia[torso], m0.body_inertia[torso])
  # density: the torso capsule's mass scales with its volume; other torso geoms keep theirs
  g = _geom(m0, "torso")
  r, h = m0.geom_size[g, 0], m0.geom_size[g, 1]
  ratio = morphology.capsule_volume(a_size * r, a_len * h) / morphology.capsule_volume(r, h)
  masses = morphology._default_torso_masses(domain)
  expected = masses["torso"] * ratio + sum(v for k, v in masses.items() if k != "torso")
  assert dense.body_mass[torso] == pytest.approx(expected, rel=1e-6)
  assert dense.body_mass[torso] > 2 * m0.body_mass[torso]
  # legs are untouched under both rules
  others = np.arange(m0.nbody) != torso
  np.testing.assert_allclose(fixed.body_mass[others], m0.body_mass[others])
  np.testing.assert_allclose(dense.body_mass[others], m0.body_mass[others])


def test_cheetah_total_mass_is_the_suites_without_settotalmass():
  spec = morphology.build_spec("cheetah")
  assert "settotalmass" not in spec.to_xml()
  assert morphology.build_model("cheetah").body_mass.sum() == pytest.approx(14.0)


@pytest.mark.parametrize("bad", [0.0, -0.2, float("nan")])
def test_non_positive_factor_is_refused(bad):
  with pytest.raises(ValueError, match="non-positive torso"):
    morphology.build_model("walker", bad, 1.0)


def test_unknown_domain_and_mass_rule_are_refused():
  with pytest.raises(ValueError, match="unknown domain 'humanoid'"):
    morphology.build_model("humanoid")
  with pytest.raises(ValueError, match="unknown mass_rule"):
    morphology.build_model("hopper", mass_rule="volume")


@pytest.mark.parametrize("domain", ["hopper", "walker", "cheetah"])
def test_stack_and_member_round_trip(domain):
  """MJX only: the `mjx` backend's batched model (the `mujoco` backend keeps MjModel handles)."""
  tmpl = batching.template(domain)
  models = [morphology.build_model(domain, 1.2, 0.8), morphology.build_model(domain, 0.7, 1.3)]
  batched = batching.stack(tmpl, models)
  assert batched.body_mass.shape == (2, models[0].nbody)
  second = batching.member(batched, 1)
  np.testing.assert_allclose(second.body_mass, models[1].body_mass, rtol=1e-6)
  np.testing.assert_allclose(second.geom_size, models[1].geom_size, rtol=1e-6)
  axes = batching.in_axes(tmpl)
  assert axes.body_mass == 0 and axes.opt.timestep is None
