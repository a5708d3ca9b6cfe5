"""The collection program on both backends: the same records at first, the same statistics after.

The session's runner (A = 2 agents × N = 4 envs) on MJX and on the `mujoco` backend collects
EXPLORE chunks (each agent's fresh stochastic policy, ξ fed: a closed loop through observations
and actions) from the same keys, so both see the same reset draws and policy noise. Each agent's
four members are four morphologies, so every member's physics is its own scenario's model.

- Records 0–25 of each episode (PROTOCOL.md's horizon for state equality) agree within 1e-2 in
  at least 90% of the member-episodes; afterwards closed-loop episodes drift apart chaotically.
- Whole episodes are compared by statistics: the mean return within 15%.

Measured here (2-core CPU, 6 blocks of 8 chunks, keys 100–115 and 200–231): 98.4–100% of
member-episodes within 1e-2 over records 0–25 (89–100% within 1e-3), the mean return of a block
(3.5–8.3 per 250-step episode) within −8.5% … +1.5% of MJX's. The same comparison with the
`mujoco` backend broken on purpose: default models for every member, 25% within 1e-2 (only the
default members); members' models in reversed order, 0%; actions ignored (zero actions), 0%,
and the return 96% lower (0.20).
"""

from __future__ import annotations

import jax
import numpy as np

from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.envs import scenarios
from tests.agents.conftest import CHUNK, A

MORPHS = [(1.0, 1.0), (0.6, 0.6), (1.4, 1.4), (0.6, 1.4)]  # (α_len, α_size) of members 0–3
CHUNKS = 8  # one 250-step episode per member each: 64 member-episodes
HORIZON = 25  # control steps compared record by record
OBS_TOL, MIN_CLOSE = 1e-2, 0.9
RETURN_TOL = 0.15


def _collect(runner):
  """[chunks, HORIZON + 1, A·N, d_o] first records and [chunks, A·N] episode returns."""
  members = [scenarios.Scenario("cheetah", a, b, 0.5) for a, b in MORPHS] * A
  params = runner.env.make_params(members, episode_length=CHUNK - 1)
  controls = runner_lib.make_controls("explore", xi_gate=1.0)
  heads, returns = [], []
  for k in range(CHUNKS):
    _, out = runner.run(runner.init(params, jax.random.PRNGKey(100 + k)), params, controls)
    assert np.asarray(out.last)[-1].all() and np.asarray(out.last).sum() == A * len(MORPHS)
    heads.append(np.asarray(out.obs[: HORIZON + 1]))
    returns.append(np.asarray(out.episode_return[-1]))
  return np.stack(heads), np.stack(returns)


def test_both_backends_collect_alike(runners):
  mjx_heads, mjx_returns = _collect(runners("mjx"))
  heads, returns = _collect(runners("mujoco"))
  err = np.abs(heads - mjx_heads).max(axis=(1, 3))  # [chunks, A·N]
  close = np.mean(err <= OBS_TOL)
  rel = returns.mean() / mjx_returns.mean() - 1
  print(f"records 0-{HORIZON} within {OBS_TOL}: {close:.1%}; mean return {returns.mean():.3f}")
  print(f"(MJX {mjx_returns.mean():.3f}, {rel:+.1%}); median member error {np.median(err):.1e}")
  assert close >= MIN_CLOSE, err
  assert abs(rel) <= RETURN_TOL
