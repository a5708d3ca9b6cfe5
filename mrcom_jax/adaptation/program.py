"""Scenario adaptation (METHOD.md, Algorithm 2) as one jitted program over many (scenario, seed)s.

`program = make_program(spec, world_model)`; `params = program.make_params(...)`;
`state = program.init(params)`; `state = program.prompt(state, params)`; then repeatedly
`state, out = program.run(state, params, AdaptMode.TRAIN)`;
`program.evaluate(state, params, episodes)`.

A *pair* is one (target scenario, seed): one real environment, one SAC, one real stream and one
model buffer. The P pairs are ordered domain-major (`spec.domains`); each domain's pairs form one
env sub-batch on the program's simulation backend (different robots cannot share a batch: one
`mjx.Model` template on MJX, one state size on the `mujoco` backend), and everything else (SAC
updates, acting, world-model filtering and imagination) is `vmap`ped over all P pairs at once, on
padded observations [27] and actions [6] with per-pair masks. Pairs step in lockstep, so every
schedule (random steps, rollout rounds, updates) is a scalar predicate and a `lax.cond` really
skips work.

One TRAIN iteration (one real step of every pair), with `s_{t-1}` and its action in the carry:
1. `s_t = env.step(s_{t-1}, a_{t-1})` per domain sub-batch; the record (o_t, r_t, first, last)
   of s_t is appended to the pair's *stream*, the adaptation stream of METHOD.md: the prompt's
   k records, then every real record in order (one per real step). The stream is both the real
   buffer (transition j is `(o_j, a_j, r_{j+1}, o_{j+1})`, absent where record j is `last`) and
   the context: the window before any record is the k records before it, across episodes.
2. Every `rollout_every` real steps (from `rollout_start`): a rollout round. `rollout_starts`
   start records t are drawn from the real part of the stream; each start latent is rebuilt by
   filtering records t−k+1..t through the posterior, each with its own context window (records
   t−2k+1..t are gathered; slots before the stream are the `empty` token). Then `horizon` prior
   steps under the current policy (`imagine`), which acts on the decoded observation means after
   the observation function's stochastic part is re-applied; the context window slides with
   that same observation, so imagined windows look like real ones (METHOD.md Eq. 4); the reward
   of (ô_t, a_t, ô_{t+1}) is the reward head at ŝ_{t+1}. The round's `starts · horizon`
   transitions overwrite the oldest of `keep_rounds` rounds in the model buffer. With
   `finetune_updates` (a switch, off in the paper's protocol), every pair first takes that many
   updates (Eq. 16) of its own copy of the world model on windows of its own stream, and
   imagines with that copy.
3. Once `update_after` real transitions exist: `updates_per_step` SAC updates, each on a batch of
   `round(real_ratio · B)` real and `B − that` model transitions (all real while the model
   buffer is empty), no terminal states.
4. The action at s_t: uniform in [−1, 1] for the first `random_steps` real steps, then a sample
   of the policy; zero where s_t is `last`. It is written next to s_t's record.

Other modes (`AdaptMode`): PROMPT (the behaviour expert of each domain, conditioned on the
target's ξ, acts on clean observations; records `prompt_start .. prompt_start + k − 1` of its
episode are written to stream slots 0..k−1; nothing learns), EVAL (tanh of the policy mean) and
EVAL_RANDOM (uniform): they step the env and report returns but write nothing and update
nothing. `evaluate` runs them
on fresh episodes and restores the training episode afterwards, so evaluating never changes the
training run.

Every per-pair random draw comes from the pair's own key (`make_params(pair_keys=...)`), so a
pair's run does not depend on which other pairs share the call (tested against one by one).
`AdaptState` is a pytree of arrays: saving it between chunks and restoring it continues bitwise.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.world_model import batch as batch_lib
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import train as train_lib


class AdaptMode(enum.IntEnum):
  """What one iteration of `run` does (data: switching it never recompiles; see the module
  docstring). Named apart from the collection runner's `RunnerMode`, whose values differ."""

  PROMPT = 0
  TRAIN = 1
  EVAL = 2
  EVAL_RANDOM = 3


