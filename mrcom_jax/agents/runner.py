"""The collection program: one jitted `lax.scan` per domain that acts, steps, stores and learns.

`runner = make_runner(env, config)`; `state = runner.init(env_params, key)`; then repeatedly
`state, out = runner.run(state, env_params, controls)`. `A = config.num_agents` independent SACs
(vmapped: the specialists of one domain, or A = 1 for a behaviour SAC) each own
`N = config.num_envs` members of the env batch: agent `a` owns members `[a·N, (a+1)·N)` of
`env_params = env.make_params(scenarios_of_length_A·N, reward_mode=..., ...)`. The program
depends only on (RunnerConfig, A·N): scenarios, reward mode, episode length, the ξ gate, the mode
and `random_steps` are data, so changing them never recompiles.

One iteration (one control step of every member), with `s_{t-1}` and its action `a_{t-1}` in
the carry:
1. `s_t = env.step(s_{t-1}, a_{t-1})` (one step for all A·N members);
   A member whose simulation diverged waits out its episode on its last finite state (records
   marked `diverged`, reward 0; `hold_diverged`), so every episode keeps its
   `episode_length + 1` records and collection can drop diverged episodes whole;
2. in mode TRAIN, the transition `(o_{t-1}, ξ, a_{t-1}, r_t, o_t)` goes into the agent's
   circular replay, unless `s_{t-1}` is `last` (the env ignores the action and starts a new
   episode: no transition) or `s_t` is `diverged`;
3. in mode TRAIN, once an agent's replay holds `batch_size` transitions, `updates_per_iter`
   SAC updates (vmapped over agents; a `lax.cond` skips them in other modes, so their params
   never change);
4. each agent acts on `[o_t, ξ · xi_gate]` (zero action where `s_t` is `last`);
5. the record of `s_t` is emitted.

`ChunkOut` (leading axes [chunk, A·N]) therefore holds per member, per record: `obs` o_t (clean,
[d_o]), `action` a_t taken at it, `reward` r_t of s_t (0 at `first`), `first`, `last`,
`diverged`, `stream_step` and `episode_return` (the sum of the episode's rewards up to this
record: the episode's return where `last`), plus SAC `metrics` ([chunk], averaged over agents,
zeros where no update happened) and `agent_metrics` ([chunk, A]). Concatenating one member's
ChunkOuts gives exactly the dataset layout: every episode is `episode_length + 1` records,
`first` … `last`, and the step after a `last` record is the next episode's `first` record.
From `init`, `chunk = episode_length + 1` makes every chunk exactly one episode per member.

`RunnerState` is a pure pytree of arrays (SAC states, replay, env state, pending action, returns,
counters, key): saving it (e.g. with orbax) between chunks and restoring it continues bitwise.
`init` starts from the env's pre-episode `initial` state with a zero pending action, so the
first record of the first chunk is every member's first state and `env.step` is compiled once
(inside `run`) for the whole runner. `Runner.run` puts its arguments on one device
(committed), so a state restored as numpy or jax arrays reuses the compiled program.

Snapshots and evaluation: `Runner.actor_params(state, a)` reads agent `a`'s actor (a numpy
pytree); `Runner.with_actor(state, actor_params)` writes a stored actor into every agent (or one).
Medium/expert datasets: `runner.with_actor(runner.init(params, key), snapshot)` then mode EXPLORE
(stochastic policy, no replay writes, no updates); deterministic evaluation: mode DETERMINISTIC.
The pending action of a state was chosen under the previous mode and actor: start from a fresh
`init` (or drop the episode in progress) where that matters.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import specs


class RunnerMode(enum.IntEnum):
  """What the collection program does (`Controls.mode`; the adaptation program has `AdaptMode`)."""

  TRAIN = 0  # stochastic (uniform while env_steps < random_steps), replay writes, updates
  EXPLORE = 1  # stochastic policy, no replay writes, no updates
  DETERMINISTIC = 2  # tanh of the mean, no replay writes, no updates
  RANDOM = 3  # uniform actions in [-1, 1], no replay writes, no updates


MODES = {m.name.lower(): m for m in RunnerMode}  # the modes by name ('train', ...)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
  """Static shape of a collection program (each distinct value compiles once)."""

  domain: str  # 'hopper', 'walker' or 'cheetah'
  num_envs: int = 4  # N, env members per agent
  num_agents: int = 1  # A, independent SACs vmapped in one program
  chunk: int = 100  # control-step iterations per `run` call (one lax.scan)
  replay_capacity: int = 100_000  # transitions per agent (circular, on device)
  updates_per_iter: int = 1  # SAC updates per iteration in TRAIN mode
  sac: sac_lib.SACConfig = dataclasses.field(default_factory=sac_lib.SACConfig)  # SAC settings


@struct.dataclass
class Controls:
  """Data that steers `run` (changing it never recompiles). Build with `make_controls`.

  Attributes:
    mode: [] int32, a RunnerMode.
    random_steps: [] int32, TRAIN acts uniformly while the agent's env_steps is below it.
    xi_gate: [] float32, 1 feeds ξ to actor and critics, 0 hides it.
  """

  mode: jax.Array
  random_steps: jax.Array
  xi_gate: jax.Array


def make_controls(mode: RunnerMode | str, random_steps: int = 0, xi_gate: float = 0.0) -> Controls:
  """Controls with fixed dtypes (int32, int32, float32), so every call hits the same program."""
  try:
    mode = MODES[mode] if isinstance(mode, str) else RunnerMode(mode)
  except (KeyError, ValueError):
    raise ValueError(f"unknown runner mode {mode!r}: choose one of {list(MODES)}") from None
  return Controls(
    mode=jnp.asarray(mode, jnp.int32),
    random_steps=jnp.asarray(random_steps, jnp.int32),
    xi_gate=jnp.asarray(xi_gate, jnp.float32),
  )


@struct.dataclass
class Replay:
  """Per-agent circular replay of real transitions (leading axes [A, C]).

  Attributes:
    obs: [A, C, d_o] o_t.
    xi: [A, C, 6] ξ (ungated).
    action: [A, C, d_a] a_t.
    reward: [A, C] r_{t+1}.
    next_obs: [A, C, d_o] o_{t+1}.
    ptr: [A] int32 next slot to write.
    size: [A] int32 transitions stored (≤ C).
  """

  obs: jax.Array
  xi: jax.Array
  action: jax.Array
  reward: jax.Array
  next_obs: jax.Array
  ptr: jax.Array
  size: jax.Array


@struct.dataclass
class RunnerState:
  """Everything a run carries (a pytree of arrays only).

  Attributes:
    sac: SACState with a leading [A] axis on every leaf (`sac.actor` is the policy).
    replay: Replay.
    env: EnvState [A·N] of the last recorded state s_t.
    action: [A·N, d_a] the action recorded with it (applied by the next step).
    episode_return: [A·N] float32 the current episode's reward sum up to s_t.
    env_steps: [A] int32 env steps each agent took in TRAIN mode.
    iteration: [] int32 iterations run (all modes).
    key: [2] uint32 PRNG key of the next iteration.
  """

  sac: sac_lib.SACState
  replay: Replay
  env: env_lib.EnvState
  action: jax.Array
  episode_return: jax.Array
  env_steps: jax.Array
  iteration: jax.Array
  key: jax.Array


@struct.dataclass
class ChunkOut:
  """One chunk's records (leading axes [chunk, A·N]; see the module docstring).

  Attributes:
    obs: [chunk, A·N, d_o] clean observation o_t.
    action: [chunk, A·N, d_a] a_t (zeros where `last`).
    reward: [chunk, A·N] r_t of s_t.
    first: [chunk, A·N] bool.
    last: [chunk, A·N] bool.
    diverged: [chunk, A·N] bool, the episode diverged at or before this record.
    stream_step: [chunk, A·N] int32 the slot's state counter.
    episode_return: [chunk, A·N] the episode's reward sum up to this record.
    speed: [chunk, A·N] forward speed v_x of s_t (the v_max stage averages it).
    metrics: dict of [chunk] SAC metrics averaged over agents (0 without updates); `updates`
      counts the updates of the iteration (per agent, averaged).
    agent_metrics: dict of [chunk, A], the same per agent.
  """

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  first: jax.Array
  last: jax.Array
  diverged: jax.Array
  stream_step: jax.Array
  episode_return: jax.Array
  speed: jax.Array
  metrics: dict[str, jax.Array]
  agent_metrics: dict[str, jax.Array]


def check_backend(env: env_lib.Env, env_params: env_lib.EnvParams) -> None:
  """Raises ValueError unless `env_params` come from an env of `env`'s simulation backend (the
  `mujoco` backend's models are int32 handles, MJX's an `mjx.Model`), which the program would
  otherwise reject with a pytree-structure error deep inside its trace."""
  made_for = "mujoco" if isinstance(env_params.model, jax.Array | np.ndarray) else "mjx"
  if made_for != env.backend:
    raise ValueError(
      f"env_params were made by a {made_for!r}-backend env, but this program steps the "
      f"{env.backend!r} backend: build them with its own env's make_params"
    )


def hold_diverged(
  prev: env_lib.EnvState, stepped: env_lib.EnvState, env_params: env_lib.EnvParams
) -> env_lib.EnvState:
  """Keeps a diverged member on its episode grid: it waits out the episode, then restarts.

  The env marks a diverged member `last` (its previous finite state, reward 0) and restarts it at
  the next step, which would shift every later episode of that slot off the
  `episode_length + 1`-record grid that datasets and scenario periods rely on. Here the member
  instead repeats that finite state, marked `diverged` with reward 0, until its episode's
  scheduled end (`t = episode_length`, the only `last` of the episode); the next step restarts
  it on the grid. Every record of a diverged episode from the divergence on is `diverged`, so
  collection drops the whole episode and the replay stores none of its later transitions.
  """
  held = prev.diverged & ~prev.last
  waiting = prev.replace(
    first=jnp.zeros_like(prev.first),
    reward=jnp.zeros_like(prev.reward),
    t=prev.t + 1,
    stream_step=prev.stream_step + 1,
  )
  rows = lambda x: held.reshape(held.shape + (1,) * (x.ndim - 1))
  cur = jax.tree.map(lambda w, s: jnp.where(rows(w), w, s), waiting, stepped)
  return cur.replace(last=jnp.where(cur.diverged, cur.t >= env_params.episode_length, cur.last))


def _write(replay_a: Replay, obs, xi, action, reward, next_obs, valid) -> Replay:
  """Appends the `valid` rows of one agent's N transitions (compacted; others dropped)."""
  cap = replay_a.obs.shape[0]
  offset = jnp.cumsum(valid.astype(jnp.int32)) - 1
  pos = jnp.where(valid, (replay_a.ptr + offset) % cap, cap)  # index `cap` is dropped
  put = lambda buf, x: buf.at[pos].set(x, mode="drop")
  count = jnp.sum(valid.astype(jnp.int32))
  return Replay(
    obs=put(replay_a.obs, obs),
    xi=put(replay_a.xi, xi),
    action=put(replay_a.action, action),
    reward=put(replay_a.reward, reward),
    next_obs=put(replay_a.next_obs, next_obs),
    ptr=(replay_a.ptr + count) % cap,
    size=jnp.minimum(replay_a.size + count, cap),
  )


