"""Batched environments: one domain, `N` scenarios stepped as one pure, jittable function.

Two backends behind one API (PROTOCOL.md, "Simulation backends"): `mjx` steps the batch with MuJoCo
MJX inside the program (accelerators), `mujoco` with MuJoCo C on the host through one
`jax.pure_callback` per control step (`envs/host.py`; CPU hosts). `auto` picks `mjx` when the
default JAX device is a GPU or TPU and `mujoco` otherwise (`resolve_backend`). Only the physics
step differs: the reset distribution, episode boundaries, divergence rule, readout, rewards and
observation functions below are shared.

`env = make_env('walker')`, then per batch of scenarios `params = env.make_params(scenarios)`
(host side: builds and stacks the models) and, jitted, `state = env.reset(params, key)` and
`state = env.step(params, state, action)`. Scenarios are data: a new batch of the same size and
domain reuses the compiled program.

Time indexing (METHOD.md): a state carries the observation `o_t` with the reward `r_t` of that
state (0 and `first=True` at an episode start). After `episode_length` (1000) control steps the
state is `last`; the next `step` ignores its action and returns the next episode's first state
(as `dm_env` does), so an episode yields 1001 observations. A simulation that diverges (NaN or
Inf) resets that environment alone: that step returns its previous finite state marked `last`
and `diverged` (reward 0), and its next step starts a new episode; nothing NaN leaves the env.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct
from mujoco import mjx

from mrcom_jax.envs import batching, host, morphology, obs_functions, rewards, specs
from mrcom_jax.envs.scenarios import Scenario

CHEETAH_SETTLE_STEPS = 200  # the suite lets the cheetah settle for 200 physics steps at reset
BACKENDS = ("auto", "mjx", "mujoco")


def resolve_backend(backend: str = "auto") -> str:
  """`mjx` or `mujoco` for a requested `env.backend` (`auto`: `mjx` on a GPU or TPU)."""
  if backend not in BACKENDS:
    raise ValueError(f"env.backend={backend!r} is not one of {list(BACKENDS)}")
  if backend == "auto":
    return "mujoco" if jax.default_backend() == "cpu" else "mjx"
  return backend


@struct.dataclass
class EnvParams:
  """Per-scenario data of a batch (all leading axes `N`)."""

  model: mjx.Model | jax.Array  # mjx: stacked on batching.BATCHED_FIELDS; mujoco: [N] handles
  xi: jax.Array  # [N, 6] scenario descriptor
  v_target: jax.Array  # [N] β · v_max
  obs_fn: jax.Array  # [N] int32 observation function id
  reward_mode: jax.Array  # [N] int32: 0 target speed, 1 the suite's run/hop
  stream: jax.Array  # [N] int32 global slot ids (observation-function key)
  seed_key: jax.Array  # [2] uint32 experiment-seed key (observation functions)
  episode_length: jax.Array  # [] int32 control steps per episode (data: tests shorten it)


@struct.dataclass
class EnvState:
  """The batch's state after a reset or a step (all leading axes `N`)."""

  data: mjx.Data | host.HostData  # the backend's physics state
  obs: jax.Array  # [N, OBS_PAD] after the observation function, zero-padded
  obs_clean: jax.Array  # [N, d_o] the suite's observation
  reward: jax.Array  # [N] reward of this state (0 at first)
  first: jax.Array  # [N] bool, episode start
  last: jax.Array  # [N] bool, the episode's final (1000th-step) state
  diverged: jax.Array  # [N] bool, this state replaced a diverged simulation
  xi: jax.Array  # [N, 6] scenario descriptor ξ carried with every transition
  t: jax.Array  # [N] int32 control steps since the episode start
  stream_step: jax.Array  # [N] int32 states produced by this slot (observation-function key)
  key: jax.Array  # [N, 2] per-slot reset keys
  speed: jax.Array  # [N] forward speed v_x (torso subtreelinvel x)
  height: jax.Array  # [N] domain height (hopper: torso over foot; walker: torso z)
  upright: jax.Array  # [N] torso zz (walker); 1 elsewhere


