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

Stepping is MuJoCo's own batched loop, `mujoco.batch.Batch` (C threads, `THREADS` of them
including the calling one, each `MjData` serving many simulations): every call loads the
members' exact states into the batch's state rows, runs `mj_step` (and the stages the readout
needs) per member in C, and saves the rows back; a member's result is the same bits at any
thread count, and those of an `mj_step` loop over one `MjData` per member (tested). It replaced
a Python `mj_step` loop, whose per-member Python work (about 10 µs) cost more than a cheetah's
physics step; `mujoco.rollout` was measured and rejected: it returns no final warm start
(`qacc_warmstart`), so a control step could not continue exactly. Each callback array costs
about 20 µs on XLA's CPU, so the callback takes and returns one packed array.
`benchmarks/envs.py` measures the callback path against raw `mujoco.rollout`.
"""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import mujoco
import mujoco.batch
import numpy as np
from flax import struct

STATE_SPEC = int(mujoco.mjtState.mjSTATE_FULLPHYSICS | mujoco.mjtState.mjSTATE_WARMSTART)
# Warnings of an unstable simulation (MuJoCo then resets it): consecutive in mjtWarning.
_UNSTABLE = slice(int(mujoco.mjtWarning.mjWARN_BADQPOS), int(mujoco.mjtWarning.mjWARN_BADQACC) + 1)
assert _UNSTABLE.stop - _UNSTABLE.start == 3  # BADQPOS, BADQVEL, BADQACC
THREADS = os.cpu_count() or 1  # threads stepping a batch, the calling one included (see _Stepper)

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


def _columns(m: mujoco.MjModel) -> dict[int, np.ndarray]:
  """The columns of each `mjtState` component in an `mjSTATE_INTEGRATION` row of `m`'s size."""
  cols, start = {}, 0
  for bit in range(int(mujoco.mjtState.mjNSTATE)):
    size = mujoco.mj_stateSize(m, 1 << bit)
    cols[1 << bit] = np.arange(start, start + size)
    start += size
  assert start == mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_INTEGRATION)
  return cols


class _Sims:
  """A `mujoco.batch.Batch` of `n` simulations of one domain size, with its bound readout.

  Its state rows (`mjSTATE_INTEGRATION`) are loaded from and saved to the env state at every
  call; the models are the call's members' (`set_models`, redone only when they change)."""

  READOUT = ("sensordata", "xpos", "xipos", "xmat", "subtree_linvel")

  def __init__(self, m: mujoco.MjModel, n: int, threads: int):
    self.batch = b = mujoco.batch.Batch(m, n, nthread=threads)
    self.rows = b.state  # [n, nstate] float64, live
    self.handles: tuple | None = None
    self.readout = [b.bind(name) for name in self.READOUT]  # refreshed after every call
    cols = _columns(m)
    S = mujoco.mjtState
    self.exact = np.concatenate([c for bit, c in cols.items() if bit & STATE_SPEC])
    self.qpos, self.qvel, self.ctrl = (cols[int(x)] for x in (S.mjSTATE_QPOS, S.mjSTATE_QVEL,
                                                               S.mjSTATE_CTRL))  # fmt: skip
    self.time = int(cols[int(S.mjSTATE_TIME)][0])

  def use(self, handles: list[int]) -> None:
    key = tuple(handles)
    if key != self.handles:
      self.batch.set_models([model(h) for h in handles])
      self.handles = key