def _sample(replay_a: Replay, key, batch_size: int) -> sac_lib.Transition:
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(replay_a.size, 1))
  return sac_lib.Transition(
    obs=replay_a.obs[idx],
    xi=replay_a.xi[idx],
    action=replay_a.action[idx],
    reward=replay_a.reward[idx],
    next_obs=replay_a.next_obs[idx],
    mask=jnp.ones((batch_size,), jnp.float32),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class Runner:
  """A domain's collection program; build with `make_runner`."""

  env: env_lib.Env
  config: RunnerConfig
  _init: Any
  _run: Any

  @property
  def device(self) -> jax.Device:
    """The device the program runs on (the default device)."""
    return jax.devices()[0]

  @property
  def batch_size(self) -> int:
    """A·N, the env batch size `env_params` must have."""
    return self.config.num_agents * self.config.num_envs

  def _check_params(self, env_params: env_lib.EnvParams) -> None:
    check_backend(self.env, env_params)
    n = env_params.v_target.shape[0]
    if n != self.batch_size:
      raise ValueError(
        f"env_params hold {n} scenarios; this runner needs num_agents·num_envs = "
        f"{self.config.num_agents}·{self.config.num_envs} = {self.batch_size}"
      )

  def init(self, env_params: env_lib.EnvParams, key: jax.Array) -> RunnerState:
    """Fresh SACs (one key per agent), empty replay, the env's pre-episode state."""
    self._check_params(env_params)
    return self._init(env_params, key)

  def run(
    self, state: RunnerState, env_params: env_lib.EnvParams, controls: Controls
  ) -> tuple[RunnerState, ChunkOut]:
    """`config.chunk` iterations; donates `state` (do not reuse the argument)."""
    self._check_params(env_params)
    # Committed to one device, whatever their origin (init, run, a restore, numpy): jit keys its
    # cache on commitment, so mixed origins would otherwise compile the program twice.
    state, env_params, controls = jax.device_put((state, env_params, controls), self.device)
    return self._run(state, env_params, controls)

  def compiles(self) -> int:
    """How many programs `run` has compiled (1 when nothing retraced)."""
    return self._run._cache_size()

  @staticmethod
  def actor_params(state: RunnerState, agent: int = 0) -> Any:
    """Agent `agent`'s actor params as a numpy pytree (a snapshot)."""
    return jax.device_get(jax.tree.map(lambda x: x[agent], state.sac.actor))

  @staticmethod
  def with_actor(state: RunnerState, actor_params: Any, agent: int | None = None) -> RunnerState:
    """`state` with `actor_params` as the actor of every agent (or of `agent` only)."""

    def put(stack, new):
      stack = jnp.asarray(stack)
      new = jnp.asarray(new, stack.dtype)
      if agent is None:
        return jnp.broadcast_to(new, stack.shape)
      return stack.at[agent].set(new)

    return state.replace(
      sac=state.sac.replace(actor=jax.tree.map(put, state.sac.actor, actor_params))
    )


def make_runner(env: env_lib.Env, config: RunnerConfig) -> Runner:
  """The jitted collection program of `env`'s domain (see the module docstring).

  Args:
    env: the domain's Env (from `make_env`).
    config: RunnerConfig; `config.domain` must be the env's domain.

  Returns:
    A Runner with jitted `init(env_params, key)` and `run(state, env_params, controls)`.
  """
  if config.domain != env.domain.name:
    raise ValueError(f"RunnerConfig.domain={config.domain!r} but the env is {env.domain.name!r}")
  if config.replay_capacity < config.num_envs:
    raise ValueError(
      f"replay_capacity={config.replay_capacity} must hold one iteration ({config.num_envs})"
    )
  for name in ("num_envs", "num_agents", "chunk", "updates_per_iter"):
    if getattr(config, name) < 1:
      raise ValueError(f"RunnerConfig.{name} must be ≥ 1, got {getattr(config, name)}")
  num_a, num_n, cap = config.num_agents, config.num_envs, config.replay_capacity
  d_o, d_a, d_xi = env.domain.obs_dim, env.domain.act_dim, specs.XI_DIM
  sac_config = config.sac
  per_agent = lambda x: x.reshape((num_a, num_n, *x.shape[1:]))
  flat = lambda x: x.reshape((num_a * num_n, *x.shape[2:]))

  def init(env_params, key):
    key_sac, key_env, key_run = jax.random.split(key, 3)
    keys = jax.random.split(key_sac, num_a)
    sac_state = jax.vmap(lambda k: sac_lib.init(sac_config, k, d_o, d_a))(keys)
    zeros = lambda *shape: jnp.zeros((num_a, cap, *shape), jnp.float32)
    replay = Replay(
      obs=zeros(d_o),
      xi=zeros(d_xi),
      action=zeros(d_a),
      reward=zeros(),
      next_obs=zeros(d_o),
      ptr=jnp.zeros((num_a,), jnp.int32),
      size=jnp.zeros((num_a,), jnp.int32),
    )
    return RunnerState(
      sac=sac_state,
      replay=replay,
      env=env.initial(env_params, key_env),  # all `last`: the first step starts episodes
      action=jnp.zeros((num_a * num_n, d_a), jnp.float32),
      episode_return=jnp.zeros((num_a * num_n,), jnp.float32),
      env_steps=jnp.zeros((num_a,), jnp.int32),
      iteration=jnp.zeros((), jnp.int32),
      key=key_run,
    )

  def agent_update(sac_a, replay_a, key, ok, xi_gate):
    key_idx, key_upd = jax.random.split(key)
    batch = _sample(replay_a, key_idx, sac_config.batch_size)
    new, metrics = sac_lib.update(sac_config, sac_a, batch, key_upd, xi_gate)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, sac_a)
    metrics = jax.tree.map(lambda m: jnp.where(ok, m, 0.0), metrics)
    return new, metrics

  def updates(sac_state, replay, key, ok, xi_gate):
    """`updates_per_iter` updates of every agent whose `ok` is set; metrics averaged: [A]."""

    def one(s, k):
      keys = jax.random.split(k, num_a)
      return jax.vmap(agent_update, in_axes=(0, 0, 0, 0, None))(s, replay, keys, ok, xi_gate)

    sac_state, metrics = jax.lax.scan(
      one, sac_state, jax.random.split(key, config.updates_per_iter)
    )
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    metrics["updates"] = jnp.where(ok, float(config.updates_per_iter), 0.0)
    return sac_state, metrics

  def iteration(state: RunnerState, env_params, controls: Controls):
    key, key_act, key_upd = jax.random.split(state.key, 3)
    prev = state.env
    cur = hold_diverged(prev, env.step(env_params, prev, state.action), env_params)
    train = controls.mode == int(RunnerMode.TRAIN)

    # Replay: (o_{t-1}, ξ, a_{t-1}, r_t, o_t) unless s_{t-1} ended its episode or s_t diverged.
    valid = ~prev.last & ~cur.diverged & train
    replay = jax.vmap(_write)(
      state.replay,
      per_agent(prev.obs_clean),
      per_agent(prev.xi),
      per_agent(state.action),
      per_agent(cur.reward),
      per_agent(cur.obs_clean),
      per_agent(valid),
    )
    env_steps = state.env_steps + jnp.where(train, num_n, 0)

    # Updates (skipped by the cond outside TRAIN, so params cannot change there).
    ok = train & (replay.size >= sac_config.batch_size)
    args = (state.sac, replay, key_upd, ok, controls.xi_gate)
    shapes = jax.eval_shape(updates, *args)[1]
    no_updates = lambda s, *_: (s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    sac_state, metrics = jax.lax.cond(jnp.any(ok), updates, no_updates, *args)

    # Acting on s_t.
    def agent_act(actor, obs, xi, key):
      key_pi, key_uniform = jax.random.split(key)
      x = sac_lib.network_input(obs, xi, controls.xi_gate)
      mean, log_std = sac_lib.actor_module(sac_config, d_a).apply(actor, x)
      u = mean + jnp.exp(log_std) * jax.random.normal(key_pi, mean.shape)
      uniform = jax.random.uniform(key_uniform, mean.shape, minval=-1.0, maxval=1.0)
      return jnp.tanh(u), jnp.tanh(mean), uniform

    keys = jax.random.split(key_act, num_a)
    stochastic, deterministic, uniform = jax.vmap(agent_act)(
      sac_state.actor, per_agent(cur.obs_clean), per_agent(cur.xi), keys
    )
    mode = lambda m: controls.mode == int(m)
    use_uniform = mode(RunnerMode.RANDOM) | (train & (env_steps < controls.random_steps))
    action = jnp.where(mode(RunnerMode.DETERMINISTIC), deterministic, stochastic)
    action = jnp.where(use_uniform[:, None, None], uniform, action)
    action = jnp.where(cur.last[:, None], 0.0, flat(action))

    episode_return = jnp.where(cur.first, cur.reward, state.episode_return + cur.reward)
    record = ChunkOut(
      obs=cur.obs_clean,
      action=action,
      reward=cur.reward,
      first=cur.first,
      last=cur.last,
      diverged=cur.diverged,
      stream_step=cur.stream_step,
      episode_return=episode_return,
      speed=cur.speed,
      metrics=jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
      agent_metrics=metrics,
    )
    new = RunnerState(
      sac=sac_state,
      replay=replay,
      env=cur,
      action=action,
      episode_return=episode_return,
      env_steps=env_steps,
      iteration=state.iteration + 1,
      key=key,
    )
    return new, record

  def run(state, env_params, controls):
    return jax.lax.scan(
      lambda s, _: iteration(s, env_params, controls), state, None, length=config.chunk
    )

  return Runner(
    env=env,
    config=config,
    _init=jax.jit(init),
    _run=jax.jit(run, donate_argnums=0),
  )
