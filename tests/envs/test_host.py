"""The `mujoco` backend's callback (`envs/host.py`: MuJoCo C through one `jax.pure_callback` per
control step) under JAX's transforms, and its exactness.

- `vmap` (the runner's agents, the adaptation program's pairs): a vmapped step equals each batch
  stepped alone, bitwise, and reaches MuJoCo as one host call for the whole batch
  (`vmap_method="broadcast_all"`); `lax.scan` equals the step-by-step loop; under `lax.cond`
  only the taken branch calls the host.
- Exactness: a run split by a host round-trip of the state pytree (a checkpoint) continues
  bitwise; the solver's warm start is carried in the state; and MuJoCo C stepped by hand from
  the same reset is the backend's trajectory, bitwise.

Host calls are counted by wrapping `host._Stepper._step` (the real step still runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import host, scenarios, specs
from tests.envs import inject
from tests.envs.conftest import N, stepper


@pytest.fixture
def host_calls(monkeypatch) -> list[int]:
  """The number of members of each call of `host._STEPPER._step` while the test runs."""
  calls = []
  real = host._Stepper._step

  def counted(self, handles, *args):
    calls.append(int(np.size(handles)))
    return real(self, handles, *args)

  monkeypatch.setattr(host._Stepper, "_step", counted)
  return calls


def _assert_bitwise(ours, theirs):
  """Every leaf of two pytrees has the same shape, dtype and bits."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(ours)[0])
  for path, a, b in zip(paths, leaves, jax.tree.leaves(theirs), strict=True):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(
      a.view(np.uint8), b.view(np.uint8), err_msg=jax.tree_util.keystr(path)
    )


def _actions(key, steps: int, d_a: int):
  return jax.random.uniform(jax.random.PRNGKey(key), (steps, N, d_a), minval=-1.0, maxval=1.0)


def _walker_states(steps: int = 5):
  """Two batches of walker scenarios on the `mujoco` backend, `steps` control steps in (the
  second with another observation function and 5-step episodes: its next step restarts)."""
  s = stepper("walker", "mujoco")
  a = s.params(seed=1)
  b = s.params(seed=2, obs_fn="add_gaussian", episode_length=5, stream_offset=N)
  out = []
  for k, p in enumerate((a, b)):
    state = s.reset(p, jax.random.PRNGKey(k))
    for act in _actions(10 + k, steps, 6):
      state = s.step(p, state, act)
    out.append((p, state))
  return s, out


def test_vmap_is_each_batch_stepped_alone_in_one_host_call(host_calls):
  s, batches = _walker_states()
  actions = [_actions(20 + k, 1, 6)[0] for k in range(2)]
  alone = [s.step(p, state, a) for (p, state), a in zip(batches, actions)]
  jax.block_until_ready(alone)
  host_calls.clear()
  stack = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  (pa, sa), (pb, sb) = batches
  both = jax.jit(jax.vmap(s.env.step))(stack(pa, pb), stack(sa, sb), stack(*actions))
  jax.block_until_ready(both)
  assert host_calls == [2 * N]  # one call with the 2 × N members, not one per batch
  for j in range(2):
    _assert_bitwise(jax.tree.map(lambda x, j=j: x[j], both), alone[j])


def test_scan_is_the_step_by_step_loop(host_calls):
  s, [(p, state), _] = _walker_states()
  p = p.replace(episode_length=jnp.asarray(6, jnp.int32))  # the 6 steps cross a reset
  actions = _actions(30, 6, 6)
  loop = state
  for a in actions:
    loop = s.step(p, loop, a)
  jax.block_until_ready(loop)
  host_calls.clear()
  env = s.env
  scan = jax.jit(lambda p, st, a: jax.lax.scan(lambda c, x: (env.step(p, c, x), None), st, a)[0])
  scanned = jax.block_until_ready(scan(p, state, actions))
  assert host_calls == [N] * 6  # one host call per control step
  np.testing.assert_array_equal(np.asarray(loop.t), 4)  # last at step 1, restarted at step 2
  _assert_bitwise(scanned, loop)


def test_cond_calls_the_host_in_the_taken_branch_only(host_calls):
  s, [(p, state), _] = _walker_states()
  action = _actions(40, 1, 6)[0]
  expected = jax.block_until_ready(s.step(p, state, action))
  env = s.env
  maybe = jax.jit(lambda p, st, a, go: jax.lax.cond(go, lambda: env.step(p, st, a), lambda: st))
  host_calls.clear()
  taken = jax.block_until_ready(maybe(p, state, action, True))
  assert host_calls == [N]
  skipped = jax.block_until_ready(maybe(p, state, action, False))
  assert host_calls == [N]
  _assert_bitwise(taken, expected)
  _assert_bitwise(skipped, state)


@pytest.mark.parametrize("domain", specs.DOMAIN_NAMES)
def test_a_host_round_trip_of_the_state_resumes_bitwise(domain):
  """2k control steps equal k, the state pytree through numpy (as a checkpoint stores it), then
  k more: every leaf bitwise, across an episode reset (cheetah's settling steps, the hopper's
  sensor pass). The stepper's compiled step serves both runs (`lax.scan` is the loop, above)."""
  s = stepper(domain, "mujoco")
  p = s.params(obs_fn="add_gaussian", episode_length=5)
  start = s.reset(p, jax.random.PRNGKey(3))
  k = 4  # the split falls mid-episode; the episode ends at step 5 and restarts at step 6
  actions = _actions(50, 2 * k, s.env.domain.act_dim)
  whole = start
  for a in actions:
    whole = s.step(p, whole, a)
  split = start
  for h, a in enumerate(actions):
    if h == k:
      np.testing.assert_array_equal(np.asarray(split.t), k)
      split = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), split)
    split = s.step(p, split, a)
  np.testing.assert_array_equal(np.asarray(whole.t), 2)
  _assert_bitwise(split, whole)