def _where_rows(mask, a, b):
  """Per-member select over pytrees: `a` where `mask` [N] is set, else `b`."""
  return jax.tree.map(
    lambda x, y: jnp.where(mask.reshape((mask.shape[0],) + (1,) * (x.ndim - 1)), x, y), a, b
  )


@functools.lru_cache(maxsize=4096)
def _model(domain, alpha_len, alpha_size, mass_rule, solver) -> mujoco.MjModel:
  return morphology.build_model(domain, alpha_len, alpha_size, mass_rule, solver)


@dataclasses.dataclass(frozen=True, eq=False)
class Env:
  """A domain's batched environment. Build with `make_env`; its methods are pure."""

  domain: specs.DomainSpec
  mass_rule: str
  solver: morphology.SolverOptions
  backend: str  # 'mjx' or 'mujoco' (resolved)
  template: mjx.Model
  model_axes: mjx.Model
  v_max: float
  reset_plan: dict  # numpy index arrays for the suite's reset distribution
  ids: dict  # body / sensor indices used by the readout
  sigma: np.ndarray | None  # σ_d for add_gaussian (None only while the table is being made)

  # ---- host side -------------------------------------------------------------------------
  def make_params(
    self,
    scenarios: list[Scenario],
    *,
    obs_fn: str | int | list = "none",
    reward_mode: str = "target_speed",
    seed: int = 0,
    stream_offset: int = 0,
    episode_length: int = specs.EPISODE_LENGTH,
  ) -> EnvParams:
    """Builds, compiles and stacks the scenarios' models (host side, not jitted)."""
    if not scenarios:
      raise ValueError("make_params needs at least one scenario")
    if episode_length < 1:
      raise ValueError(f"episode_length={episode_length} must be ≥ 1 control step")
    for s in scenarios:
      if s.domain != self.domain.name:
        raise ValueError(f"scenario of domain {s.domain!r} given to the {self.domain.name} env")
    if reward_mode not in rewards.REWARD_MODES:
      raise ValueError(
        f"unknown reward_mode {reward_mode!r}: choose one of {list(rewards.REWARD_MODES)}"
      )
    n = len(scenarios)
    fns = obs_fn if isinstance(obs_fn, list | tuple) else [obs_fn] * n
    fn_ids = [obs_functions.obs_fn_id(f) if isinstance(f, str) else int(f) for f in fns]
    if len(fn_ids) != n or not all(0 <= f < len(obs_functions.OBS_FUNCTIONS) for f in fn_ids):
      raise ValueError(f"obs_fn must be one of {obs_functions.OBS_FUNCTIONS} (or one per scenario)")
    if self.sigma is None and obs_functions.obs_fn_id("add_gaussian") in fn_ids:
      raise FileNotFoundError(
        f"{obs_functions.OBS_SCALE_FILE} is missing: run `python -m mrcom_jax.envs.obs_scale`"
      )
    models = [
      _model(self.domain.name, s.alpha_len, s.alpha_size, self.mass_rule, self.solver)
      for s in scenarios
    ]
    if self.backend == "mujoco":
      model = jnp.asarray([host.register(m) for m in models], jnp.int32)
    else:
      model = batching.stack(self.template, models)
    return EnvParams(
      model=model,
      xi=jnp.asarray(np.stack([s.descriptor for s in scenarios])),
      v_target=jnp.asarray([s.beta * self.v_max for s in scenarios], jnp.float32),
      obs_fn=jnp.asarray(fn_ids, jnp.int32),
      reward_mode=jnp.full((n,), rewards.REWARD_MODES[reward_mode], jnp.int32),
      stream=jnp.arange(stream_offset, stream_offset + n, dtype=jnp.int32),
      seed_key=jax.random.PRNGKey(seed),
      episode_length=jnp.asarray(episode_length, jnp.int32),
    )

  # ---- per-member pieces (vmapped below) ----------------------------------------------------
  def _sample_qpos(self, key):
    plan = self.reset_plan
    qpos = jnp.asarray(self.template.qpos0)
    key_lim, key_rot = jax.random.split(key)
    lo, hi = plan["limited_range"][:, 0], plan["limited_range"][:, 1]
    qpos = qpos.at[plan["limited_adr"]].set(
      jax.random.uniform(key_lim, lo.shape, minval=lo, maxval=hi)
    )
    if plan["hinge_adr"].size:
      rot = jax.random.uniform(key_rot, plan["hinge_adr"].shape, minval=-jnp.pi, maxval=jnp.pi)
      qpos = qpos.at[plan["hinge_adr"]].set(rot)
    return qpos

  def _advance(self, params: EnvParams, data, ctrl, n_phys, probe):
    """Steps each member `n_phys[i]` physics steps under `ctrl`, then refreshes its readout.

    One loop holds the only `mjx.step` of the program (compile time dominates on CPU): members
    that continue an episode take `n_substeps` steps; members that restart take the suite's
    settling steps (cheetah: 200, others: 0) and, where `probe`, one more pass whose forward
    dynamics fills the acceleration-stage sensors (touch) at the new state, as dm_control's
    `mj_forward` at reset does, without moving it.

    Args:
      params: the batch's EnvParams.
      data: [N] mjx.Data.
      ctrl: [N, d_a] controls.
      n_phys: [N] int32 physics steps per member.
      probe: [N] bool, whether to run the sensor pass after the steps.
    """
    step = jax.vmap(mjx.step, in_axes=(self.model_axes, 0))
    total = jnp.max(n_phys + probe.astype(jnp.int32))

    def body(carry):
      i, d = carry
      stepped = step(params.model, d)
      move = i < n_phys
      sense = probe & (i == n_phys)
      d_new = _where_rows(move, stepped, d)
      sensordata = _where_rows(sense, stepped.sensordata, d_new.sensordata)
      return i + 1, d_new.replace(sensordata=sensordata)

    _, data = jax.lax.while_loop(lambda c: c[0] < total, body, (0, data.replace(ctrl=ctrl)))
    # Position/velocity quantities at the new state, as dm_control's step ends with mj_step1;
    # acceleration-stage sensors (touch) stay those of the last physics step, as in dm_control.
    refresh = lambda m, d: mjx.subtree_vel(m, mjx.com_vel(m, mjx.com_pos(m, mjx.kinematics(m, d))))
    return jax.vmap(refresh, in_axes=(self.model_axes, 0))(params.model, data)

  def _readout(self, data):
    """(obs [d_o], speed, height, upright) from up-to-date data of one member."""
    ids = self.ids
    # MJX keeps subtree_linvel in its JAX impl; HostData has it as a field.
    linvel = data.subtree_linvel if isinstance(data, host.HostData) else data._impl.subtree_linvel
    speed = linvel[ids["torso"], 0]
    name = self.domain.name
    if name == "hopper":
      touch = jnp.log1p(data.sensordata[ids["touch"]])
      obs = jnp.concatenate([data.qpos[1:], data.qvel, touch])
      height = data.xipos[ids["torso"], 2] - data.xipos[ids["foot"], 2]
      return obs, speed, height, jnp.ones(())
    if name == "walker":
      orient = data.xmat[1:].reshape(-1, 9)[:, jnp.array([0, 2])].reshape(-1)
      height = data.xpos[ids["torso"], 2]
      obs = jnp.concatenate([orient, height[None], data.qvel])
      return obs, speed, height, data.xmat[ids["torso"]].reshape(9)[8]
    obs = jnp.concatenate([data.qpos[1:], data.qvel])
    return obs, speed, data.xpos[ids["torso"], 2], jnp.ones(())

  def _reward(self, speed, height, upright, v_target, mode):
    name = self.domain.name
    if name == "hopper":
      return rewards.hopper(speed, height, v_target, mode)
    if name == "walker":
      return rewards.walker(speed, height, upright, v_target, mode)
    return rewards.cheetah(speed, v_target, mode)

  # ---- batched, pure API ----------------------------------------------------------------------
  def _observe(self, params: EnvParams, obs_clean, stream_step):
    sigma = np.ones(self.domain.obs_dim, np.float32) if self.sigma is None else self.sigma
    apply = functools.partial(obs_functions.apply, domain=self.domain, sigma=sigma)
    return jax.vmap(lambda f, o, s, k: apply(f, o, params.seed_key, stream=s, step=k))(
      params.obs_fn, obs_clean, params.stream, stream_step
    )

  def _blank_data(self, n: int) -> mjx.Data | host.HostData:
    """`n` copies of the template's fresh data (a reset starts from it)."""
    if self.backend == "mujoco":
      return host.blank(_model(self.domain.name, 1.0, 1.0, self.mass_rule, self.solver), n)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), mjx.make_data(self.template))

  def initial(self, params: EnvParams, key) -> EnvState:
    """A pre-episode state: every member is `last`, so the next `step` starts an episode."""
    n = params.v_target.shape[0]
    data = self._blank_data(n)
    zeros = jnp.zeros((n,), jnp.float32)
    return EnvState(
      data=data,
      obs=jnp.zeros((n, specs.OBS_PAD), jnp.float32),
      obs_clean=jnp.zeros((n, self.domain.obs_dim), jnp.float32),
      reward=zeros,
      first=jnp.zeros((n,), bool),
      last=jnp.ones((n,), bool),
      diverged=jnp.zeros((n,), bool),
      xi=params.xi,
      t=jnp.zeros((n,), jnp.int32),
      stream_step=jnp.full((n,), -1, jnp.int32),
      key=jax.random.split(key, n),
      speed=zeros,
      height=zeros,
      upright=zeros,
    )

  def reset(self, params: EnvParams, key) -> EnvState:
    """Starts an episode in every member: `step` from `initial` (one program serves both)."""
    n = params.v_target.shape[0]
    return self.step(params, self.initial(params, key), jnp.zeros((n, self.domain.act_dim)))

  def check_action(self, action) -> None:
    """Raises ValueError unless `action` is [N, d_a] or [N, ACT_PAD] (checked at trace time)."""
    d_a = self.domain.act_dim
    if action.ndim != 2 or action.shape[1] not in (d_a, specs.ACT_PAD):
      raise ValueError(
        f"{self.domain.name} action must have shape [N, {d_a}] (or padded [N, {specs.ACT_PAD}]), "
        f"got {tuple(action.shape)}"
      )

  def step(self, params: EnvParams, state: EnvState, action) -> EnvState:
    """Advances every member one control step.

    Args:
      params: the batch's EnvParams.
      state: the current EnvState.
      action: [N, d_a] (or padded [N, ACT_PAD]) float32 in [-1, 1]; clipped.

    Returns:
      The next EnvState: members at `last` or diverged start a new episode instead.
    """
    self.check_action(action)
    n = params.v_target.shape[0]
    if action.shape[0] != n:
      raise ValueError(f"action batch {action.shape[0]} does not match the {n} scenarios")
    action = jnp.clip(action[:, : self.domain.act_dim], -1.0, 1.0)
    # Members whose episode ended restart from the suite's reset distribution; others step.
    restart = state.last
    key, key_reset = jax.vmap(jax.random.split, out_axes=1)(state.key)
    key = jnp.where(restart[:, None], key, state.key)
    qpos_start = jax.vmap(self._sample_qpos)(key_reset)
    settle = CHEETAH_SETTLE_STEPS if self.domain.name == "cheetah" else 0
    n_phys = jnp.where(restart, settle, self.domain.n_substeps).astype(jnp.int32)
    probe = restart & (self.domain.name == "hopper")  # only the hopper observes a sensor (touch)
    ctrl = jnp.where(restart[:, None], 0.0, action)
    if self.backend == "mujoco":
      data = host.step(params.model, state.data, restart, qpos_start, ctrl, n_phys, probe)
    else:
      start = self._blank_data(n).replace(qpos=qpos_start)
      data = _where_rows(restart, start, state.data)
      data = self._advance(params, data, ctrl, n_phys, probe)
      data = data.replace(time=jnp.where(restart, 0.0, data.time))

    obs_clean, speed, height, upright = jax.vmap(self._readout)(data)
    finite = lambda x: jnp.all(jnp.isfinite(x.reshape(n, -1)), axis=1)
    diverged = ~(finite(data.qpos) & finite(data.qvel) & finite(obs_clean))
    # A diverged member keeps its previous (finite) state, marked `last` and `diverged` with
    # reward 0, so nothing NaN leaves the env; its next step starts a new episode.
    data = _where_rows(diverged, state.data, data)
    obs_clean = jnp.where(diverged[:, None], state.obs_clean, obs_clean)
    speed, height, upright = (
      jnp.where(diverged, old, new)
      for old, new in ((state.speed, speed), (state.height, height), (state.upright, upright))
    )
    t = jnp.where(restart, 0, state.t + 1)
    reward = self._reward(speed, height, upright, params.v_target, params.reward_mode)
    new = EnvState(
      data=data,
      obs=state.obs,
      obs_clean=obs_clean,
      reward=jnp.where(restart | diverged, 0.0, reward).astype(jnp.float32),
      first=restart,
      last=(t >= params.episode_length) | diverged,
      diverged=diverged,
      xi=params.xi,
      t=t,
      stream_step=state.stream_step + 1,
      key=key,
      speed=speed,
      height=height,
      upright=upright,
    )
    return new.replace(obs=self._observe(params, new.obs_clean, new.stream_step))