SAC_METRICS = ("critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "q")


@dataclasses.dataclass(frozen=True)
class AdaptSpec:
  """The static shape of an adaptation program (each distinct value compiles once).

  Attributes:
    domains: ((domain, pairs), ...) in pair order, e.g. (('cheetah', 2),).
    context_len: k, the world model's context length (prompt records).
    real_steps: real steps per pair (the stream holds k + real_steps records).
    chunk: real steps (iterations) per `run` call, one `lax.scan`.
    updates_per_step: SAC updates per real step.
    sac: SACConfig of the adapted policies (padded: input 27 + 6, output 6).
    real_ratio: fraction of each SAC batch drawn from real transitions.
    model_rollouts: False is plain SAC on real data (no world model in the program).
    rollout_every: real steps between rollout rounds.
    rollout_start: real steps before the first round.
    rollout_starts: start states per round and pair.
    horizon: H, imagined steps per start.
    keep_rounds: rounds kept in the model buffer.
    prompt: True fills the context from the behaviour expert (PROMPT mode); False leaves the
      k slots before the first real record empty (context from the target's own transitions).
    behaviour_sac: SACConfig of the behaviour experts (their hidden sizes), for PROMPT.
    finetune_updates: world-model updates per pair before every rollout round (0: the
      pretrained model is used as it is, the paper's protocol); each pair then fine-tunes its
      own copy (parameters, optimiser states, values) on windows of its own stream.
    finetune_batch: windows per fine-tuning update.
    finetune_seq_len: T, training steps per window (each with its k context records before).
  """

  domains: tuple[tuple[str, int], ...]
  context_len: int
  real_steps: int
  chunk: int
  updates_per_step: int
  sac: sac_lib.SACConfig
  real_ratio: float
  model_rollouts: bool
  rollout_every: int
  rollout_start: int
  rollout_starts: int
  horizon: int
  keep_rounds: int
  prompt: bool
  behaviour_sac: sac_lib.SACConfig
  finetune_updates: int = 0
  finetune_batch: int = 0
  finetune_seq_len: int = 0

  @property
  def num_pairs(self) -> int:
    return sum(n for _, n in self.domains)

  @property
  def stream_len(self) -> int:
    return self.context_len + self.real_steps

  @property
  def model_capacity(self) -> int:
    return self.keep_rounds * self.rollout_starts * self.horizon if self.model_rollouts else 1

  @property
  def num_real(self) -> int:
    """Real transitions per SAC batch."""
    if not self.model_rollouts:
      return self.sac.batch_size
    return min(self.sac.batch_size, max(0, round(self.real_ratio * self.sac.batch_size)))

  def offsets(self) -> list[tuple[str, int, int]]:
    """(domain, first pair, pairs) per domain sub-batch."""
    out, start = [], 0
    for name, n in self.domains:
      out.append((name, start, n))
      start += n
    return out

  def check(self) -> None:
    """Raises ValueError naming the field that cannot work."""
    checks = [
      (self.domains and all(n > 0 for _, n in self.domains), "domains", "need ≥ 1 pair each"),
      (len({d for d, _ in self.domains}) == len(self.domains), "domains", "repeat a domain"),
      (self.context_len > 0, "context_len", "must be > 0"),
      (self.real_steps > 0, "real_steps", "must be > 0"),
      (self.chunk > 0, "chunk", "must be > 0"),
      (self.real_steps % max(self.chunk, 1) == 0, "real_steps", "must be a multiple of chunk"),
      (self.updates_per_step > 0, "updates_per_step", "must be > 0"),
      (0.0 <= self.real_ratio <= 1.0, "real_ratio", "must be in [0, 1]"),
      (self.rollout_every > 0, "rollout_every", "must be > 0"),
      (self.rollout_start > 0, "rollout_start", "must be > 0 (a round needs real records)"),
      (self.rollout_starts > 0, "rollout_starts", "must be > 0"),
      (self.horizon > 0, "horizon", "must be > 0"),
      (self.keep_rounds > 0, "keep_rounds", "must be > 0"),
      (self.finetune_updates >= 0, "finetune_updates", "must be ≥ 0"),
      (
        not self.finetune_updates or (self.finetune_batch > 0 and self.finetune_seq_len > 0),
        "finetune_batch",
        "and finetune_seq_len must be > 0 when fine-tuning",
      ),
      (not self.finetune_updates or self.model_rollouts, "finetune_updates", "needs rollouts"),
      (
        not self.finetune_updates or self.rollout_start >= self.finetune_seq_len + 1,
        "rollout_start",
        "must leave finetune_seq_len + 1 real records before the first round",
      ),
    ]
    for ok, name, what in checks:
      if not ok:
        raise ValueError(f"AdaptSpec.{name}={getattr(self, name)!r}: {what}")
    for name, _ in self.domains:
      specs.get_domain(name)


@struct.dataclass
class Stream:
  """Each pair's adaptation stream (leading axes [P, L], L = k + real_steps).

  Slots 0..k−1 hold the prompt (or nothing), slot k + s the record of real step s: o_t (after
  the observation function, padded), a_t taken at it, r_t, first, last, diverged.
  """

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  first: jax.Array
  last: jax.Array
  diverged: jax.Array


@struct.dataclass
class ModelBuffer:
  """Imagined transitions (leading axes [P, M], M = keep_rounds · starts · horizon)."""

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  next_obs: jax.Array


@struct.dataclass
class AdaptParams:
  """Per-call data (never donated; changing it never recompiles).

  Attributes:
    envs: EnvParams per domain sub-batch (spec.domains order).
    behaviour: the behaviour expert's actor params per domain (PROMPT mode), or None.
    world_model: world-model variables (shared by every pair), or None without rollouts; when
      fine-tuning, the pretrained `TrainState` that every pair's copy starts from.
    domain: [P] int32. obs_mask: [P, 27]. act_mask: [P, 6]. xi: [P, 6]. obs_fn: [P] int32.
    pair_key: [P, 2] uint32, every per-pair random draw derives from it.
    prompt_start: [] int32, the prompt's first step within the expert's episode.
    stream_start: [] int32, the first stream slot that holds a record (0, or k without prompt).
    random_steps: [] int32, real steps of uniform actions first.
    update_after: [] int32, SAC updates start once this many real transitions exist.
  """

  envs: tuple
  behaviour: tuple | None
  world_model: Any
  domain: jax.Array
  obs_mask: jax.Array
  act_mask: jax.Array
  xi: jax.Array
  obs_fn: jax.Array
  pair_key: jax.Array
  prompt_start: jax.Array
  stream_start: jax.Array
  random_steps: jax.Array
  update_after: jax.Array


@struct.dataclass
class AdaptState:
  """Everything a run carries (arrays only).

  Attributes:
    sac: SACState, every leaf [P, ...].
    stream: Stream. model: ModelBuffer.
    records: [] int32, the next stream slot to write (k + real steps taken).
    model_size: [] int32 imagined transitions held. rounds: [] int32 rollout rounds done.
    prompt_steps: [] int32 PROMPT iterations run.
    envs: EnvState per domain sub-batch, of the last recorded state s_t.
    action: [P, 6] the action recorded with it (applied by the next step).
    episode_return: [P] the current episode's reward sum up to s_t.
    key: [P, 2] uint32 per-pair key of the next iteration.
    world_model: the pairs' fine-tuned world models (`TrainState`, leaves [P, ...]), or None.
  """

  sac: sac_lib.SACState
  stream: Stream
  model: ModelBuffer
  records: jax.Array
  model_size: jax.Array
  rounds: jax.Array
  prompt_steps: jax.Array
  envs: tuple
  action: jax.Array
  episode_return: jax.Array
  key: jax.Array
  world_model: Any = None


@struct.dataclass
class ChunkOut:
  """One chunk's per-iteration outputs.

  Attributes:
    reward: [chunk, P] r_t of s_t. first, last: [chunk, P] bool.
    episode_return: [chunk, P] the episode's reward sum up to s_t (its return where `last`).
    sac: dict of [chunk, P] SAC metrics (0 where no update ran) and `updates` [chunk].
    model: dict of [chunk] rollout-round metrics (0 where no round ran): `rounds` (1 where a
      round ran), `imagined_reward` (mean r̂), `imagined_obs_absmax` (max |ô|) and, when
      fine-tuning, `finetune_loss` (mean Eq. 16 total over the round's updates and pairs).
  """

  reward: jax.Array
  first: jax.Array
  last: jax.Array
  episode_return: jax.Array
  sac: dict[str, jax.Array]
  model: dict[str, jax.Array]


def _tree_where(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _pair_key(pair_key, tag: int):
  return jax.vmap(lambda k: jax.random.fold_in(k, tag))(pair_key)


def imagine(world_model, variables, ws, obs, policy, obs_fn, seed_key, horizon: int, key):
  """`horizon` prior steps under `policy` with every decoded observation perturbed again
  (METHOD.md Eq. 4, last bullets; Algorithm 2, step 3).

  At each step the policy acts on ô_t (the real o_t first), the prior steps to ŝ_{t+1} with
  r̂_{t+1} from the reward head, and ô_{t+1} is the decoded mean with the observation function's
  stochastic part applied again. That ô_{t+1} is both what the policy is given next and what
  its token in the sliding context window holds (normalised, as real tokens are), so imagined
  windows look like real ones.

  Args:
    world_model: the `WorldModel`.
    variables: its variables.
    ws: the `WorldState` of S rows at the start steps (after filtering); its pending token is
      `obs`, normalised.
    obs: [S, 27] the start observations in raw units (0 on padded entries).
    policy: `(obs [S, 27], key) -> actions [S, 6]`.
    obs_fn: int32 scalar, the observation-function id.
    seed_key: the observation functions' seed key (the world model's, PROTOCOL.md).
    horizon: H.
    key: PRNG key.

  Returns:
    (the final WorldState, (ô_t, a_t, r̂_{t+1}, ô_{t+1}) each [H, S, ...]).
  """
  perturb = jax.vmap(obs_functions.reapply_stochastic, in_axes=(None, 0, 0, 0, None))
  norm = variables["normalizer"]

  def body(carry, key_h):
    ws, o = carry
    key_pi, key_m, key_o = jax.random.split(key_h, 3)
    a = policy(o, key_pi)
    ws, im = world_model.step(variables, ws, a, key_m)
    keys = jax.random.split(key_o, o.shape[0])
    o_next = perturb(obs_fn, im.obs, ws.domain, keys, seed_key) * ws.obs_mask
    # The pending token (pushed into the window by the next step) holds the perturbed ô_{t+1}.
    ws = ws.replace(obs=jnp.where(ws.obs_mask > 0, norm.normalize(o_next, ws.domain), 0.0))
    return (ws, o_next), (o, a, im.reward, o_next)

  (ws, _), out = jax.lax.scan(body, (ws, obs), jax.random.split(key, horizon))
  return ws, out


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """An adaptation program; build with `make_program`."""

  spec: AdaptSpec
  envs: tuple[env_lib.Env, ...]
  world_model: model_lib.WorldModel | None
  _init: Any
  _run: Any
  _fresh: Any

  @property
  def device(self) -> jax.Device:
    return jax.devices()[0]

  # ---- host-side construction -----------------------------------------------------------------
  def make_params(
    self,
    env_params: list[env_lib.EnvParams],
    pair_keys: np.ndarray,
    obs_fns: list[int],
    world_model_variables=None,
    behaviour_actors: list | None = None,
    *,
    world_model_state=None,
    random_steps: int,
    update_after: int,
  ) -> AdaptParams:
    """AdaptParams from each domain's EnvParams (one scenario per pair, pair order).

    Args:
      env_params: per domain sub-batch (spec.domains order), `n` scenarios each.
      pair_keys: [P, 2] uint32, one key per pair (e.g. fold_in(PRNGKey(seed), scenario id)).
      obs_fns: [P] observation-function ids (as in the env params).
      world_model_variables: the pretrained world model's variables (rollouts need them).
      behaviour_actors: per domain, the behaviour expert's actor params (the prompt needs them).
      world_model_state: the pretrained `TrainState` (fine-tuning programs take it instead of
        the variables).
      random_steps: real steps of uniform actions first.
      update_after: real transitions before the first SAC update (≥ 2).
    """
    spec = self.spec
    if len(env_params) != len(spec.domains):
      raise ValueError(f"{len(env_params)} env params for {len(spec.domains)} domains")
    for (name, n), p, env in zip(spec.domains, env_params, self.envs):
      runner_lib.check_backend(env, p)
      if p.v_target.shape[0] != n:
        raise ValueError(f"{name}: env params hold {p.v_target.shape[0]} scenarios, need {n}")
    if spec.finetune_updates:
      if world_model_state is None:
        raise ValueError("this program fine-tunes the world model: pass world_model_state")
      world_model_variables = world_model_state
    elif spec.model_rollouts and world_model_variables is None:
      raise ValueError("this program imagines rollouts: pass world_model_variables")
    if update_after < 2:
      raise ValueError(f"update_after={update_after} must be ≥ 2 (a transition needs 2 records)")
    if spec.prompt and behaviour_actors is None:
      raise ValueError("this program starts from the expert prompt: pass behaviour_actors")
    domain = np.concatenate(
      [np.full(n, specs.get_domain(name).id, np.int32) for name, n in spec.domains]
    )
    obs_fns = np.asarray(obs_fns, np.int32)
    episode_length = int(env_params[0].episode_length)
    k = spec.context_len
    return AdaptParams(
      envs=tuple(env_params),
      behaviour=tuple(behaviour_actors) if spec.prompt else None,
      world_model=world_model_variables if spec.model_rollouts else None,
      domain=jnp.asarray(domain),
      obs_mask=jnp.asarray(np.stack([specs.obs_mask(d, f) for d, f in zip(domain, obs_fns)])),
      act_mask=jnp.asarray(np.stack([specs.act_mask(d) for d in domain])),
      xi=jnp.concatenate([p.xi for p in env_params]),
      obs_fn=jnp.asarray(obs_fns),
      pair_key=jnp.asarray(pair_keys, jnp.uint32),
      prompt_start=jnp.asarray(max(0, min(200, episode_length - k)), jnp.int32),
      stream_start=jnp.asarray(0 if spec.prompt else k, jnp.int32),
      random_steps=jnp.asarray(random_steps, jnp.int32),
      update_after=jnp.asarray(update_after, jnp.int32),
    )

  # ---- the jitted programs --------------------------------------------------------------------
  def init(self, params: AdaptParams) -> AdaptState:
    """Fresh SACs, empty stream and model buffer, every env before its first episode."""
    return self._init(jax.device_put(params, self.device))

  def run(self, state: AdaptState, params: AdaptParams, mode: AdaptMode | str):
    """`spec.chunk` iterations in `mode` (or its name, e.g. 'train'); donates `state` (do not
    reuse the argument)."""
    mode = AdaptMode[mode.upper()] if isinstance(mode, str) else AdaptMode(mode)
    state, params = jax.device_put((state, params), self.device)
    return self._run(state, params, jnp.asarray(mode, jnp.int32))

  def compiles(self) -> int:
    """Programs `run` has compiled (1 when nothing retraced)."""
    return self._run._cache_size()

  def real_steps(self, state: AdaptState) -> int:
    return int(state.records) - self.spec.context_len

  # ---- host loops over `run` --------------------------------------------------------------------
  def prompt(self, state: AdaptState, params: AdaptParams) -> AdaptState:
    """Fills stream slots 0..k−1 with the expert's prompt, then starts a fresh training episode.

    A no-op without `spec.prompt` (those slots stay empty). The prompt is free: it takes no real
    step of the budget.
    """
    if not self.spec.prompt:
      return state
    need = int(params.prompt_start) + self.spec.context_len
    for _ in range(math.ceil(need / self.spec.chunk)):
      state, _ = self.run(state, params, AdaptMode.PROMPT)
    return self._restart(state, params, tag=1)

  def _restart(self, state: AdaptState, params: AdaptParams, tag: int) -> AdaptState:
    envs = self._fresh(jax.device_put(params, self.device), jnp.asarray(tag, jnp.uint32))
    p = self.spec.num_pairs
    return state.replace(
      envs=envs,
      action=jnp.zeros((p, specs.ACT_PAD), jnp.float32),
      episode_return=jnp.zeros((p,), jnp.float32),
    )

  def evaluate(
    self, state: AdaptState, params: AdaptParams, episodes: int, random: bool = False, tag=0
  ) -> tuple[AdaptState, np.ndarray]:
    """Mean return over `episodes` fresh episodes per pair: tanh of the policy mean (or uniform).

    The training episode in progress is set aside and restored, so evaluating does not change
    the run. `tag` (e.g. the real step) picks the episodes' reset draws.

    Returns:
      (the state, as given; [P] mean returns).
    """
    keep = jax.tree.map(jnp.copy, (state.envs, state.action, state.episode_return, state.key))
    state = self._restart(state, params, tag=2**20 + int(tag))
    mode = AdaptMode.EVAL_RANDOM if random else AdaptMode.EVAL
    returns = [[] for _ in range(self.spec.num_pairs)]
    while min(len(r) for r in returns) < episodes:
      state, out = self.run(state, params, mode)
      last, ret = np.asarray(out.last), np.asarray(out.episode_return)
      for i, j in zip(*np.nonzero(last)):
        returns[j].append(float(ret[i, j]))
    envs, action, episode_return, key = keep
    state = state.replace(envs=envs, action=action, episode_return=episode_return, key=key)
    return state, np.asarray([np.mean(r[:episodes]) for r in returns])


def make_program(
  spec: AdaptSpec,
  world_model: model_lib.WorldModel | None = None,
  mass_rule: str = "fixed",
  world_model_config=None,
  backend: str = "auto",
) -> Program:
  """The jitted adaptation program for `spec` (see the module docstring).

  Args:
    spec: AdaptSpec.
    world_model: the pretrained model's functions (`make_world_model`), unless
      `spec.model_rollouts` is False.
    mass_rule: torso mass rule of the envs (as in collection).
    world_model_config: the world model's config (fine-tuning programs build its update).
    backend: the envs' simulation backend (`env.resolve_backend`); the EnvParams given to
      `make_params` must come from envs of the same backend.
  """
  spec.check()
  if spec.model_rollouts and world_model is None:
    raise ValueError("spec.model_rollouts needs the world model (make_world_model(config))")
  if spec.finetune_updates and world_model_config is None:
    raise ValueError("spec.finetune_updates needs world_model_config (its train update)")
  if spec.model_rollouts and world_model.spec.context_len != spec.context_len:
    raise ValueError(
      f"AdaptSpec.context_len={spec.context_len} but the world model's k is "
      f"{world_model.spec.context_len}"
    )
  domain_envs = tuple(
    env_lib.make_env(name, mass_rule=mass_rule, backend=backend) for name, _ in spec.domains
  )
  offsets = spec.offsets()
  num_p, k, cap_l, cap_m = spec.num_pairs, spec.context_len, spec.stream_len, spec.model_capacity
  d_o, d_a, sac_cfg = specs.OBS_PAD, specs.ACT_PAD, spec.sac
  starts, horizon = spec.rollout_starts, spec.horizon
  per_round = starts * horizon

  def fresh(params: AdaptParams, tag):
    """Every env before a new episode, reset keys from (pair key, tag)."""
    out = []
    for env, p, (_, first, n) in zip(domain_envs, params.envs, offsets):
      keys = _pair_key(params.pair_key[first : first + n], tag)
      out.append(env.initial(p, keys[0]).replace(key=keys))
    return tuple(out)

  def init(params: AdaptParams) -> AdaptState:
    sac_keys = _pair_key(params.pair_key, 0)
    sac_state = jax.vmap(lambda key: sac_lib.init(sac_cfg, key, d_o, d_a))(sac_keys)
    zeros = lambda n, *shape, dtype=jnp.float32: jnp.zeros((num_p, n, *shape), dtype)
    stream = Stream(
      obs=zeros(cap_l, d_o),
      action=zeros(cap_l, d_a),
      reward=zeros(cap_l),
      first=zeros(cap_l, dtype=bool),
      last=zeros(cap_l, dtype=bool),
      diverged=zeros(cap_l, dtype=bool),
    )
    model = ModelBuffer(
      obs=zeros(cap_m, d_o), action=zeros(cap_m, d_a), reward=zeros(cap_m),
      next_obs=zeros(cap_m, d_o),
    )  # fmt: skip
    scalar = lambda v: jnp.asarray(v, jnp.int32)
    return AdaptState(
      sac=sac_state, stream=stream, model=model, records=scalar(k), model_size=scalar(0),
      rounds=scalar(0), prompt_steps=scalar(0), envs=fresh(params, jnp.uint32(3)),
      action=jnp.zeros((num_p, d_a), jnp.float32), episode_return=jnp.zeros((num_p,)),
      key=_pair_key(params.pair_key, 4), world_model=finetune_init(params),
    )  # fmt: skip

  # ---- SAC ----------------------------------------------------------------------------------
  def sample_batch(stream: Stream, model: ModelBuffer, records, model_size, key):
    """One pair's SAC batch: `num_real` real transitions, the rest imagined (or real)."""
    b, n_real = sac_cfg.batch_size, spec.num_real
    key_r, key_m = jax.random.split(key)
    j = jax.random.randint(key_r, (b,), k, jnp.maximum(records - 1, k + 1))
    real_mask = ~stream.last[j] & ~stream.diverged[j + 1] & (j + 1 < records)
    real = sac_lib.Transition(
      obs=stream.obs[j], xi=jnp.zeros((b, specs.XI_DIM)), action=stream.action[j],
      reward=stream.reward[j + 1], next_obs=stream.obs[j + 1], mask=real_mask.astype(jnp.float32),
    )  # fmt: skip
    if n_real == b:
      return real
    i = jax.random.randint(key_m, (b - n_real,), 0, jnp.maximum(model_size, 1))
    imagined = sac_lib.Transition(
      obs=model.obs[i], xi=jnp.zeros((b - n_real, specs.XI_DIM)), action=model.action[i],
      reward=model.reward[i], next_obs=model.next_obs[i], mask=jnp.ones((b - n_real,)),
    )  # fmt: skip
    tail = jax.tree.map(lambda x: x[n_real:], real)
    tail = _tree_where(model_size > 0, imagined, tail)  # all real until the first round
    return jax.tree.map(lambda r, m: jnp.concatenate([r[:n_real], m]), real, tail)

  def pair_update(sac_p, stream_p, model_p, records, model_size, key, obs_mask, act_mask):
    key_b, key_u = jax.random.split(key)
    batch = sample_batch(stream_p, model_p, records, model_size, key_b)
    return sac_lib.update(sac_cfg, sac_p, batch, key_u, 0.0, obs_mask, act_mask)

  def updates(sac_state, stream, model, records, model_size, keys, params):
    def one(s, i):
      ks = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(keys)
      return jax.vmap(pair_update, in_axes=(0, 0, 0, None, None, 0, 0, 0))(
        s, stream, model, records, model_size, ks, params.obs_mask, params.act_mask
      )

    sac_state, metrics = jax.lax.scan(one, sac_state, jnp.arange(spec.updates_per_step))
    return sac_state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  # ---- rollouts and fine-tuning -------------------------------------------------------------
  def gather(stream_p: Stream, idx, stream_start):
    """Records at `idx` [..., L] of one pair's stream; slots before the stream are invalid."""
    valid = idx >= stream_start
    gi = jnp.clip(idx, 0, cap_l - 1)
    take = lambda x: jnp.where(
      valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x[gi], jnp.zeros((), x.dtype)
    )
    fields = (stream_p.obs, stream_p.action, stream_p.reward, stream_p.first)
    return (*(take(x) for x in fields), valid)

  def windows(stream_p, idx, stream_start, domain, obs_mask, act_mask, xi) -> batch_lib.Batch:
    obs, action, reward, first, valid = gather(stream_p, idx, stream_start)
    b = idx.shape[0]
    return batch_lib.Batch(
      obs=obs, action=action, reward=reward, first=first, valid=valid,
      domain=jnp.full((b,), domain), obs_mask=jnp.broadcast_to(obs_mask, (b, d_o)),
      act_mask=jnp.broadcast_to(act_mask, (b, d_a)), xi=jnp.broadcast_to(xi, (b, specs.XI_DIM)),
    )  # fmt: skip

  def pair_round(actor, stream_p, records, key, domain, obs_mask, act_mask, obs_fn, xi,
                 params, variables):  # fmt: skip
    """One pair's round: [starts · horizon] imagined transitions."""
    wm = world_model
    seed_key = params.envs[0].seed_key
    key_t, key_f, key_i = jax.random.split(key, 3)
    t = jax.random.randint(key_t, (starts,), k, records)  # real records only
    idx = t[:, None] - 2 * k + 1 + jnp.arange(2 * k)[None]  # [S, 2k]
    batch = windows(stream_p, idx, params.stream_start, domain, obs_mask, act_mask, xi)
    obs, action = batch.obs, batch.action
    ws = wm.start(variables, batch)
    ws, _ = wm.observe(
      variables, ws, obs[:, k:], action[:, k - 1 : 2 * k - 1], batch.reward[:, k:],
      batch.first[:, k:], batch.valid[:, k:], key_f,
    )  # fmt: skip
    policy = lambda o, key_pi: sac_lib.act(
      sac_cfg, actor, o, jnp.zeros((starts, specs.XI_DIM)), 0.0, key_pi, obs_mask, act_mask
    )
    _, (o, a, r, o_next) = imagine(wm, variables, ws, obs[:, -1], policy, obs_fn, seed_key,
                                   horizon, key_i)  # fmt: skip
    flat = lambda x: jnp.swapaxes(x, 0, 1).reshape((per_round, *x.shape[2:]))
    return ModelBuffer(obs=flat(o), action=flat(a), reward=flat(r), next_obs=flat(o_next))

  # Only the total is read: no per-term gradient norms (they take 2.4x the update time on CPU).
  wm_update = (
    train_lib.make_update(world_model_config, diagnostics=False) if spec.finetune_updates else None
  )

  def finetune_init(params: AdaptParams):
    """Every pair's copy of the pretrained TrainState, each with its own key."""
    if not spec.finetune_updates:
      return None
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_p, *x.shape)), params.world_model)
    return copies.replace(key=_pair_key(params.pair_key, 5))

  def finetune(wm_state, stream, records, keys, params):
    """`finetune_updates` updates of every pair's model on windows of its own stream: [B] windows
    of k + T records whose T training steps are real records before the current one."""
    length = k + spec.finetune_seq_len

    def pair_batch(stream_p, key, domain, obs_mask, act_mask, xi):
      hi = jnp.maximum(records - 1, k + spec.finetune_seq_len)
      end = jax.random.randint(key, (spec.finetune_batch,), k + spec.finetune_seq_len - 1, hi)
      idx = end[:, None] - length + 1 + jnp.arange(length)[None]
      return windows(stream_p, idx, params.stream_start, domain, obs_mask, act_mask, xi)

    def one(ws, i):
      ks = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(keys)
      batch = jax.vmap(pair_batch)(
        stream, ks, params.domain, params.obs_mask, params.act_mask, params.xi
      )
      ws, metrics = jax.vmap(wm_update)(ws, batch)
      return ws, jnp.mean(metrics["total"])

    wm_state, losses = jax.lax.scan(one, wm_state, jnp.arange(spec.finetune_updates))
    return wm_state, jnp.mean(losses)

  def rollout_round(sac_state, stream, model, records, model_size, rounds, wm_state, keys, params):
    metrics = {}
    if spec.finetune_updates:
      wm_state, metrics["finetune_loss"] = finetune(
        wm_state, stream, records, _pair_key(keys, 11), params
      )
      variables, axis = wm_state.variables, 0
    else:
      variables, axis = params.world_model, None
    new = jax.vmap(pair_round, in_axes=(0, 0, None, 0, 0, 0, 0, 0, 0, None, axis))(
      sac_state.actor, stream, records, keys, params.domain, params.obs_mask, params.act_mask,
      params.obs_fn, params.xi, params, variables,
    )  # fmt: skip
    offset = (rounds % spec.keep_rounds) * per_round
    model = jax.tree.map(
      lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, offset, axis=1), model, new
    )
    metrics.update(
      rounds=jnp.ones(()),
      imagined_reward=jnp.mean(new.reward),
      imagined_obs_absmax=jnp.max(jnp.abs(new.next_obs)),
    )
    return model, jnp.minimum(model_size + per_round, cap_m), rounds + 1, wm_state, metrics

  # ---- one iteration --------------------------------------------------------------------------
  def iteration(state: AdaptState, params: AdaptParams, mode):
    train, prompt = mode == AdaptMode.TRAIN, mode == AdaptMode.PROMPT
    keys = jax.vmap(lambda kk: jax.random.split(kk, 4))(state.key)
    key_next, key_act, key_upd, key_roll = (keys[:, i] for i in range(4))

    # 1. Real step of every domain sub-batch.
    envs = tuple(
      env.step(p, s, state.action[first : first + n])
      for env, p, s, (_, first, n) in zip(domain_envs, params.envs, state.envs, offsets)
    )
    cat = lambda f: jnp.concatenate([f(s) for s in envs])
    obs, reward = cat(lambda s: s.obs), cat(lambda s: s.reward)
    first_, last = cat(lambda s: s.first), cat(lambda s: s.last)
    diverged = cat(lambda s: s.diverged)
    episode_return = jnp.where(first_, reward, state.episode_return + reward)

    # The record's slot: the next real slot (TRAIN), a prompt slot, or none (dropped).
    prompt_slot = state.prompt_steps - params.prompt_start
    slot = jnp.where(train, state.records, jnp.where(prompt, prompt_slot, cap_l))
    slot = jnp.where((slot < 0) | (prompt & (slot >= k)), cap_l, slot)
    put = lambda buf, x: buf.at[:, slot].set(x, mode="drop")
    stream = state.stream.replace(
      obs=put(state.stream.obs, obs), reward=put(state.stream.reward, reward),
      first=put(state.stream.first, first_), last=put(state.stream.last, last),
      diverged=put(state.stream.diverged, diverged),
    )  # fmt: skip
    records = state.records + train.astype(jnp.int32)
    real_steps = records - k  # real records, this one included

    # 2. A rollout round.
    model, model_size, rounds, wm_state = (
      state.model,
      state.model_size,
      state.rounds,
      state.world_model,
    )
    names = ["rounds", "imagined_reward", "imagined_obs_absmax"]
    names += ["finetune_loss"] if spec.finetune_updates else []
    model_metrics = {name: jnp.zeros(()) for name in names}
    if spec.model_rollouts:
      due = (
        train
        & (real_steps >= spec.rollout_start)
        & ((real_steps - spec.rollout_start) % spec.rollout_every == 0)
      )
      args = (state.sac, stream, model, records, model_size, rounds, wm_state, key_roll, params)
      skip = lambda _s, _st, m, _r, ms, rd, ws, *_: (m, ms, rd, ws, model_metrics)
      model, model_size, rounds, wm_state, model_metrics = jax.lax.cond(
        due, rollout_round, skip, *args
      )

    # 3. SAC updates.
    ok = train & (real_steps - 1 >= params.update_after)
    args = (state.sac, stream, model, records, model_size, key_upd, params)
    shapes = jax.eval_shape(updates, *args)[1]
    no_updates = lambda s, *_: (s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    sac_state, sac_metrics = jax.lax.cond(ok, updates, no_updates, *args)
    sac_metrics = dict(sac_metrics, updates=jnp.where(ok, float(spec.updates_per_step), 0.0))

    # 4. The action at s_t.
    def pair_act(actor, o, key, obs_mask, act_mask):
      key_pi, key_u = jax.random.split(key)
      xi = jnp.zeros((specs.XI_DIM,))
      stochastic = sac_lib.act(sac_cfg, actor, o, xi, 0.0, key_pi, obs_mask, act_mask)
      deterministic = sac_lib.act(sac_cfg, actor, o, xi, 0.0, None, obs_mask, act_mask)
      uniform = jax.random.uniform(key_u, (d_a,), minval=-1.0, maxval=1.0) * act_mask
      return stochastic, deterministic, uniform

    stochastic, deterministic, uniform = jax.vmap(pair_act)(
      sac_state.actor, obs, key_act, params.obs_mask, params.act_mask
    )
    use_uniform = (mode == AdaptMode.EVAL_RANDOM) | (train & (real_steps - 1 < params.random_steps))
    action = jnp.where(mode == AdaptMode.EVAL, deterministic, stochastic)
    action = jnp.where(use_uniform, uniform, action)
    if spec.prompt:
      expert = []
      for s, actor, (_, first, n) in zip(envs, params.behaviour, offsets):
        keys_b = jax.vmap(lambda kk: jax.random.fold_in(kk, 7))(key_act[first : first + n])
        a = jax.vmap(
          lambda o, xi, kk, actor=actor: sac_lib.act(spec.behaviour_sac, actor, o, xi, 1.0, kk)
        )(s.obs_clean, s.xi, keys_b)
        expert.append(specs.pad_action(a))
      action = jnp.where(prompt, jnp.concatenate(expert), action)
    action = jnp.where(last[:, None], 0.0, action)
    stream = stream.replace(action=put(stream.action, action))

    new = state.replace(
      sac=sac_state, stream=stream, model=model, records=records, model_size=model_size,
      rounds=rounds, prompt_steps=state.prompt_steps + prompt.astype(jnp.int32), envs=envs,
      action=action, episode_return=episode_return, key=key_next, world_model=wm_state,
    )  # fmt: skip
    out = ChunkOut(
      reward=reward, first=first_, last=last, episode_return=episode_return, sac=sac_metrics,
      model=model_metrics,
    )  # fmt: skip
    return new, out

  def run(state, params, mode):
    return jax.lax.scan(lambda s, _: iteration(s, params, mode), state, None, length=spec.chunk)

  return Program(
    spec=spec,
    envs=domain_envs,
    world_model=world_model,
    _init=jax.jit(init),
    _run=jax.jit(run, donate_argnums=0),
    _fresh=jax.jit(fresh),
  )