def _cold(params, data: host.HostData) -> host.HostData:
  """`data` with every member's solver warm start (qacc_warmstart) zeroed."""
  exact = inject.exact_f64(data)
  for i in range(len(exact)):
    m = host.model(int(params.model[i]))
    d = inject.mjdata(m, exact[i])
    d.qacc_warmstart[:] = 0.0
    exact[i] = inject.state_of(m, d)
  return data.replace(exact=jnp.asarray(inject.to_bits(exact)))


def test_the_warm_start_is_carried():
  """The exact state holds the solver's warm start, and the next steps continue from it.

  With it zeroed, the members whose constraints (contacts, joint limits) the solver iterates on
  continue differently (measured: 12 of 20, by 1e-13 to 7e-11, as Newton's iterations stop at
  other points); members without constraints (nefc = 0: in the air) do not use it and continue
  bitwise as before."""
  s = stepper("walker", "mujoco")
  p = s.params(seed=4)
  state = s.reset(p, jax.random.PRNGKey(4))
  for a in _actions(60, 20, 6):
    state = s.step(p, state, a)
  cold = state.replace(data=_cold(p, state.data))
  exact = inject.exact_f64(state.data)
  assert np.all(np.any(exact != inject.exact_f64(cold.data), axis=1))
  nefc = []
  for i in range(N):
    m = host.model(int(p.model[i]))
    d = inject.mjdata(m, exact[i])
    mujoco.mj_forward(m, d)
    nefc.append(d.nefc)
  for a in _actions(61, 5, 6):
    state, cold = s.step(p, state, a), s.step(p, cold, a)
  differ = np.any(inject.exact_f64(state.data) != inject.exact_f64(cold.data), axis=1)
  free = np.asarray(nefc) == 0
  assert differ.sum() >= N // 2 and free.sum() >= 2, (differ, nefc)
  assert not differ[free].any(), (differ, nefc)


@pytest.mark.parametrize("domain", ["hopper", "walker"])
def test_mujoco_c_stepped_by_hand_is_the_backend(domain):
  """From the same reset (the reset pose, zero velocity; the hopper also takes the suite's
  forward pass for its touch sensors), `mj_step` n_substeps times per control step with the warm
  start carried in its `MjData` gives the backend's exact states bitwise for 10 control steps,
  on setting (d)'s morphologies."""
  s = stepper(domain, "mujoco")
  spec = s.env.domain
  members = scenarios.get_distribution("d", "eval").sample(np.random.default_rng(5), domain, N)
  p = s.params(members)
  state = s.reset(p, jax.random.PRNGKey(5))
  cs = []
  for i, sc in enumerate(members):  # the models built from the scenarios, not the handles
    m = env_lib._model(domain, sc.alpha_len, sc.alpha_size, s.env.mass_rule, s.env.solver)
    d = mujoco.MjData(m)
    d.qpos[:] = np.asarray(state.data.qpos[i], np.float64)  # the float32 reset pose
    if domain == "hopper":
      mujoco.mj_forward(m, d)
    cs.append((m, d))
  for a in np.asarray(_actions(70, 10, spec.act_dim)):
    state = s.step(p, state, jnp.asarray(a))
    exact = inject.exact_f64(state.data)
    for i, (m, d) in enumerate(cs):
      d.ctrl[:] = a[i]
      mujoco.mj_step(m, d, nstep=spec.n_substeps)
      ours = inject.mjdata(m, exact[i])
      np.testing.assert_array_equal(ours.qpos.view(np.uint64), d.qpos.view(np.uint64))
      np.testing.assert_array_equal(ours.qvel.view(np.uint64), d.qvel.view(np.uint64))
      np.testing.assert_array_equal(exact[i].view(np.uint64), inject.state_of(m, d).view(np.uint64))


def test_the_thread_count_does_not_change_a_bit():
  """MuJoCo's batched loop on 1 or 3 threads (members split across them differently) steps the
  same members, some restarting, to the same exact states and readout, bitwise, over 5 calls."""
  _, [(p, state), (p_restart, state_restart)] = _walker_states()
  handles = np.concatenate([np.asarray(p.model), np.asarray(p_restart.model)])
  exact = np.concatenate([np.asarray(state.data.exact), np.asarray(state_restart.data.exact)])
  n = len(handles)
  restart = np.arange(n) % 3 == 0
  rng = np.random.default_rng(0)
  m = host.model(handles[0])
  qpos_start = rng.uniform(-0.1, 0.1, (n, m.nq)).astype(np.float32)
  n_phys = np.where(restart, 0, 10).astype(np.int32)
  probe = np.zeros(n, bool)
  outs = {}
  for threads in (1, 3):
    stepper_ = host._Stepper(threads)
    x, seq = exact, []
    for k in range(5):
      ctrl = np.random.default_rng(k).uniform(-1, 1, (n, m.nu)).astype(np.float32)
      out = stepper_._step(handles, x, restart & (k == 0), qpos_start, ctrl, n_phys, probe)
      x = out[0]
      seq.append(out)
    outs[threads] = seq
  _assert_bitwise(outs[1], outs[3])
  assert not np.array_equal(outs[1][0][0], outs[1][4][0])  # the states moved
