"""Reward terms against dm_control's `rewards.tolerance` and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from dm_control.utils import rewards as dm_rewards

from mrcom_jax.envs import rewards

X = np.linspace(-3.0, 12.0, 301)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(bounds=(1.2, np.inf), margin=0.6),
    dict(bounds=(0.6, 2.0)),
    dict(bounds=(2.0, np.inf), margin=1.0, sigmoid="linear", value_at_margin=0.5),
    dict(bounds=(10.0, np.inf), margin=10.0, sigmoid="linear", value_at_margin=0.0),
    dict(bounds=(3.0, 3.0), margin=3.0, sigmoid="linear", value_at_margin=0.0),
  ],
)
def test_tolerance_matches_dm_control(kwargs):
  ours = np.asarray(rewards.tolerance(X, **kwargs))
  ref = np.array([dm_rewards.tolerance(x, **kwargs) for x in X])
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_speed_term_by_hand():
  # v* = 2: 1 at the target, 0 at standstill and at 2v*, 1/2 half-way on either side.
  v = np.array([2.0, 0.0, 4.0, 1.0, 3.0, 5.0, -1.0])
  np.testing.assert_allclose(rewards.speed_term(v, 2.0), [1, 0, 0, 0.5, 0.5, 0, 0], atol=1e-6)


def test_domain_rewards_by_hand():
  # cheetah: the speed term alone. v = 6, v* = 8 → 1 - 2/8 = 0.75
  assert float(rewards.cheetah(6.0, 8.0, 0)) == pytest.approx(0.75)
  # suite run: tolerance(6, (10, inf), margin 10, linear, 0) = 1 - 4/10 = 0.6
  assert float(rewards.cheetah(6.0, 8.0, 1)) == pytest.approx(0.6)
  # walker: height 1.3 ≥ 1.2 → standing 1; upright zz = 0 → 0.5; stand = (3 + 0.5)/4 = 0.875
  # speed 2.5 with v* = 5 → 0.5; reward = 0.875 · (5·0.5 + 1)/6 = 0.875 · 3.5/6
  assert float(rewards.walker(2.5, 1.3, 0.0, 5.0, 0)) == pytest.approx(0.875 * 3.5 / 6)
  # hopper: height 0.7 in (0.6, 2) → standing 1; v = 0.75, v* = 1 → 0.75
  assert float(rewards.hopper(0.75, 0.7, 1.0, 0)) == pytest.approx(0.75)
  assert float(rewards.hopper(0.75, 0.5, 1.0, 0)) == 0.0  # not standing
  # suite hop at v = 1.5: tolerance(1.5, (2, inf), margin 1, linear, 0.5) = 1 - 0.5·0.5 = 0.75
  assert float(rewards.hopper(1.5, 0.7, 1.0, 1)) == pytest.approx(0.75)


def test_unknown_sigmoid_is_refused():
  with pytest.raises(ValueError, match="unknown sigmoid"):
    rewards.tolerance(1.0, (0.0, 0.5), 1.0, sigmoid="cubic")
