"""Backend-neutral state access for tests: a NaN in one member's joint velocity, a member put at
a reference simulator's physics state, and the `mujoco` backend's exact state read back.

On the `mujoco` backend the exact float64 state (`host.HostData.exact`) is what the next step
continues from, so whatever a test injects goes into its bits; the float32 fields are readout.
"""

from __future__ import annotations

import jax.numpy as jnp
import mujoco
import numpy as np

from mrcom_jax.envs import host


def nan_qvel(data, member: int, dof: int = 3):
  """`data` (mjx.Data or host.HostData, leading axis N) with qvel[member, dof] = NaN.

  On the `mujoco` backend the NaN goes into the exact state's bits (layout: time, qpos, qvel, ...;
  mujoco.mjtState order)."""
  if isinstance(data, host.HostData):
    exact = np.array(data.exact)
    at = 1 + data.qpos.shape[-1] + dof
    exact[member, at] = np.array([np.nan], np.float64).view(np.uint32)
    qvel = jnp.asarray(data.qvel).at[member, dof].set(jnp.nan)
    return data.replace(exact=jnp.asarray(exact), qvel=qvel)
  return data.replace(qvel=jnp.asarray(data.qvel).at[member, dof].set(jnp.nan))


def exact_f64(data: host.HostData) -> np.ndarray:
  """[N, nstate] float64: the `mujoco` backend's exact states as MuJoCo's state vectors."""
  bits = np.array(data.exact)  # a writable copy
  return bits.view(np.float64).reshape(bits.shape[0], -1)


def to_bits(state64: np.ndarray) -> np.ndarray:
  """[..., nstate] float64 state vectors → [..., nstate, 2] uint32 (`HostData.exact`'s form)."""
  state64 = np.ascontiguousarray(state64, np.float64)
  return state64.view(np.uint32).reshape(*state64.shape, 2)


def mjdata(m: mujoco.MjModel, state64: np.ndarray) -> mujoco.MjData:
  """A fresh `MjData` of `m` at one exact state vector (what the backend continues from)."""
  d = mujoco.MjData(m)
  mujoco.mj_setState(m, d, state64, host.STATE_SPEC)
  return d


def state_of(m: mujoco.MjModel, d: mujoco.MjData) -> np.ndarray:
  """[nstate] float64: `d`'s exact state vector in the backend's layout."""
  out = np.empty(mujoco.mj_stateSize(m, host.STATE_SPEC))
  mujoco.mj_getState(m, d, out, host.STATE_SPEC)
  return out


def with_members(params, state, rows: dict, t: int):
  """`state` with members `i ∈ rows` at the physics state `rows[i] = (qpos, qvel, warmstart)`,
  `t` control steps into an episode that is not over, on either backend.

  MJX takes the float64 values as float32; the `mujoco` backend takes them exactly (time 0)."""
  idx = np.asarray(list(rows), np.int32)
  qpos, qvel, warm = (np.stack([r[j] for r in rows.values()]) for j in range(3))
  d = state.data
  if isinstance(d, host.HostData):
    exact = np.array(d.exact)
    for i, (qp, qv, w) in rows.items():
      m = host.model(int(params.model[i]))
      md = mujoco.MjData(m)
      md.qpos[:], md.qvel[:], md.qacc_warmstart[:] = qp, qv, w
      exact[i] = to_bits(state_of(m, md))
    d = d.replace(exact=jnp.asarray(exact))
  else:
    d = d.replace(qacc_warmstart=d.qacc_warmstart.at[idx].set(warm))
  d = d.replace(qpos=d.qpos.at[idx].set(qpos), qvel=d.qvel.at[idx].set(qvel))
  return state.replace(data=d, t=state.t.at[idx].set(t), last=state.last.at[idx].set(False))
