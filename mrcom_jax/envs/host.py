"""The `mujoco` backend's physics: MuJoCo C on the host, called from jitted programs.

PROTOCOL.md ("Simulation backends"): on a CPU host, batched MJX runs at 1–10% of MuJoCo C's speed
and each MJX program takes 30–100 s to compile. This module steps a batch of scenarios with
MuJoCo C through one `jax.pure_callback` per control step; everything else of the env (reset
distribution, episode boundaries, divergence rule, readout, rewards, observation functions) is
the shared code of `env.py`.

- **Models are data.** `register(model)` gives a compiled `MjModel` an int32 handle; a batch's
  `EnvParams.model` holds one handle per member, so a new batch of scenarios reuses the compiled
  program. Handles are per process (the env's model cache builds each scenario once).
- **The state is a JAX pytree.** `HostData.exact` holds MuJoCo's whole integration state
  (`mjSTATE_FULLPHYSICS | mjSTATE_WARMSTART`: time, qpos, qvel, act, the solver's warm start) as
  the bits of its float64 values, so a step continues exactly where the last one stopped, and a
  checkpointed state resumes bitwise. The float32 fields are the readout that `env.py` shares
  with MJX (`qpos`, `qvel`, `sensordata`, `xpos`, `xipos`, `xmat`, `subtree_linvel`, `time`).
- **Divergence.** MuJoCo C resets an unstable simulation itself (warnings BADQPOS, BADQVEL,
  BADQACC); the step reports such a member with NaN readout, which `env.py`'s one divergence rule
  turns into a `diverged`, `last` state, as on MJX.
- **vmap.** The callback uses `vmap_method="broadcast_all"`: under `vmap` (the runner's agents,
  the adaptation program's pairs) MuJoCo gets one call for the whole batch, whose leading axes
  are flattened into members; `sequential` would call it once per vmapped element.

Stepping is an `mj_step` loop over the members on the calling thread, which measured as fast as
`mujoco.rollout` on this 2-core CPU while carrying the warm start across control steps
(`benchmarks/envs.py` compares both; `rollout` returns no warm start).
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct

STATE_SPEC = int(mujoco.mjtState.mjSTATE_FULLPHYSICS | mujoco.mjtState.mjSTATE_WARMSTART)
_UNSTABLE = tuple(
  int(w)
  for w in (
    mujoco.mjtWarning.mjWARN_BADQPOS,
    mujoco.mjtWarning.mjWARN_BADQVEL,
    mujoco.mjtWarning.mjWARN_BADQACC,
  )
)

_lock = threading.Lock()
_models: list[mujoco.MjModel] = []
_handles: dict[int, int] = {}  # id(model) → handle


def register(model: mujoco.MjModel) -> int:
  """The int32 handle of a compiled model (registered once; the model stays alive)."""
  with _lock:
    handle = _handles.get(id(model))
    if handle is None:
      handle = len(_models)
      _models.append(model)
      _handles[id(model)] = handle
    return handle


def model(handle: int) -> mujoco.MjModel:
  return _models[int(handle)]


@struct.dataclass
class HostData:
  """A batch's MuJoCo C state (exact) and readout (float32), all with leading axis `N`."""

  exact: jax.Array  # [N, nstate, 2] uint32: the float64 STATE_SPEC values' bits
  qpos: jax.Array  # [N, nq]
  qvel: jax.Array  # [N, nv]
  sensordata: jax.Array  # [N, max(nsensordata, 1)] (a zero-size callback output crashes XLA)
  xpos: jax.Array  # [N, nbody, 3]
  xipos: jax.Array  # [N, nbody, 3]
  xmat: jax.Array  # [N, nbody, 9]
  subtree_linvel: jax.Array  # [N, nbody, 3]
  time: jax.Array  # [N]


def blank(template: mujoco.MjModel, n: int) -> HostData:
  """`n` members' zero state of `template`'s size (every member restarts at its first step)."""
  nstate = mujoco.mj_stateSize(template, STATE_SPEC)
  z = lambda *shape: jnp.zeros((n, *shape), jnp.float32)
  nb = template.nbody
  return HostData(
    exact=jnp.zeros((n, nstate, 2), jnp.uint32),
    qpos=z(template.nq),
    qvel=z(template.nv),
    sensordata=z(max(template.nsensordata, 1)),
    xpos=z(nb, 3),
    xipos=z(nb, 3),
    xmat=z(nb, 9),
    subtree_linvel=z(nb, 3),
    time=z(),
  )