class _Stepper:
  """Host side of one step: MuJoCo's own batched `mj_step` loop (`mujoco.batch.Batch`, C threads,
  `threads` of them including the caller's), under a lock (XLA may call from any thread; a
  `Batch` serves one caller at a time). Results are the same bits at any thread count.

  One `Batch` per (domain size, member count) lives here for the process: its simulations'
  `MjData` are shared by its threads, and every call loads the members' exact state into its
  rows and saves it back, so the env state stays the only state."""

  def __init__(self, threads: int = THREADS):
    self._lock = threading.Lock()
    self._threads = threads
    self._sims: dict[tuple, _Sims] = {}

  def _get(self, handles: list[int]) -> _Sims:
    m = model(handles[0])
    key = (len(handles), m.nbuffer, m.narena, m.nq, m.nv, m.nbody, m.ngeom, m.nsensordata, m.nu)
    sims = self._sims.get(key)
    if sims is None:
      sims = self._sims[key] = _Sims(m, len(handles), self._threads)
    sims.use(handles)
    return sims

  def __call__(self, packed):
    """The callback: unpacks `step`'s one uint32 input (columns: handle, restart, n_phys, probe,
    qpos_start, ctrl, exact), steps, and packs the outputs into one (`HostData`'s order)."""
    x = np.asarray(packed)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    m0 = model(int(x[0, 0]))
    nq, nu = m0.nq, m0.nu
    f32 = lambda a: np.ascontiguousarray(a).view(np.float32)
    args = (
      x[:, 0].astype(np.int32),
      np.ascontiguousarray(x[:, 4 + nq + nu :]).reshape(len(x), -1, 2),
      x[:, 1].astype(bool),
      f32(x[:, 4 : 4 + nq]),
      f32(x[:, 4 + nq : 4 + nq + nu]),
      x[:, 2].astype(np.int32),
      x[:, 3].astype(bool),
    )
    with self._lock:
      out = self._step(*args)
    flat = [out[0].reshape(len(x), -1)] + [o.reshape(len(x), -1).view(np.uint32) for o in out[1:]]
    return np.concatenate(flat, axis=1).reshape(*lead, -1)

  def _step(self, handles, exact, restart, qpos_start, ctrl, n_phys, probe):
    """One control step of the members (arrays with the same leading axes; see `step`).

    Returns the new exact state bits and the float32 readout, in `HostData`'s field order."""
    lead = handles.shape
    count = int(np.prod(lead))
    flat = lambda x: np.asarray(x).reshape(count, *np.shape(x)[len(lead) :])
    exact, qpos_start, ctrl, restart, n_phys, probe = map(
      flat, (exact, qpos_start, ctrl, restart, n_phys, probe)
    )
    sims = self._get(flat(handles).tolist())
    b, rows = sims.batch, sims.rows
    rows[:, sims.exact] = np.ascontiguousarray(exact).view(np.float64).reshape(count, -1)
    restarting = np.flatnonzero(restart).astype(np.int32)
    if restarting.size:  # the suite's reset: qpos from the reset distribution, everything else 0
      b.reset(restarting, stage=mujoco.mjtStage.mjSTAGE_NONE)
      rows[restarting[:, None], sims.qpos] = qpos_start[restarting]
    rows[:, sims.ctrl] = ctrl
    b.warning[:, _UNSTABLE, 1] = 0
    # Members with the same (physics steps, sensor pass) step together: position/velocity
    # quantities at the new state (dm_control's step ends with mj_step1), and where `probe`, the
    # acceleration-stage sensors (touch) at the new state, without moving it (mj_forward).
    group = n_phys.astype(np.int64) * 2 + probe
    for g in np.unique(group):
      ids = None if g == group[0] and (group == g).all() else np.flatnonzero(group == g)
      n, sense = divmod(int(g), 2)
      stage = mujoco.mjtStage.mjSTAGE_ACC if sense else mujoco.mjtStage.mjSTAGE_VEL
      if n:
        b.step(ids, n, stage)
      else:
        b.forward(ids, stage)
    rows[restarting, sims.time] = 0.0
    unstable = b.warning[:, _UNSTABLE, 1].any(axis=1)
    bits = np.ascontiguousarray(rows[:, sims.exact]).view(np.uint32).reshape(count, -1, 2)
    qpos = rows[:, sims.qpos].astype(np.float32)
    qpos[unstable] = np.nan
    qvel = rows[:, sims.qvel].astype(np.float32)
    sens64, xpos, xipos, xmat, sublin = sims.readout
    sens = np.zeros((count, max(sens64.shape[1], 1)), np.float32)
    sens[:, : sens64.shape[1]] = sens64
    bodies = (xpos, xipos, xmat.reshape(count, -1, 9), sublin)
    result = (bits, qpos, qvel, sens, *(x.astype(np.float32) for x in bodies))
    result += (rows[:, sims.time].astype(np.float32),)
    return tuple(x.reshape(*lead, *x.shape[1:]) for x in result)


_STEPPER = _Stepper()


def step(handles, data: HostData, restart, qpos_start, ctrl, n_phys, probe) -> HostData:
  """One control step of every member on the host (jittable, vmappable).

  Members where `restart` is set start from the suite's reset (`qpos_start`, zero velocity,
  time 0 after the settling steps); the others continue from `data.exact`. Each member takes
  `n_phys` physics steps under `ctrl`, then, where `probe`, a forward pass for the
  acceleration-stage sensors. Arguments as `Env._advance`'s, with `handles` [N] int32.

  The callback takes and returns one uint32 array (bit casts, no conversion): each callback
  array costs about 20 µs on XLA's CPU, so 7 inputs and 9 outputs cost 200 µs a control step.
  """
  u32 = lambda x, dt: jax.lax.bitcast_convert_type(x.astype(dt), jnp.uint32)
  n = handles.shape[0]
  packed = jnp.concatenate(
    [
      jnp.stack([u32(handles, jnp.int32), restart.astype(jnp.uint32), u32(n_phys, jnp.int32),
                 probe.astype(jnp.uint32)], axis=1),
      u32(qpos_start, jnp.float32),
      u32(ctrl, jnp.float32),
      data.exact.reshape(n, -1),
    ],
    axis=1,
  )  # fmt: skip
  fields = (
    data.qpos, data.qvel, data.sensordata, data.xpos, data.xipos, data.xmat,
    data.subtree_linvel, data.time,
  )  # fmt: skip
  sizes = [int(np.prod(data.exact.shape[1:]))] + [int(np.prod(x.shape[1:])) for x in fields]
  out = jax.pure_callback(
    _STEPPER,
    jax.ShapeDtypeStruct((n, sum(sizes)), jnp.uint32),
    packed,
    vmap_method="broadcast_all",
  )
  parts = jnp.split(out, np.cumsum(sizes)[:-1], axis=1)
  exact = parts[0].reshape(data.exact.shape)
  readout = (
    jax.lax.bitcast_convert_type(p, jnp.float32).reshape(x.shape) for p, x in zip(parts[1:], fields)
  )
  return HostData(exact, *readout)
