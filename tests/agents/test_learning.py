"""SAC learns: cheetah at the default morphology, target speed β = 0.5 (v* = 4 m/s).

The session's runner (`mujoco` backend, A = 2 agents × 4 envs, 2×64 networks, batch 64, 4
updates per iteration, i.e. 1 per env step) trains from key 0 for 24 chunks of 251 iterations:
6024 iterations, about 24k env steps and 24k updates per agent, the first 1000 env steps uniform.
Each chunk is exactly one 250-step episode per member, so a mode switch between chunks gives
clean episodes.

Measured here (key 0, 2-core CPU shared with other jobs): uniform-random return 2.23 per
250-step episode (mean of 8 members); deterministic return after training 30.4 (agent means 17
and 44; 14×); about 60 s of training after a 10 s compile. On MJX (before the `mujoco` backend):
2.23 → 48.2 (agent means 63 and 33; 21×); other keys (outside this test's mode sequence) gave
2.8 → 28 and 2.5 → 60 after 24 chunks; the weakest agent seen was at 2.7× its random return, so
the test asserts 3× on the mean over both agents.
"""

from __future__ import annotations

import jax
import numpy as np

from mrcom_jax.agents import runner as runner_lib
from tests.agents.conftest import CHUNK, cheetah_params

TRAIN_CHUNKS = 24


def _episode_return(out) -> np.ndarray:
  """[A·N] returns of the chunk's single episode per member."""
  first, last = np.asarray(out.first), np.asarray(out.last)
  assert first[0].all() and last[-1].all() and last.sum() == last.shape[1]
  return np.asarray(out.episode_return)[-1]


def test_sac_learns_cheetah_target_speed(runner):
  params = cheetah_params(runner, CHUNK - 1)
  state = runner.init(params, jax.random.PRNGKey(0))
  state, out = runner.run(state, params, runner_lib.make_controls("random"))
  random_return = _episode_return(out).mean()
  controls = runner_lib.make_controls("train", random_steps=1000)
  for _ in range(TRAIN_CHUNKS):
    state, out = runner.run(state, params, controls)
  state, out = runner.run(state, params, runner_lib.make_controls("deterministic"))
  learned = _episode_return(out)
  print(f"random {random_return:.2f}, learned {learned.mean():.2f} per member {learned}")
  assert random_return > 0
  assert learned.mean() >= 3 * random_return