def _reset_plan(m: mujoco.MjModel, domain: str) -> dict:
  hinge, slide = mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE
  kinds = np.isin(m.jnt_type, [hinge, slide])
  limited = (m.jnt_limited == 1) & kinds
  free_hinge = (m.jnt_limited == 0) & (m.jnt_type == hinge)
  if domain == "cheetah":  # the suite randomises the limited joints only
    free_hinge[:] = False
  return {
    "limited_adr": m.jnt_qposadr[limited].astype(np.int32),
    "limited_range": m.jnt_range[limited].astype(np.float32),
    "hinge_adr": m.jnt_qposadr[free_hinge].astype(np.int32),
  }


def make_env(
  domain: str,
  mass_rule: str = "fixed",
  solver: morphology.SolverOptions = morphology.DEFAULT_SOLVER,
  v_max: float | None = None,
  backend: str = "auto",
) -> Env:
  """The batched environment of `domain` ('hopper', 'walker' or 'cheetah').

  Args:
    domain: domain name.
    mass_rule: 'fixed' (torso geoms keep their default mass) or 'density'.
    solver: MJX solver settings (see `morphology.SolverOptions`).
    v_max: the domain's top speed; defaults to the labelled provisional value in `rewards`.
    backend: 'auto' (default: 'mjx' on a GPU or TPU, 'mujoco' on a CPU), 'mjx' or 'mujoco'.
  """
  return _make_env(domain, mass_rule, solver, v_max, resolve_backend(backend))


@functools.cache
def _make_env(domain, mass_rule, solver, v_max, backend) -> Env:
  spec = specs.get_domain(domain)
  morphology.validate(domain, 1.0, 1.0, mass_rule)
  m = _model(domain, 1.0, 1.0, mass_rule, solver)
  ids = {"torso": mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "torso")}
  if domain == "hopper":
    ids["foot"] = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "foot")
    sensors = [
      mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SENSOR, s) for s in ("touch_toe", "touch_heel")
    ]
    ids["touch"] = np.array([m.sensor_adr[s] for s in sensors], np.int32)
  tmpl = batching.template(domain, mass_rule, solver)
  try:
    sigma = obs_functions.obs_scale(domain)
  except FileNotFoundError:
    sigma = None
  return Env(
    domain=spec,
    mass_rule=mass_rule,
    solver=solver,
    backend=backend,
    template=tmpl,
    model_axes=batching.in_axes(tmpl),
    v_max=float(rewards.PROVISIONAL_V_MAX[domain] if v_max is None else v_max),
    reset_plan=_reset_plan(m, domain),
    ids=ids,
    sigma=sigma,
  )
