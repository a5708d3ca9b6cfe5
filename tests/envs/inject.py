"""Backend-neutral fault injection for tests: a NaN in one member's joint velocity."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mrcom_jax.envs import host


def nan_qvel(data, member: int, dof: int = 3):
  """`data` (mjx.Data or host.HostData, leading axis N) with qvel[member, dof] = NaN.

  On the `mujoco` backend the exact float64 state is what the next step continues from, so the
  NaN goes into its bits (layout: time, qpos, qvel, ...; mujoco.mjtState order)."""
  if isinstance(data, host.HostData):
    exact = np.array(data.exact)
    at = 1 + data.qpos.shape[-1] + dof
    exact[member, at] = np.array([np.nan], np.float64).view(np.uint32)
    return data.replace(exact=jnp.asarray(exact), qvel=data.qvel.at[member, dof].set(jnp.nan))
  return data.replace(qvel=data.qvel.at[member, dof].set(jnp.nan))
