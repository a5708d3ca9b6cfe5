"""The adaptation program without a world model: learning, schedules, vmap over seeds, resume.

Measured here (2-core CPU, seeds 0-3, evaluations of 2 episodes every 500 real steps): the
uniform-random return is 1.5-4.0 per 250-step cheetah episode at β = 0.5 (v* = 0.5 · v_max).
Plain SAC (2×64, batch 64, actor lr 1e-4, critic lr 2e-4, 2 updates per real step) peaks at a
mean over two seeds of 18.9 (seeds 0, 1, at 1,500 steps) and 15.1 (seeds 2, 3, at 3,000 steps),
6-7× random, then falls back towards random by 6,000 steps while its soft Q keeps rising (on
MJX; on the `mujoco` backend, which these tests use, seeds 0, 1: random 1.5 and 4.0, the best
evaluation 15.0 at 1,500 steps, 5.4× random). The runner's SAC (tests/agents) does the same
with one env and these settings, so this is SAC at this budget, not the program. The test
asserts that the return *reaches* 3× random within 3,000 real steps: the best evaluation's mean
over both seeds.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.training import checkpoint as checkpoint_lib
from tests.adaptation.conftest import params_for


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b) -> bool:
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def _train(program, state, params, chunks):
  for _ in range(chunks):
    state, out = program.run(state, params, program_lib.AdaptMode.TRAIN)
  return state, out


def test_plain_sac_learns_and_follows_the_schedule(plain2):
  params = params_for(plain2, (0, 1))
  state = plain2.init(params)
  before = _copy(state)
  state, random_returns = plain2.evaluate(state, params, 2, random=True)
  assert _same(state, before)  # evaluating sets the training episode aside and restores it
  steps, chunk = plain2.spec.real_steps, plain2.spec.chunk
  curve = []
  for i in range(steps // chunk):
    state, out = plain2.run(state, params, program_lib.AdaptMode.TRAIN)
    if (i + 1) % 2 == 0:
      state, returns = plain2.evaluate(state, params, 2, tag=i)
      curve.append(returns.mean())
  assert plain2.real_steps(state) == steps and int(state.records) == 8 + steps
  # updates_per_step updates at every real step once update_after (50) transitions exist
  np.testing.assert_array_equal(np.asarray(state.sac.step), 2 * (steps - 50))
  assert np.all(np.asarray(out.sac["updates"]) == 2)
  print(f"random {random_returns}, evaluations {np.round(curve, 2)}")
  assert np.all(random_returns > 0)
  assert max(curve) >= 3 * random_returns.mean()
  assert plain2.compiles() == 1  # train and both evaluation modes share one program


def test_the_stream_is_the_real_buffer(plain2):
  """Stream slots k.. hold every real record in order; the slots before stay empty."""
  params = params_for(plain2, (0, 1))
  state = plain2.init(params)
  state, out_a = plain2.run(state, params, program_lib.AdaptMode.TRAIN)
  state, out_b = plain2.run(state, params, program_lib.AdaptMode.TRAIN)
  s = jax.device_get(state.stream)
  k, n = 8, 2 * plain2.spec.chunk  # 500 records: one whole 251-record episode and the next
  cat = lambda name: np.concatenate([getattr(out_a, name), getattr(out_b, name)]).T
  np.testing.assert_array_equal(s.reward[:, k : k + n], cat("reward"))
  np.testing.assert_array_equal(s.first[:, k : k + n], cat("first"))
  assert s.first[:, k].all() and not s.obs[:, :k].any() and not s.obs[:, k + n :].any()
  assert np.all(s.obs[:, k : k + n, 17:] == 0) and s.obs[:, k : k + n, :17].any()
  # a `last` record's action is 0 (the env ignores it and starts a new episode)
  last = s.last[:, k : k + n]
  assert last.sum() == 2 and last[:, 250].all() and s.first[:, k + 251].all()
  assert np.all(s.action[:, k : k + n][last] == 0)


def _relative(a, b) -> float:
  """‖a − b‖ / ‖b‖ over a whole parameter tree."""
  la, lb = _leaves(a), _leaves(b)
  diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb)))
  return float(diff / np.sqrt(sum(np.sum(y**2) for y in lb)))


def test_vmap_over_seeds_equals_one_by_one(plain2, plain1):
  """Two seeds in one call against each run alone, by PROTOCOL.md's equality: parameters within
  1e-5 relative after the first 20 updates, while the two seeds differ from each other by far
  more (a shared or misrouted key would make them equal, or make a pair differ from its run
  alone at the percent level).

  On the `mujoco` backend each member steps alone in float64 whatever its batch, so the real
  streams (uniform actions from the pairs' own keys) and the exact env states are bitwise those
  of the runs alone; the parameters differ by 2e-9 and 4e-9 after 20 updates (XLA's batched SAC
  arithmetic). On MJX the batch of two and the batch of one differ in the last bits (4e-5 in
  observations after 250 steps, within the 1e-4 state tolerance), hence 25-record episodes,
  PROTOCOL.md's horizon for state equality; Adam amplifies last-bit gradient differences:
  measured there on a 2-core CPU (jaxlib 0.12.0.1), seed 1 differed by 1.0e-6 after 2 updates,
  5.7e-7 after 20, 1.3e-5 after 50 and 1.2e-5 after 100 (seed 0: 2-3e-7 throughout). A
  whole-run comparison by final return (1,500 real steps, 2 seeds, within 10%) used to stand
  here; on this machine it failed at the commit that added it too (returns of 1-14, where SAC
  has not learned yet, diverge chaotically: 4.5 against 2.3), so it said nothing about the
  program.
  """
  kw = dict(update_after=240, episode_length=24)  # 10 real steps × 2 updates
  together_params = params_for(plain2, (0, 1), **kw)
  alone_params = [params_for(plain1, (s,), **kw) for s in (0, 1)]
  together, _ = _train(plain2, plain2.init(together_params), together_params, 1)
  alone = [_train(plain1, plain1.init(p), p, 1)[0] for p in alone_params]
  assert np.all(np.asarray(together.sac.step) == 20)
  for i, a in enumerate(alone):
    for got, want in zip(_leaves((together.stream, together.envs)), _leaves((a.stream, a.envs))):
      np.testing.assert_array_equal(got[i], want[0])
  pair = [jax.tree.map(lambda x, i=i: x[i], together.sac) for i in (0, 1)]
  for i, a in enumerate(alone):
    err = _relative(pair[i], jax.tree.map(lambda x: x[0], a.sac))
    print(f"seed {i}: relative parameter difference after 20 updates {err:.2e}")
    assert err <= 1e-5
  assert _relative(pair[0], pair[1]) > 0.1


@pytest.mark.parametrize("name", ["plain2", pytest.param("plain2_mjx", marks=pytest.mark.slow)])
def test_stop_and_resume_equals_an_uninterrupted_run(request, name, tmp_path):
  """Stopped after one chunk, checkpointed, restored into a fresh template and continued, the run
  equals the uninterrupted one bitwise (SACs, stream, env states: the `mujoco` backend's exact
  float64 state included). Between save and restore another run steps the same models, as in a
  restarted process: nothing of the run may live outside its state."""
  program = request.getfixturevalue(name)
  params = params_for(program, (0, 1), random_steps=100, update_after=100)
  straight, _ = _train(program, program.init(params), params, 3)
  first, _ = _train(program, program.init(params), params, 1)
  with checkpoint_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(250, first, {"real_steps": 250})
  del first
  other = params_for(program, (5, 6), random_steps=100, update_after=100)
  _train(program, program.init(other), other, 1)
  with checkpoint_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    step, resumed, _ = ckpt.restore_latest(program.init(params))
  assert step == 250
  resumed, _ = _train(program, resumed, params, 2)
  assert _same(resumed, straight)
  assert program.compiles() == 1
