"""The batched environments on both backends: shapes, episodes, divergence, recompilation and
errors (the `backend` fixture of conftest.py runs each test on `mjx` and on `mujoco`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import host, obs_functions, scenarios, specs
from tests.envs import inject
from tests.envs.conftest import N, stepper


def _random_actions(key, d_a):
  return jax.random.uniform(key, (N, d_a), minval=-1.0, maxval=1.0)


def test_every_observation_function_steps_without_nan(domain_stepper):
  s = domain_stepper
  d = s.env.domain
  fns = [i % len(obs_functions.OBS_FUNCTIONS) for i in range(N)]
  params = s.params(obs_fn=fns)
  state = s.reset(params, jax.random.PRNGKey(0))
  assert bool(state.first.all()) and float(jnp.abs(state.reward).max()) == 0.0
  for k in range(5):
    state = s.step(params, state, _random_actions(jax.random.PRNGKey(k), d.act_dim))
  assert state.obs.shape == (N, specs.OBS_PAD) and state.obs.dtype == jnp.float32
  assert state.obs_clean.shape == (N, d.obs_dim) and state.reward.shape == (N,)
  assert state.first.dtype == jnp.bool_ and state.last.dtype == jnp.bool_
  assert np.isfinite(np.asarray(state.obs)).all() and np.isfinite(np.asarray(state.reward)).all()
  assert not bool(state.first.any()) and int(state.t[0]) == 5
  np.testing.assert_array_equal(np.asarray(state.xi), np.asarray(params.xi))
  obs = np.asarray(state.obs)
  for i, fn in enumerate(fns):
    width = obs_functions.obs_width(d, fn)
    assert np.all(obs[i, width:] == 0), (obs_functions.OBS_FUNCTIONS[fn], obs[i])
    if fn == 0:
      np.testing.assert_array_equal(obs[i, : d.obs_dim], np.asarray(state.obs_clean[i]))
  np.testing.assert_array_equal(np.asarray(params.xi[:, d.id]), 1.0)


def _geom_size(params):
  """[N, ngeom, 3] the members' geom sizes, read from either backend's models."""
  if isinstance(params.model, jax.Array):  # mujoco: [N] int32 handles of MjModels on the host
    return np.stack([host.model(h).geom_size for h in np.asarray(params.model)])
  return np.asarray(params.model.geom_size)


def test_new_scenarios_of_the_same_size_do_not_recompile(domain_stepper):
  s = domain_stepper
  a = s.params(seed=1)
  state = s.reset(a, jax.random.PRNGKey(1))
  traces = s.traces
  b = s.params(seed=2, obs_fn="mask_fixed", reward_mode="suite", episode_length=7)
  state = s.step(b, state, jnp.zeros((N, s.env.domain.act_dim)))
  s.reset(b, jax.random.PRNGKey(2))
  assert s.traces == traces
  assert not np.allclose(_geom_size(a), _geom_size(b))


def test_episodes_truncate_and_restart(backend):
  s = stepper("hopper", backend)
  params = s.params(episode_length=3)
  state = s.reset(params, jax.random.PRNGKey(3))
  flags = []
  for k in range(8):
    flags.append((bool(state.first[0]), bool(state.last[0]), int(state.t[0])))
    state = s.step(params, state, _random_actions(jax.random.PRNGKey(k), 4))
  # 4 observations per 3-step episode: first, two middle states, last; then the next episode
  assert flags == [
    (True, False, 0),
    (False, False, 1),
    (False, False, 2),
    (False, True, 3),
    (True, False, 0),
    (False, False, 1),
    (False, False, 2),
    (False, True, 3),
  ]
  np.testing.assert_array_equal(np.asarray(state.stream_step), 8)


def test_reset_distribution_matches_the_suite(backend):
  s = stepper("walker", backend)
  params = s.params([scenarios.Scenario("walker")] * N)
  data = s.reset(params, jax.random.PRNGKey(4)).data
  m = s.env.template
  qpos = np.asarray(data.qpos)
  limited = s.env.reset_plan["limited_adr"]
  lo, hi = np.asarray(m.jnt_range)[1:][:, 0], np.asarray(m.jnt_range)[1:][:, 1]
  assert np.all(qpos[:, limited] >= lo[2:] - 1e-6) and np.all(qpos[:, limited] <= hi[2:] + 1e-6)
  rooty = qpos[:, 2]  # unlimited hinge: uniform in [-π, π]
  assert rooty.min() < -1.5 and rooty.max() > 1.5 and np.all(np.abs(rooty) <= np.pi)
  np.testing.assert_array_equal(qpos[:, :2], 0.0)  # slides are not randomised
  np.testing.assert_array_equal(np.asarray(data.qvel), 0.0)


def test_divergence_resets_that_env_alone(backend):
  s = stepper("cheetah", backend)
  params = s.params()
  state = s.reset(params, jax.random.PRNGKey(5))
  state = s.step(params, state, jnp.zeros((N, 6)))
  state = state.replace(data=inject.nan_qvel(state.data, 3))
  nxt = s.step(params, state, jnp.zeros((N, 6)))
  assert np.isfinite(np.asarray(nxt.obs)).all() and np.isfinite(np.asarray(nxt.reward)).all()
  assert nxt.diverged.tolist() == [i == 3 for i in range(N)]
  assert bool(nxt.last[3]) and float(nxt.reward[3]) == 0.0 and int(nxt.diverged.sum()) == 1
  after = s.step(params, nxt, jnp.zeros((N, 6)))
  assert np.asarray(after.first).tolist() == [i == 3 for i in range(N)]
  assert np.isfinite(np.asarray(after.data.qvel)).all()


def test_speed_stand_and_upright_equal_a_hand_computation(backend):
  s = stepper("walker", backend)
  params = s.params()
  state = s.reset(params, jax.random.PRNGKey(6))
  for k in range(10):
    state = s.step(params, state, _random_actions(jax.random.PRNGKey(k), 6))
  i = 5
  sc = scenarios.Scenario("walker", *np.asarray(params.xi[i, 3:]).tolist())
  m = env_lib._model("walker", sc.alpha_len, sc.alpha_size, "fixed", s.env.solver)
  d = mujoco.MjData(m)
  d.qpos[:], d.qvel[:] = np.asarray(state.data.qpos[i]), np.asarray(state.data.qvel[i])
  mujoco.mj_forward(m, d)
  mujoco.mj_subtreeVel(m, d)
  torso = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "torso")
  speed, height, upright = d.subtree_linvel[torso, 0], d.xpos[torso, 2], d.xmat[torso, 8]
  np.testing.assert_allclose(float(state.speed[i]), speed, atol=1e-4)
  np.testing.assert_allclose(float(state.height[i]), height, atol=1e-5)
  np.testing.assert_allclose(float(state.upright[i]), upright, atol=1e-5)
  # reward by hand: standing gaussian tolerance, upright (1 + zz)/2, linear speed term
  v_star = sc.beta * s.env.v_max
  standing = (
    1.0 if height >= 1.2 else np.exp(-0.5 * ((1.2 - height) / 0.6 * np.sqrt(-2 * np.log(0.1))) ** 2)
  )
  stand = (3 * standing + (1 + upright) / 2) / 4
  move = max(0.0, 1 - abs(speed - v_star) / v_star)
  np.testing.assert_allclose(float(state.reward[i]), stand * (5 * move + 1) / 6, atol=1e-4)


def test_bad_input_fails_before_compiling(backend):
  env = env_lib.make_env("hopper", backend=backend)
  params = env.make_params([scenarios.Scenario("hopper")] * 2)
  state = jax.eval_shape(env.initial, params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"hopper action must have shape \[N, 4\]"):
    jax.eval_shape(env.step, params, state, jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="does not match the 2 scenarios"):
    jax.eval_shape(env.step, params, state, jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="unknown domain 'ant'"):
    env_lib.make_env("ant")
  with pytest.raises(ValueError, match="unknown observation function"):
    env.make_params([scenarios.Scenario("hopper")], obs_fn="blur")
  with pytest.raises(ValueError, match="scenario of domain 'walker'"):
    env.make_params([scenarios.Scenario("walker")])
  with pytest.raises(ValueError, match="non-positive torso"):
    scenarios.ScenarioDistribution("a", ((1 - 1.2, 1 + 1.2),), ((0.5, 0.8),))
  with pytest.raises(ValueError, match="unknown reward_mode"):
    env.make_params([scenarios.Scenario("hopper")], reward_mode="fast")
