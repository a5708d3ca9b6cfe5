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

Stepping is an `mj_step` loop over the members on the calling thread and one helper thread
(`THREADS`; MuJoCo's functions release the GIL), each with its own long-lived `MjData`; members
are claimed one at a time, so a helper the OS does not schedule costs nothing. A member's result
is the same bits whichever thread steps it. `mujoco.rollout` was measured and rejected: it
returns no final warm start (`qacc_warmstart`), so a control step could not continue exactly,
and it stops a member at any warning. Python work per member (about 10 µs: setting and reading
the state, the readout copies) is the cost besides the physics, and each callback array costs
about 20 µs on XLA's CPU, so the callback takes and returns one packed array.
`benchmarks/envs.py` measures the callback path against raw `mujoco.rollout`.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct

STATE_SPEC = int(mujoco.mjtState.mjSTATE_FULLPHYSICS | mujoco.mjtState.mjSTATE_WARMSTART)
# Warnings of an unstable simulation (MuJoCo then resets it): consecutive in mjtWarning.
_UNSTABLE = slice(int(mujoco.mjtWarning.mjWARN_BADQPOS), int(mujoco.mjtWarning.mjWARN_BADQACC) + 1)
assert _UNSTABLE.stop - _UNSTABLE.start == 3  # BADQPOS, BADQVEL, BADQACC
THREADS = min(2, os.cpu_count() or 1)  # threads stepping a batch (see _Stepper)

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


class _Slot:
  """One long-lived `MjData` with its field views made once (attribute access costs µs)."""

  def __init__(self, m: mujoco.MjModel):
    self.d = d = mujoco.MjData(m)
    self.qpos, self.qvel, self.ctrl, self.sensordata = d.qpos, d.qvel, d.ctrl, d.sensordata
    self.xpos, self.xipos, self.xmat = d.xpos, d.xipos, d.xmat
    self.subtree_linvel = d.subtree_linvel
    self.warnings = d.warning.number


class _Job:
  """One call's members, claimed one at a time by whichever thread is free: a helper that the
  OS does not schedule leaves its share to the calling thread instead of holding the call up."""

  def __init__(self, count: int, args: tuple):
    self.count, self.args = count, args
    self.claims = itertools.count()  # next() is atomic under the GIL
    self.busy = 0  # helpers inside `help`, counted before they claim a member
    self.error: BaseException | None = None
    self.cond = threading.Condition(threading.Lock())

  def help(self, member, k: int):
    """Helper thread `k`'s share: `member(k, i, *args)` until no member is left unclaimed."""
    with self.cond:
      self.busy += 1
    try:
      while self.error is None and (i := next(self.claims)) < self.count:
        member(k, i, *self.args)
    except BaseException as e:  # raised by the calling thread
      self.error = e
    finally:
      with self.cond:
        self.busy -= 1
        self.cond.notify_all()

  def run(self, member):
    """The calling thread's share (thread 0), then waits for the helpers stepping a member."""
    try:
      while self.error is None and (i := next(self.claims)) < self.count:
        member(0, i, *self.args)
    except BaseException as e:
      self.error = e
    with self.cond:
      while self.busy:
        self.cond.wait()
    if self.error is not None:
      raise self.error


class _Stepper:
  """Host side of one step: an `mj_step` loop over the members, on the calling thread and
  `threads - 1` helper threads (MuJoCo's functions release the GIL), under a lock (XLA may call
  from any thread). A member's result does not depend on the thread or `MjData` that steps it.

  Each thread reuses one `MjData` per domain size for every member it steps (all morphologies
  of a domain have the same sizes). The `MjData` live in this long-lived object: kept in a
  `threading.local`, they were freed when XLA's callback thread state was released, which
  crashed the process."""

  def __init__(self, threads: int = THREADS):
    self._lock = threading.Lock()
    self._threads = threads
    self._slots: list[dict[tuple, _Slot]] = [{} for _ in range(threads)]  # by domain size
    self._by_handle: list[dict[int, _Slot]] = [{} for _ in range(threads)]
    self._jobs: list[queue.SimpleQueue] = []  # one per helper, started at the first batch

  def _slot(self, k: int, handle: int) -> _Slot:
    """Thread `k`'s `MjData` for the model `handle`."""
    slot = self._by_handle[k].get(handle)
    if slot is None:
      m = model(handle)
      key = (m.nbuffer, m.narena, m.nq, m.nv, m.nbody, m.ngeom, m.nsensordata, m.nu, m.na)
      slots = self._slots[k]
      if key not in slots:
        slots[key] = _Slot(m)
      slot = self._by_handle[k][handle] = slots[key]
    return slot

  def _help(self, k: int):
    """Helper thread `k`: its share of every job."""
    jobs = self._jobs[k - 1]
    while True:
      jobs.get().help(self._member, k)

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

  def _member(self, k, i, handles, state64, restart, qpos_start, ctrl, n_phys, probe, out):
    """Steps member `i` on thread `k`'s `MjData`, writing row `i` of each (float64) `out`."""
    m = _models[handles[i]]
    slot = self._slot(k, handles[i])
    d = slot.d
    if restart[i]:  # the suite's reset: qpos from the reset distribution, everything else 0
      mujoco.mj_resetData(m, d)
      slot.qpos[:] = qpos_start[i]
    else:
      mujoco.mj_setState(m, d, state64[i], STATE_SPEC)
    slot.ctrl[:] = ctrl[i]
    slot.warnings[_UNSTABLE] = 0
    if n_phys[i]:
      mujoco.mj_step(m, d, n_phys[i])
    if probe[i]:  # acceleration-stage sensors (touch) at the new state, without moving it
      mujoco.mj_forward(m, d)
    if restart[i]:
      d.time = 0.0
    # Position/velocity quantities at the new state (dm_control's step ends with mj_step1).
    mujoco.mj_kinematics(m, d)
    mujoco.mj_comPos(m, d)
    mujoco.mj_comVel(m, d)
    mujoco.mj_subtreeVel(m, d)
    exact, qpos, qvel, sens, xpos, xipos, xmat, sublin, time, warnings = out
    mujoco.mj_getState(m, d, exact[i], STATE_SPEC)
    warnings[i] = slot.warnings[_UNSTABLE]
    qpos[i] = slot.qpos
    qvel[i] = slot.qvel
    sens[i] = slot.sensordata
    xpos[i] = slot.xpos
    xipos[i] = slot.xipos
    xmat[i] = slot.xmat
    sublin[i] = slot.subtree_linvel
    time[i] = d.time

  def _step(self, handles, exact, restart, qpos_start, ctrl, n_phys, probe):
    """One control step of the members (arrays with the same leading axes; see `step`).

    Returns the new exact state bits and the float32 readout, in `HostData`'s field order."""
    lead = handles.shape
    count = int(np.prod(lead))
    flat = lambda x: np.asarray(x).reshape(count, *np.shape(x)[len(lead) :])
    exact, qpos_start, ctrl = map(flat, (exact, qpos_start, ctrl))
    handles, restart, n_phys, probe = (flat(x).tolist() for x in (handles, restart, n_phys, probe))
    m0 = model(handles[0])
    nb = m0.nbody
    f64 = lambda *shape: np.empty((count, *shape), np.float64)
    out = (
      np.empty((count, exact.shape[1] * 2), np.uint32).view(np.float64),
      f64(m0.nq), f64(m0.nv), f64(m0.nsensordata), f64(nb, 3), f64(nb, 3), f64(nb, 9), f64(nb, 3),
      f64(), np.empty((count, 3), np.int32),
    )  # fmt: skip
    state64 = np.ascontiguousarray(exact).view(np.float64).reshape(count, -1)
    job = _Job(count, (handles, state64, restart, qpos_start, ctrl, n_phys, probe, out))
    if count > 1 and self._threads > 1 and not self._jobs:
      self._jobs = [queue.SimpleQueue() for _ in range(self._threads - 1)]
      for k in range(1, self._threads):
        threading.Thread(target=self._help, args=(k,), daemon=True, name=f"host-{k}").start()
    for jobs in self._jobs[: count - 1]:
      jobs.put(job)
    job.run(self._member)
    bits, qpos64, *readout, warnings = out
    qpos = qpos64.astype(np.float32)
    qpos[warnings.any(axis=1)] = np.nan
    qvel, sens64, xpos, xipos, xmat, sublin, time = (x.astype(np.float32) for x in readout)
    sens = np.zeros((count, max(m0.nsensordata, 1)), np.float32)
    sens[:, : m0.nsensordata] = sens64
    result = (bits.view(np.uint32).reshape(count, -1, 2), qpos, qvel, sens, xpos, xipos, xmat)
    result += (sublin, time)
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
