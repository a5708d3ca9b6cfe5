"""The collection program: record layout, modes, replay contents, agents, bitwise resume."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import scenarios
from tests.agents.conftest import BACKENDS, CHUNK, CONFIG, A, N, cheetah_params, copy
from tests.envs import inject

RECORDS = 21  # records per episode at episode_length 20: first … last


def _cat(outs, field):
  return np.concatenate([getattr(o, field) for o in outs])


def test_chunk_layout(trained):
  _, _, outs = trained
  first, last = _cat(outs, "first"), _cat(outs, "last")
  reward, action, ret = _cat(outs, "reward"), _cat(outs, "action"), _cat(outs, "episode_return")
  t = np.arange(2 * CHUNK)[:, None]
  # every member: first at 0, 21, 42, …; last at 20, 41, …; across the chunk boundary too
  np.testing.assert_array_equal(first, np.broadcast_to(t % RECORDS == 0, first.shape))
  np.testing.assert_array_equal(last, np.broadcast_to(t % RECORDS == RECORDS - 1, last.shape))
  np.testing.assert_array_equal(_cat(outs, "stream_step"), np.broadcast_to(t, first.shape))
  assert not _cat(outs, "diverged").any()
  assert np.all(reward[first] == 0.0)
  # the env ignores the action at `last`: recorded as zeros; elsewhere in [-1, 1] and moving
  assert np.all(action[last] == 0.0)
  assert np.all(np.abs(action) <= 1.0) and np.all(np.any(action[~last] != 0.0, axis=-1))
  obs = _cat(outs, "obs")
  assert obs.shape == (2 * CHUNK, A * N, 17) and np.isfinite(obs).all()
  # episode_return at `last` is the sum of that episode's records' rewards
  for end in range(RECORDS - 1, 2 * CHUNK, RECORDS):
    np.testing.assert_allclose(
      ret[end], reward[end - RECORDS + 1 : end + 1].sum(0), rtol=1e-5, atol=1e-6
    )
  assert outs[0].metrics["critic_loss"].shape == (CHUNK,)
  assert outs[0].agent_metrics["critic_loss"].shape == (CHUNK, A)


def test_replay_holds_real_transitions_only(trained, short_params):
  _, final, outs = trained
  last = _cat(outs, "last")
  replay = final.replay
  # iteration 0 steps the pre-episode state (no transition); later ones step records 0…500,
  # and a transition out of a `last` record is none: 501 − 23 lasts = 478 per member.
  per_member = int((~last[:-1]).sum(0)[0])
  assert per_member == 2 * CHUNK - 1 - 23
  np.testing.assert_array_equal(replay.size, [N * per_member] * A)
  # the first stored rows are (o_0, ξ, a_0, r_1, o_1) of the agent's members, in member order
  obs, action, reward = _cat(outs, "obs"), _cat(outs, "action"), _cat(outs, "reward")
  for a in range(A):
    members = slice(a * N, (a + 1) * N)
    np.testing.assert_array_equal(replay.obs[a, :N], obs[0, members])
    np.testing.assert_array_equal(replay.next_obs[a, :N], obs[1, members])
    np.testing.assert_array_equal(replay.action[a, :N], action[0, members])
    np.testing.assert_array_equal(replay.reward[a, :N], reward[1, members])
    np.testing.assert_array_equal(replay.xi[a, :N], np.asarray(short_params.xi)[members])


def test_updates_and_counters(trained):
  _, final, outs = trained
  updates = np.concatenate([o.agent_metrics["updates"] for o in outs])  # [T, A]
  np.testing.assert_array_equal(final.sac.step, updates.sum(0))
  # iterations 1…16 store 4 · 16 = 64 transitions (no `last` before record 20); from then on,
  # 4 updates per iteration
  np.testing.assert_array_equal(updates.sum(0), [4 * (2 * CHUNK - 16)] * A)
  np.testing.assert_array_equal(final.env_steps, [2 * CHUNK * N] * A)
  assert int(final.iteration) == 2 * CHUNK
  assert np.all(np.isfinite(np.concatenate([o.metrics["critic_loss"] for o in outs])))


def test_agents_differ(trained):
  initial, final, outs = trained
  for tree in (initial.sac.actor, final.sac.actor, final.sac.critic):
    for leaf in jax.tree.leaves(tree):
      if leaf.ndim > 2:  # kernels [A, in, out]: distinct draws per agent
        assert not np.allclose(leaf[0], leaf[1])
  assert not np.allclose(outs[1].action[:, :N], outs[1].action[:, N:])


@pytest.mark.parametrize("mode", ["explore", "deterministic", "random"])
def test_modes_without_updates_keep_params(runner, trained, short_params, mode):
  _, final, _ = trained
  state, out = runner.run(copy(final), short_params, runner_lib.make_controls(mode, xi_gate=1.0))
  state = copy(state)
  jax.tree.map(np.testing.assert_array_equal, state.sac, final.sac)
  jax.tree.map(np.testing.assert_array_equal, state.replay, final.replay)
  np.testing.assert_array_equal(state.env_steps, final.env_steps)
  assert all(np.all(m == 0) for m in jax.tree.leaves(out.agent_metrics))
  action = np.asarray(out.action)[~np.asarray(out.last)]
  if mode == "random":  # uniform in [-1, 1]: mean 0, variance 1/3, quartiles equally filled
    assert np.all(np.abs(action) <= 1.0)
    assert abs(action.mean()) < 0.02 and abs(action.var() - 1 / 3) < 0.02
    counts = np.histogram(action, bins=4, range=(-1, 1))[0] / action.size
    np.testing.assert_allclose(counts, 0.25, atol=0.02)
  if mode == "deterministic":  # the same observation gives the same action: a pure function
    again = runner.run(copy(final), short_params, runner_lib.make_controls(mode, xi_gate=1.0))[1]
    np.testing.assert_array_equal(again.action, out.action)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bitwise(runners, trained_runs, backend):
  """Stopped on a chunk boundary (mid-episode: record 250 of 20-step episodes), saved as numpy
  (every leaf through the host, as a checkpoint holds it) and continued, the run equals the
  uninterrupted one bitwise: parameters, replay, env state (the `mujoco` backend's exact float64
  state and warm start included) and records. Between stop and restart another run steps the
  same models: nothing of the run may live outside its state (e.g. in the `mujoco` backend's
  host-side MjData)."""
  runner = runners(backend)
  initial, final, outs = trained_runs(backend)
  params = cheetah_params(runner, 20)
  controls = runner_lib.make_controls("train", random_steps=200)
  state, out_1 = runner.run(copy(initial), params, controls)
  saved = copy(state)  # what a checkpoint holds
  del state
  runner.run(runner.init(params, jax.random.PRNGKey(7)), params, controls)
  state, out_2 = runner.run(saved, params, controls)
  jax.tree.map(np.testing.assert_array_equal, copy(state), final)
  jax.tree.map(np.testing.assert_array_equal, (copy(out_1), copy(out_2)), tuple(outs))
  assert runner.compiles() == 1  # fresh, run-output and restored (numpy) states: one program


def test_with_actor_and_snapshot(runner, trained, short_params):
  initial, final, _ = trained
  snapshot = runner.actor_params(final, agent=1)
  state = runner.with_actor(copy(initial), snapshot)
  for stack, leaf in zip(jax.tree.leaves(state.sac.actor), jax.tree.leaves(snapshot)):
    np.testing.assert_array_equal(stack[0], leaf)
    np.testing.assert_array_equal(stack[1], leaf)
  state = runner.with_actor(copy(initial), snapshot, agent=0)
  np.testing.assert_array_equal(
    jax.tree.leaves(state.sac.actor)[0][1], jax.tree.leaves(initial.sac.actor)[0][1]
  )


def test_config_checks(runner, short_params):
  with pytest.raises(ValueError, match="num_agents"):
    runner.init(short_params.replace(v_target=short_params.v_target[:3]), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="domain"):
    runner_lib.make_runner(runner.env, CONFIG.__class__(domain="walker"))
  with pytest.raises(ValueError, match="mode"):
    runner_lib.make_controls(7)
  mjx_params = env_lib.make_env("cheetah", backend="mjx").make_params(
    [scenarios.Scenario("cheetah")] * A * N
  )
  with pytest.raises(ValueError, match="'mjx'-backend env"):  # params of the other backend
    runner.init(mjx_params, jax.random.PRNGKey(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_diverged_member_waits_out_its_episode(runners, backend):
  """A NaN injected mid-episode into member 3's joint velocity (`inject.nan_qvel`, as the env
  tests do, into the state the backend continues from): that member's episode keeps its 301
  records (marked `diverged` from the divergence on, reward 0, finite), restarts on the grid
  with the others, and the replay stores none of its later transitions."""
  runner = runners(backend)
  params = cheetah_params(runner, 300)  # records 0…300 are episode 1, 301… episode 2
  state, _ = runner.run(
    runner.init(params, jax.random.PRNGKey(1)), params, runner_lib.make_controls("explore")
  )
  # after records 0…250: every member at t = 250, mid-episode
  state = state.replace(env=state.env.replace(data=inject.nan_qvel(state.env.data, member=3)))
  controls = runner_lib.make_controls("train", random_steps=10**6)
  final, out = runner.run(state, params, controls)
  diverged, last, first = (np.asarray(getattr(out, f)) for f in ("diverged", "last", "first"))
  held = np.arange(251, 502)[:, None] <= 300  # records 251…300 of the chunk's 251…501
  np.testing.assert_array_equal(diverged, held & (np.arange(A * N) == 3))
  grid = np.arange(251, 502)[:, None]
  np.testing.assert_array_equal(last, np.broadcast_to(grid == 300, last.shape))
  np.testing.assert_array_equal(first, np.broadcast_to(grid == 301, first.shape))
  assert np.all(np.asarray(out.reward)[diverged] == 0.0)
  assert np.isfinite(np.asarray(out.obs)).all() and np.isfinite(np.asarray(out.reward)).all()
  assert not diverged[np.asarray(out.first)].any()  # the next episode starts clean
  # Transitions into records 252…501 (not out of `last` 300): 250 per member; member 3 (agent
  # 0) adds none into its held records 251…300 nor out of 300: only 302…501, 200.
  np.testing.assert_array_equal(np.asarray(final.replay.size), [3 * 250 + 200, 4 * 250])