class _Stepper:
  """Host side of one step: one `MjData` per domain size, reused for every member (all
  morphologies of a domain have the same sizes), under a lock (XLA may call from any thread).

  The `MjData` live in a module-level cache: kept in a `threading.local`, they were freed when
  XLA's callback thread state was released, which crashed the process."""

  def __init__(self):
    self._lock = threading.Lock()
    self._cache: dict[tuple, mujoco.MjData] = {}

  def _data(self, m: mujoco.MjModel) -> mujoco.MjData:
    key = (m.nbuffer, m.narena, m.nq, m.nv, m.nbody, m.ngeom, m.nsensordata, m.nu, m.na)
    d = self._cache.get(key)
    if d is None:
      d = self._cache[key] = mujoco.MjData(m)
    return d

  def __call__(self, *args):
    with self._lock:
      return self._step(*args)

  def _step(self, handles, exact, restart, qpos_start, ctrl, n_phys, probe):
    lead = handles.shape
    flat = lambda x: np.asarray(x).reshape(int(np.prod(lead)), *np.shape(x)[len(lead) :])
    handles, exact, restart, qpos_start, ctrl, n_phys, probe = map(
      flat, (handles, exact, restart, qpos_start, ctrl, n_phys, probe)
    )
    m0 = model(handles[0])
    d = self._data(m0)
    count = handles.shape[0]
    out_exact = np.empty((count, exact.shape[1] * 2), np.uint32).view(np.float64)
    qpos = np.empty((count, m0.nq), np.float32)
    qvel = np.empty((count, m0.nv), np.float32)
    sens = np.zeros((count, max(m0.nsensordata, 1)), np.float32)
    xpos = np.empty((count, m0.nbody, 3), np.float32)
    xipos = np.empty((count, m0.nbody, 3), np.float32)
    xmat = np.empty((count, m0.nbody, 9), np.float32)
    sublin = np.empty((count, m0.nbody, 3), np.float32)
    time = np.empty((count,), np.float32)
    state64 = np.ascontiguousarray(exact).view(np.float64).reshape(count, -1)
    for i in range(count):
      m = model(handles[i])
      if restart[i]:  # the suite's reset: qpos from the reset distribution, everything else 0
        mujoco.mj_resetData(m, d)
        d.qpos[:] = qpos_start[i]
      else:
        mujoco.mj_setState(m, d, state64[i], STATE_SPEC)
      d.ctrl[:] = ctrl[i]
      for w in _UNSTABLE:
        d.warning[w].number = 0
      for _ in range(int(n_phys[i])):
        mujoco.mj_step(m, d)
      if probe[i]:  # acceleration-stage sensors (touch) at the new state, without moving it
        mujoco.mj_forward(m, d)
      if restart[i]:
        d.time = 0.0
      # Position/velocity quantities at the new state (dm_control's step ends with mj_step1).
      mujoco.mj_kinematics(m, d)
      mujoco.mj_comPos(m, d)
      mujoco.mj_comVel(m, d)
      mujoco.mj_subtreeVel(m, d)
      mujoco.mj_getState(m, d, out_exact[i], STATE_SPEC)
      unstable = any(d.warning[w].number for w in _UNSTABLE)
      qpos[i] = np.nan if unstable else d.qpos
      qvel[i] = d.qvel
      sens[i, : m.nsensordata] = d.sensordata
      xpos[i], xipos[i] = d.xpos, d.xipos
      xmat[i] = d.xmat
      sublin[i] = d.subtree_linvel
      time[i] = d.time
    shape = lambda x: x.reshape(*lead, *x.shape[1:])
    bits = out_exact.view(np.uint32).reshape(count, -1, 2)
    return tuple(map(shape, (bits, qpos, qvel, sens, xpos, xipos, xmat, sublin, time)))


_STEPPER = _Stepper()


def step(handles, data: HostData, restart, qpos_start, ctrl, n_phys, probe) -> HostData:
  """One control step of every member on the host (jittable, vmappable).

  Members where `restart` is set start from the suite's reset (`qpos_start`, zero velocity,
  time 0 after the settling steps); the others continue from `data.exact`. Each member takes
  `n_phys` physics steps under `ctrl`, then, where `probe`, a forward pass for the
  acceleration-stage sensors. Arguments as `Env._advance`'s, with `handles` [N] int32.
  """
  shapes = (
    jax.ShapeDtypeStruct(data.exact.shape, jnp.uint32),
    *(
      jax.ShapeDtypeStruct(x.shape, jnp.float32)
      for x in (
        data.qpos,
        data.qvel,
        data.sensordata,
        data.xpos,
        data.xipos,
        data.xmat,
        data.subtree_linvel,
        data.time,
      )
    ),
  )
  out = jax.pure_callback(
    _STEPPER,
    shapes,
    handles,
    data.exact,
    restart,
    qpos_start.astype(jnp.float32),
    ctrl.astype(jnp.float32),
    n_phys,
    probe,
    vmap_method="broadcast_all",
  )
  return HostData(*out)
