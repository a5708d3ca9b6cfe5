"""The adaptation program on both backends: the same real stream at first, the same returns.

`plain2` on MJX and on the `mujoco` backend, two pairs at two non-default morphologies, from the
same pair keys (seeds 8, 9): two TRAIN chunks of uniform actions (no updates), whose streams
must hold the same records over the first 25 steps of an episode (PROTOCOL.md's horizon for
state equality) in at least 3 of the 4 episodes, then `evaluate` (each pair's fresh
deterministic policy, a closed loop through the observations) on 8 fresh episodes per pair,
whose mean return must agree within 15%.

Measured here (2-core CPU, 12 sets of two seeds 0–23): 63 of 64 episodes' first 25 records agree
within 1e-4 (the other within 6.1e-2); the evaluation's mean return (0.2–13.8 per 250-step
episode) lies within −9.4% … +1.9% of MJX's (seeds 8, 9: 12.9 against 13.8, −6.2%). The same
test with the `mujoco` backend broken on purpose fails on all 4 episodes (errors of 3–9) and on
the return: default models for every pair (−18%), the pairs' models swapped (+24%), actions
ignored (−97%).
"""

from __future__ import annotations

import numpy as np
import pytest

from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.envs import scenarios
from tests.adaptation.conftest import EPISODE, pair_keys, params_for

MORPHS = [scenarios.Scenario("cheetah", a, b, 0.5) for a, b in ((0.6, 1.4), (1.4, 0.6))]
SEEDS = (8, 9)
HORIZON, OBS_TOL, MIN_CLOSE = 25, 1e-2, 0.75
EPISODES, RETURN_TOL = 8, 0.15


def _adapt(program: program_lib.Program):
  """[P, 2, HORIZON + 1, 27] the first records of both training episodes; [P] mean returns."""
  params = params_for(program, SEEDS, random_steps=10**6, update_after=10**6, scenarios=MORPHS)
  state = program.init(params)
  for _ in range(2):
    state, _ = program.run(state, params, program_lib.AdaptMode.TRAIN)
  k, records = program.spec.context_len, EPISODE + 1
  obs = np.asarray(state.stream.obs)
  heads = np.stack([obs[:, k + s : k + s + HORIZON + 1] for s in (0, records)], axis=1)
  assert np.asarray(state.stream.first)[:, [k, k + records]].all()
  _, returns = program.evaluate(state, params, EPISODES)
  return heads, returns


def test_both_backends_adapt_alike(plain2, plain2_mjx):
  mjx_heads, mjx_returns = _adapt(plain2_mjx)
  heads, returns = _adapt(plain2)
  err = np.abs(heads - mjx_heads).max(axis=(2, 3))  # [P, episodes]
  rel = returns.mean() / mjx_returns.mean() - 1
  print(f"stream records 0-{HORIZON}: max errors {err.ravel()}")
  print(f"returns {returns} (MJX {mjx_returns}, {rel:+.1%})")
  assert np.mean(err <= OBS_TOL) >= MIN_CLOSE, err
  assert abs(rel) <= RETURN_TOL


def test_env_params_of_the_other_backend_are_refused(plain2, plain2_mjx):
  mjx_env_params = plain2_mjx.envs[0].make_params(MORPHS)
  with pytest.raises(ValueError, match="'mjx'-backend env"):
    plain2.make_params([mjx_env_params], pair_keys(SEEDS), [0, 0], random_steps=0, update_after=2)
