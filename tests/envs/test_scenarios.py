"""Scenario distributions of settings (a)–(d)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mrcom_jax.envs import scenarios, specs


@pytest.mark.parametrize("setting,delta,beta", [("a", 0.2, (0.5, 0.8)), ("c", 0.4, (0.3, 0.9))])
def test_in_distribution_ranges(setting, delta, beta):
  for split in scenarios.SPLITS:
    dist = scenarios.get_distribution(setting, split)
    drawn = dist.sample(np.random.default_rng(0), "walker", 2000)
    a = np.array([[s.alpha_len, s.alpha_size] for s in drawn])
    b = np.array([s.beta for s in drawn])
    assert a.min() >= 1 - delta and a.max() <= 1 + delta
    assert a.min() < 1 - delta + 0.02 and a.max() > 1 + delta - 0.02  # the range is covered
    assert b.min() >= beta[0] and b.max() <= beta[1]
    assert abs(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) < 0.1  # independent factors


@pytest.mark.parametrize(
  "setting,inner,outer,beta_sets",
  [("b", 0.2, 0.4, ((0.3, 0.5), (0.8, 1.0))), ("d", 0.4, 0.6, ((0.1, 0.3), (0.9, 1.0)))],
)
def test_out_of_distribution_rings(setting, inner, outer, beta_sets):
  dist = scenarios.get_distribution(setting, "eval")
  drawn = dist.sample(np.random.default_rng(1), "cheetah", 4000)
  a = np.array([s.alpha_len for s in drawn])
  dev = np.abs(a - 1)
  assert dev.min() >= inner and dev.max() <= outer
  assert 0.45 < np.mean(a < 1) < 0.55  # equal-length halves, equal weight
  b = np.array([s.beta for s in drawn])
  in_sets = [(lo <= b) & (b <= hi) for lo, hi in beta_sets]
  assert np.all(np.any(in_sets, axis=0))
  lengths = np.array([hi - lo for lo, hi in beta_sets])
  np.testing.assert_allclose([m.mean() for m in in_sets], lengths / lengths.sum(), atol=0.03)


def test_distribution_is_an_immutable_value_that_round_trips():
  dist = scenarios.get_distribution("d", "eval")
  with pytest.raises(dataclasses.FrozenInstanceError):
    dist.alpha = ((1.0, 1.0),)
  back = scenarios.ScenarioDistribution.from_dict(json.loads(json.dumps(dist.to_dict())))
  assert back == dist
  fixed = dist.with_beta(0.8)
  assert {s.beta for s in fixed.sample(np.random.default_rng(0), "hopper", 10)} == {0.8}


def test_same_seed_same_draws():
  d = scenarios.get_distribution("a")
  assert d.sample(np.random.default_rng(3), "hopper", 5) == d.sample(
    np.random.default_rng(3), "hopper", 5
  )


def test_descriptor():
  s = scenarios.Scenario("walker", 1.1, 0.9, 0.6)
  np.testing.assert_allclose(s.descriptor, [0, 1, 0, 1.1, 0.9, 0.6], rtol=1e-6)
  assert s.descriptor.shape == (specs.XI_DIM,)


def test_bad_values_are_refused():
  with pytest.raises(ValueError, match="non-positive torso"):
    scenarios.ScenarioDistribution("bad", ((0.0, 2.0),), ((0.5, 0.8),))
  with pytest.raises(ValueError, match="unknown setting"):
    scenarios.get_distribution("e")
  with pytest.raises(ValueError, match="unknown split"):
    scenarios.get_distribution("a", "test")
  with pytest.raises(ValueError, match="β ≤ 1"):
    scenarios.Scenario("hopper", beta=1.2)
  with pytest.raises(ValueError, match="unknown domain"):
    scenarios.Scenario("ant")
  assert (
    scenarios.fixed_dynamics().sample(np.random.default_rng(0), "walker", 1)[0].alpha_len == 1.0
  )


def test_specs_padding_helpers_round_trip():
  obs = np.arange(24, dtype=np.float32)[None]
  padded = specs.pad_obs(obs)
  assert padded.shape == (1, specs.OBS_PAD) and np.all(padded[0, 24:] == 0)
  np.testing.assert_array_equal(specs.unpad_obs(padded, "walker"), obs)
  assert specs.unpad_obs(padded, "walker", "add_distractor").shape == (1, 27)
  act = np.ones((3, 4), np.float32)
  np.testing.assert_array_equal(specs.unpad_action(specs.pad_action(act), "hopper"), act)
  np.testing.assert_array_equal(specs.obs_mask(0), (np.arange(27) < 15).astype(np.float32))
  np.testing.assert_array_equal(specs.obs_mask(1, 2), np.ones(27, np.float32))
  np.testing.assert_array_equal(specs.act_mask(0), [1, 1, 1, 1, 0, 0])
  assert specs.get_domain("cheetah").n_substeps == 1 and specs.get_domain("walker").n_substeps == 10
