"""Behaviour policies, datasets, evaluation lists and reference returns (PROTOCOL.md).

  python -m experiments.collect --config=experiments/configs/collect.py:smoke --data_dir=runs/data

Runs the stages in PROTOCOL.md's order, each made once (seed 0) and shared by every seed:
  1. v_max     `v_max` experts (the suite's reward, default morphology) → metadata/v_max.json
  2. gate      the feasibility gate (specialists at the widest corners) → metadata/gate.json
  3. behaviour a ξ-conditioned SAC per (distribution, domain); every record it generates is
               streamed to behaviour/<distribution>/<domain>/stream (a dataset of kind 'behaviour')
  4. datasets  datasets/<distribution>/<domain>/{mix,medium,expert,random} (mrcom_jax.data);
               medium/expert replay a behaviour snapshot with ξ on, medium the first whose
               deterministic return reaches half the final one's → metadata/snapshot_returns.json
  5. lists     5 evaluation scenarios per (domain, setting)            → metadata/eval_lists.json
  6. random    the uniform policy's return per list scenario → metadata/random_returns.json
  7. specialists one SAC per list scenario, vmapped per domain → metadata/specialists.json
Every stage checkpoints (orbax) at its scenario-period boundaries, resumes from there when
re-run, and is skipped when its output already exists. Later stages read earlier stages' outputs
from `metadata/`; nothing is written back into a config. SIGTERM / SIGUSR1 stop at the next chunk
boundary; the stage resumes from its last period checkpoint. A diverged episode is dropped
(counted as `dropped_episodes` in the stage's results and datasets), never fatal.

Simulation backend: `--config.env.backend` (auto: mjx on a GPU or TPU, mujoco on a CPU). Every
job records the one it ran on in its directory (`backend.json`), every dataset in its info
(`backend`), and a job or dataset resumes only on the backend it started on: its checkpoints hold
that backend's env states. Finished stages made on another backend are used as they are.

All SAC recipes of a domain go through one program (`mrcom_jax.agents.runner`): reward mode,
scenarios, the ξ input gate and the mode (train / explore / deterministic / random) are data.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from experiments import cli
from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import morphology, specs
from mrcom_jax.envs import scenarios as scen
from mrcom_jax.training import checkpoint as checkpoint_lib
from mrcom_jax.training import logs

DOMAINS = ("hopper", "walker", "cheetah")
DISTRIBUTIONS = ("narrow", "wide", "narrow_beta0.8", "wide_beta0.8", "fixed")
DATASET_KINDS = ("mix", "medium", "expert", "random")
# Evaluation settings of each training distribution (PROTOCOL.md, Settings and Table 2/5).
EVAL_SETTINGS = {
  "narrow": ("a", "b"),
  "wide": ("c", "d"),
  "narrow_beta0.8": ("a@0.8", "b@0.8"),
  "wide_beta0.8": ("c@0.8", "d@0.8"),
  "fixed": ("fixed",),
}
STAGES = ("v_max", "gate", "behaviour", "datasets", "lists", "random", "specialists")


class StageStopped(RuntimeError):
  """A signal stopped a stage at a chunk boundary; rerun to resume from its last checkpoint."""


class BackendSwitch(ValueError):
  """A job or dataset would continue on another simulation backend than it started on."""


# ---- paths and metadata -----------------------------------------------------------------------
def dataset_path(root: str, distribution: str, domain: str, kind: str) -> str:
  return os.path.join(root, "datasets", distribution, domain, kind)


def dataset_complete(path: str) -> bool:
  try:
    dataset_lib.Dataset.open(path)
  except (FileNotFoundError, ValueError):
    return False
  return True


def _meta_path(root: str, name: str) -> str:
  return os.path.join(root, "metadata", f"{name}.json")


def read_metadata(root: str, name: str) -> dict:
  """A stage's metadata (`v_max`, `gate`, `eval_lists`, `random_returns`, `specialists`)."""
  path = _meta_path(root, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run `python -m experiments.collect` first")
  with open(path) as f:
    return json.load(f)


def _write_metadata(root: str, name: str, payload: dict) -> None:
  os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
  logs.write_json(_meta_path(root, name), payload)


def _has_metadata(root: str, name: str, key: str) -> bool:
  try:
    return key in read_metadata(root, name)
  except FileNotFoundError:
    return False


def _update_metadata(root: str, name: str, key: str, value) -> None:
  try:
    payload = read_metadata(root, name)
  except FileNotFoundError:
    payload = {}
  payload[key] = value
  _write_metadata(root, name, payload)


# ---- configuration ----------------------------------------------------------------------------
def validate(cc) -> None:
  """Raises ValueError naming the field, before anything is compiled."""
  for d in cc.domains:
    if d not in DOMAINS:
      raise ValueError(f"config.collect.domains has unknown domain {d!r}: choose from {DOMAINS}")
  for dist in cc.distributions:
    if dist not in DISTRIBUTIONS:
      raise ValueError(f"config.collect.distributions has {dist!r}: choose from {DISTRIBUTIONS}")
  for kind in cc.datasets.kinds:
    if kind not in DATASET_KINDS:
      raise ValueError(f"config.collect.datasets.kinds has {kind!r}: choose from {DATASET_KINDS}")
  if cc.episode_length < 1:
    raise ValueError(f"config.collect.episode_length={cc.episode_length} must be ≥ 1")
  if cc.chunk < 1 or (cc.episode_length + 1) % cc.chunk:
    raise ValueError(
      f"config.collect.chunk={cc.chunk} must divide episode_length + 1 = {cc.episode_length + 1}"
    )
  for name in ("behaviour", "specialist"):
    r = cc[name]
    for field in ("num_envs", "env_steps", "updates_per_iter"):
      if r[field] < 1:
        raise ValueError(f"config.collect.{name}.{field}={r[field]} must be ≥ 1")
    if r.sac.batch_size < 1 or r.sac.hidden < 1:
      raise ValueError(f"config.collect.{name}.sac batch_size and hidden must be ≥ 1")
  if cc.evaluation.scenarios < 1 or cc.evaluation.episodes < 1:
    raise ValueError("config.collect.evaluation.scenarios and .episodes must be ≥ 1")
  known = _all_settings()
  for setting in cc.evaluation.settings:
    if setting not in known:
      raise ValueError(f"config.collect.evaluation.settings has {setting!r}: choose from {known}")
  if cc.scenario_episodes < 1:
    raise ValueError(f"config.collect.scenario_episodes={cc.scenario_episodes} must be ≥ 1")
  rules, backends = morphology.MASS_RULES, env_lib.BACKENDS
  ranges = [  # the remaining fields (name, value, allowed, ok)
    ("seed", cc.seed, "≥ 0", cc.seed >= 0),
    ("env.backend", cc.env.backend, f"one of {backends}", cc.env.backend in backends),
    ("domains", tuple(cc.domains), "at least one domain", len(cc.domains) > 0),
    ("mass_rule", cc.mass_rule, f"one of {rules}", cc.mass_rule in rules),
    ("v_max.episodes", cc.v_max.episodes, "≥ 1", cc.v_max.episodes >= 1),
    ("v_max.from_step", cc.v_max.from_step, "≥ 0", cc.v_max.from_step >= 0),
    ("gate.beta", cc.gate.beta, "in (0, 1]", 0 < cc.gate.beta <= 1),
    ("gate.threshold", cc.gate.threshold, "in [0, 1]", 0 <= cc.gate.threshold <= 1),
    ("datasets.records", cc.datasets.records, "≥ 1", cc.datasets.records >= 1),
  ]  # fmt: skip
  for name in ("behaviour", "specialist"):
    r = cc[name]
    ranges += [(f"{name}.random_steps", r.random_steps, "≥ 0", r.random_steps >= 0),
               (f"{name}.sac.layers", r.sac.layers, "≥ 1", r.sac.layers >= 1),
               (f"{name}.sac.lr", r.sac.lr, "> 0", r.sac.lr > 0)]  # fmt: skip
  for field, value, allowed, ok in ranges:
    if not ok:
      raise ValueError(f"config.collect.{field}={value!r} must be {allowed}")
  if cc.datasets.eval_episodes < 1:
    raise ValueError(
      f"config.collect.datasets.eval_episodes={cc.datasets.eval_episodes} must be ≥ 1"
    )
  if cc.gate.enabled:
    limit = max_gate_shrink()
    if not 0 < cc.gate.shrink < limit:
      raise ValueError(
        f"config.collect.gate.shrink={cc.gate.shrink} must lie in (0, {limit:.3g}): a step of "
        f"{limit:.3g} or more empties or inverts setting (d)'s α interval [0.4, 0.6) (its lower "
        "bound moves up by the shrink); choose a smaller step, e.g. 0.05"
      )
    lo, hi = cc.gate.alpha
    if not lo < 1 < hi:
      raise ValueError(
        f"config.collect.gate.alpha={tuple(cc.gate.alpha)} must hold 1 strictly inside "
        "(the widest evaluated range's corners, e.g. (0.4, 1.6))"
      )


def check_data_dir(root: str) -> None:
  """Refuses a data directory that cannot be made or written, before anything is: a file where it
  or a directory above it should be, or a nearest existing directory this user cannot write."""
  probe = os.path.abspath(root)
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(
      f"data directory {root!r}: {probe} exists and is not a directory; pass a directory that "
      "exists or can be made"
    )
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(
      f"data directory {root!r}: {probe} is not writable; pass a directory you can write to"
    )


def check_inputs(cc, root: str) -> None:
  """Everything `run` refuses before it writes or compiles anything: the config and the path."""
  validate(cc)
  check_data_dir(root)


def training_distribution(name: str, shrink: float = 0.0) -> scen.ScenarioDistribution:
  """A training distribution by name; `shrink` (from the gate) narrows the wide δ."""
  base, _, beta = name.partition("_beta")
  if base == "fixed":
    return scen.fixed_dynamics()
  d = scen.get_distribution("a" if base == "narrow" else "c", "train")
  if base == "wide" and shrink:
    d = dataclasses.replace(d, alpha=_shrink_alpha(d.alpha, shrink, f"{name!r} (training)"))
  return d.with_beta(float(beta)) if beta else d


def evaluation_distribution(setting: str, shrink: float = 0.0) -> scen.ScenarioDistribution:
  """'a'…'d', 'a@0.8'…, or 'fixed'; `shrink` narrows the out-of-distribution (d) ring."""
  if setting == "fixed":
    return scen.fixed_dynamics()
  base, _, beta = setting.partition("@")
  d = scen.get_distribution(base, "eval")
  if base in ("c", "d") and shrink:  # the outer α bounds move inward by `shrink`
    d = dataclasses.replace(d, alpha=_shrink_alpha(d.alpha, shrink, f"setting ({base})"))
  return d.with_beta(float(beta)) if beta else d


def _shrink_alpha(alpha, shrink: float, what: str) -> tuple:
  """Moves the outer α bounds (below / above 1) inward by `shrink`; refuses to empty one."""
  out = []
  for lo, hi in alpha:
    new = (lo + shrink if lo < 1 else lo, hi - shrink if hi > 1 else hi)
    if new[0] >= new[1]:
      raise ValueError(
        f"the gate's α shrink {shrink:.3g} would invert {what}'s α interval [{lo}, {hi}] into "
        f"[{new[0]:.3g}, {new[1]:.3g}]: the shrink must stay below {max_gate_shrink():.3g} "
        "(config.collect.gate.shrink is the step)"
      )
    out.append(new)
  return tuple(out)


def max_gate_shrink() -> float:
  """The least shrink that empties an α interval the gate narrows: (d)'s [0.4, 0.6), 0.2."""
  limits = []
  for base, split in (("c", "train"), ("c", "eval"), ("d", "eval")):
    for lo, hi in scen.get_distribution(base, split).alpha:
      limits.append((hi - lo) / 2 if lo < 1 < hi else hi - lo)
  return min(limits)


# ---- the runner programs ------------------------------------------------------------------------
def recipe(cc, name: str, num_agents: int = 1) -> runner_lib.RunnerConfig:
  """The RunnerConfig of a recipe ('behaviour' or 'specialist') with `num_agents` SACs."""
  r = cc[name]
  iters = iterations(cc, r.num_envs, r.env_steps)
  return runner_lib.RunnerConfig(
    domain="",  # filled per domain
    num_envs=r.num_envs,
    num_agents=num_agents,
    chunk=cc.chunk,
    replay_capacity=iters * r.num_envs,
    updates_per_iter=r.updates_per_iter,
    sac=sac_lib.SACConfig(
      hidden=(r.sac.hidden,) * r.sac.layers, lr=r.sac.lr, batch_size=r.sac.batch_size
    ),
  )


def iterations(cc, num_envs: int, env_steps: int) -> int:
  """Control-step iterations for `env_steps`, rounded up to whole scenario periods."""
  per_episode = cc.episode_length + 1
  return (
    period_episodes(cc, num_envs, env_steps) * per_episode * num_periods(cc, num_envs, env_steps)
  )


def _episodes_needed(cc, num_envs: int, env_steps: int) -> int:
  return math.ceil(env_steps / num_envs / (cc.episode_length + 1))


def period_episodes(cc, num_envs: int, env_steps: int) -> int:
  return min(cc.scenario_episodes, _episodes_needed(cc, num_envs, env_steps))


def num_periods(cc, num_envs: int, env_steps: int) -> int:
  return math.ceil(
    _episodes_needed(cc, num_envs, env_steps) / period_episodes(cc, num_envs, env_steps)
  )


def resolved_backend(cc) -> str:
  """The simulation backend of `cc.env.backend`: 'mjx' or 'mujoco' ('auto' resolved here)."""
  return env_lib.resolve_backend(cc.env.backend)


def make_env(cc, domain: str) -> env_lib.Env:
  """The env of every program and every batch of params: the config's mass rule and backend."""
  return env_lib.make_env(domain, mass_rule=cc.mass_rule, backend=cc.env.backend)


def get_runner(cc, domain: str, rc: runner_lib.RunnerConfig):
  """One compiled runner per (domain, shapes, env), shared by every stage that fits it; its env
  is the one `make_params` builds params with (`make_env`)."""
  return _runner(make_env(cc, domain), dataclasses.replace(rc, domain=domain))


@functools.cache
def _runner(env: env_lib.Env, rc: runner_lib.RunnerConfig):
  return runner_lib.make_runner(env, rc)


def make_params(
  cc,
  domain: str,
  members: list[scen.Scenario],
  v_max: float,
  reward_mode: str,
  stream_offset: int = 0,
) -> env_lib.EnvParams:
  """Env params with v* = β · v_max from the metadata (not the env's provisional value)."""
  params = make_env(cc, domain).make_params(
    members,
    reward_mode=reward_mode,
    seed=cc.seed,
    stream_offset=stream_offset,
    episode_length=cc.episode_length,
  )
  v_target = jnp.asarray([s.beta * v_max for s in members], jnp.float32)
  return params.replace(v_target=v_target)


def open_writer(path: str, domain: str, kind: str, episode_length: int, info: dict):
  """A writer continuing the incomplete dataset at `path`, or creating it.

  Raises:
    BackendSwitch: the incomplete dataset holds records of another simulation backend than
      `info['backend']` (one line naming both).
  """
  if os.path.exists(os.path.join(path, dataset_lib.META_FILE)):
    saved = dataset_lib.Dataset.open(path, allow_incomplete=True).info.get("backend")
    _check_same_backend(path, saved, info.get("backend"))
    return dataset_lib.DatasetWriter.resume(path)
  return dataset_lib.DatasetWriter(path, domain, kind, episode_length=episode_length, info=info)


BACKEND_FILE = "backend.json"  # a job directory's simulation backend


def claim_backend(cc, workdir: str) -> str:
  """The resolved backend of the job in `workdir`, recorded there (`backend.json`) before the job
  runs; a job that started on another backend is refused, before anything is compiled.

  A job resumes from its checkpoints, which hold its backend's env states (`mjx.Data` or the
  host's exact MuJoCo state): another backend could not restore them, and redoing the job's
  periods on it would splice two simulators into one stream.

  Raises:
    BackendSwitch: `workdir` was started on another backend; the message names both and the fix.
  """
  backend = resolved_backend(cc)
  path = os.path.join(workdir, BACKEND_FILE)
  if os.path.exists(path):
    with open(path) as f:
      _check_same_backend(workdir, json.load(f)["backend"], backend)
  else:
    os.makedirs(workdir, exist_ok=True)
    logs.write_json(path, {"backend": backend})
  return backend


def _check_same_backend(where: str, saved: str | None, backend: str | None) -> None:
  """Refuses to continue `where` (made on `saved`) on another backend; None: not recorded."""
  if saved is not None and backend is not None and saved != backend:
    raise BackendSwitch(
      f"{where} was started on the {saved!r} simulation backend and this run asks for "
      f"{backend!r} (config.env.backend): resume it with --config.env.backend={saved}, or remove "
      f"{where} to redo it on {backend!r}"
    )


# ---- one SAC run (train / generate), checkpointed per period -----------------------------------
@dataclasses.dataclass
class Job:
  """One run of the runner program: who acts, on which scenarios, for how long."""

  name: str
  domain: str
  rc: runner_lib.RunnerConfig
  periods: int
  period_episodes: int
  scenarios: callable  # period -> list of A·N scenarios
  reward_mode: str = "target_speed"
  mode: runner_lib.RunnerMode = runner_lib.RunnerMode.TRAIN
  random_steps: int = 0
  xi_gate: float = 0.0
  actor: object = None  # actor params every agent acts with (explore jobs from a snapshot)
  init_state: object = None  # a runner state to continue from (evaluation after training)
  writer: dataset_lib.DatasetWriter | None = None  # streams every period's records


def training_job(cc, recipe_name: str, name: str, domain: str, scenarios, num_agents: int = 1,
                 **kwargs) -> Job:  # fmt: skip
  """A TRAIN job of recipe 'behaviour' or 'specialist': its program, budget and random steps."""
  r = cc[recipe_name]
  return Job(
    name=name,
    domain=domain,
    rc=recipe(cc, recipe_name, num_agents),
    periods=num_periods(cc, r.num_envs, r.env_steps),
    period_episodes=period_episodes(cc, r.num_envs, r.env_steps),
    scenarios=scenarios,
    random_steps=r.random_steps,
    **kwargs,
  )


def run_job(cc, job: Job, v_max: float, workdir: str, stop=None, seed: int = 0) -> dict:
  """Runs (or resumes) a job; returns its result: returns per period and episode, snapshots.

  Checkpoints the runner state after every period in `workdir/checkpoints`; the writer (if any)
  gets the period's records as whole streams (`_write_period`), and the checkpoint stores how
  many chunks it held, so a resumed job first drops chunks written after its checkpoint.

  A diverged episode (the runner keeps it on the grid, marked `diverged`: `hold_diverged`) is
  dropped: it enters neither the returns, the speeds nor the writer, and `dropped_episodes`
  counts it (a divergence never stops a stage, and its resume drops it again).
  """
  claim_backend(cc, workdir)  # before anything is compiled or restored
  runner = get_runner(cc, job.domain, job.rc)
  per_period = job.period_episodes * (cc.episode_length + 1)
  chunks_per_period = per_period // cc.chunk
  ctl = runner_lib.make_controls(job.mode, job.random_steps, job.xi_gate)
  params = make_params(cc, job.domain, job.scenarios(0), v_max, job.reward_mode)
  if job.init_state is not None:
    state = job.init_state
  else:
    state = runner.init(params, jax.random.PRNGKey(seed))
  if job.actor is not None:
    state = runner_lib.Runner.with_actor(state, job.actor)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
  result = {"returns": [], "speed": [], "snapshots": [], "dropped_episodes": 0, "chunks": 0}
  start = 0
  restored = ckpt.restore_latest(state)
  if restored is not None:
    start, state, meta = restored
    result = meta["result"]
  if job.writer is not None:
    job.writer.truncate_to(result["chunks"])
  n_agents, n_envs = job.rc.num_agents, job.rc.num_envs
  bar = tqdm(
    total=job.periods * per_period,
    initial=start * per_period,
    unit="it",
    desc=f"{job.name}",
    dynamic_ncols=True,
    leave=False,
  )
  try:
    for period in range(start, job.periods):
      if period:  # period 0's params were built for init
        params = make_params(cc, job.domain, job.scenarios(period), v_max, job.reward_mode)
      outs = []
      for _ in range(chunks_per_period):
        if stop:
          raise StageStopped(f"{job.name}: stopped by {stop.name}; rerun to resume")
        state, out = runner.run(state, params, ctl)
        outs.append(jax.device_get(out))
        bar.update(cc.chunk)
      cat = {
        k: np.concatenate([getattr(o, k) for o in outs])
        for k in (
          "obs", "action", "reward", "first", "last", "diverged", "episode_return", "speed"
        )
      }  # fmt: skip
      kept = ~episodes_diverged(cat["diverged"], cc.episode_length)  # [episodes, A·N]
      result["dropped_episodes"] += int((~kept).sum())
      ok = np.repeat(kept, cc.episode_length + 1, axis=0)  # [P, A·N] records of kept episodes
      last = cat["last"] & ok
      ep_ret = cat["episode_return"].reshape(per_period, n_agents, n_envs)
      done = last.reshape(per_period, n_agents, n_envs)
      per_agent = [(ep_ret[:, a][done[:, a]]).tolist() for a in range(n_agents)]
      result["returns"].append(per_agent)
      # Mean forward speed per agent over the states of control steps from_step .. L − 1 of
      # each kept episode (from L // 5 in episodes shorter than from_step, as in tests).
      t = np.arange(per_period) % (cc.episode_length + 1)
      window = (t >= min(cc.v_max.from_step, cc.episode_length // 5)) & (t < cc.episode_length)
      w = (window[:, None] & ok).reshape(per_period, n_agents, n_envs)
      v = cat["speed"].reshape(per_period, n_agents, n_envs)
      count = w.sum(axis=(0, 2))
      speed = np.where(count > 0, (v * w).sum(axis=(0, 2)) / np.maximum(count, 1), np.nan)
      result["speed"].append(speed.tolist())
      if job.mode == runner_lib.RunnerMode.TRAIN:
        # An actor snapshot at every episode boundary of the period, with its mean return.
        snap_dir = os.path.join(workdir, "snapshots")
        os.makedirs(snap_dir, exist_ok=True)
        path = os.path.join(snap_dir, f"period_{period:05d}.npz")
        flat = jax.tree_util.tree_flatten_with_path(runner_lib.Runner.actor_params(state))[0]
        np.savez(path, **{jax.tree_util.keystr(p): v for p, v in flat})
        mean_ret = float(np.mean([r for a in per_agent for r in a])) if last.any() else None
        rel = os.path.relpath(path, workdir)  # relative: the data directory may move
        result["snapshots"].append({"period": period, "path": rel, "mean_return": mean_ret})
      if job.writer is not None:
        _write_period(job.writer, cat, np.asarray(params.xi), period, kept)
        result["chunks"] = job.writer.num_chunks
      ckpt.save(period + 1, state, {"result": result})
  finally:
    bar.close()
    ckpt.close()
  result["final_state"] = state
  return result


def episodes_diverged(diverged: np.ndarray, episode_length: int) -> np.ndarray:
  """[episodes, n] bool: which episodes of a period's records ([P, n] `diverged`) diverged."""
  e = episode_length + 1
  return diverged.reshape(diverged.shape[0] // e, e, *diverged.shape[1:]).any(axis=1)


def _write_period(writer, cat: dict, xi: np.ndarray, period: int, kept: np.ndarray) -> None:
  """Appends one period's kept episodes as streams: a slot's runs of consecutive kept episodes.

  Without a divergence that is one chunk of n streams (slot-major, `step0` 0). A dropped episode
  splits its slot's stream in two; a run that starts at episode k has `step0` k·(L + 1), so its
  records keep their observation-function keys (stream id period·n + slot, step0 + j). Runs of
  equal length share a chunk (shortest first); a period with nothing kept writes nothing.

  Args:
    writer: the DatasetWriter.
    cat: the period's records, [P, n, ...] (P = episodes · (L + 1)).
    xi: [n, 6] ξ from the env params.
    period: the period index (stream ids).
    kept: [episodes, n] bool, the episodes to write.
  """
  n = xi.shape[0]
  e = cat["obs"].shape[0] // kept.shape[0]
  runs = collections.defaultdict(list)  # length in episodes -> [(slot, first episode)]
  for slot in range(n):
    k = 0
    while k < kept.shape[0]:
      if not kept[k, slot]:
        k += 1
        continue
      end = k
      while end < kept.shape[0] and kept[end, slot]:
        end += 1
      runs[end - k].append((slot, k))
      k = end
  for length in sorted(runs):
    rows = runs[length]
    take = lambda x, rows=rows, span=length * e: np.stack(
      [x[k * e : k * e + span, slot] for slot, k in rows]
    )
    writer.append(
      obs=take(cat["obs"]).astype(np.float32),
      action=take(cat["action"]).astype(np.float32),
      reward=take(cat["reward"]).astype(np.float32),
      first=take(cat["first"]),
      last=take(cat["last"]),
      xi=xi[[slot for slot, _ in rows]].astype(np.float32),
      stream=np.asarray([period * n + slot for slot, _ in rows], np.int32),
      step0=np.asarray([k * e for _, k in rows], np.int32),
    )


def load_actor(path: str, like):
  """An actor snapshot saved by `run_job`, restored into the structure of `like`."""
  data = np.load(path)
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [data[jax.tree_util.keystr(p)] for p, _ in flat])


def _rng(cc, *keys) -> np.random.Generator:
  return np.random.default_rng([cc.seed, *keys])


def _draw_period(cc, dist, domain: str, n: int, tag: tuple, period: int) -> list[scen.Scenario]:
  """The n scenarios of one period: a pure function of (seed, tag, period), so resumes agree."""
  return dist.sample(_rng(cc, *tag, period), domain, n)


def _stage_dir(root: str, *parts: str) -> str:
  path = os.path.join(root, *parts)
  os.makedirs(path, exist_ok=True)
  return path


# ---- stages -----------------------------------------------------------------------------------
def stage_v_max(cc, root: str, domains, stop) -> dict:
  """1. v_max: experts on the suite's reward at δ = 0; mean v_x over steps 200–999."""
  for domain in domains:
    if _has_metadata(root, "v_max", domain):
      continue
    if not cc.v_max.measure:
      value = {"value": float(cc.v_max.provisional[domain]), "source": "provisional (labelled)"}
      _update_metadata(root, "v_max", domain, value)
      continue
    default = [scen.Scenario(domain, 1.0, 1.0, 1.0)] * cc.behaviour.num_envs
    job = training_job(
      cc, "behaviour", f"v_max expert {domain}", domain, lambda p, s=default: s,
      reward_mode="suite",
    )  # fmt: skip
    workdir = _stage_dir(root, "v_max", domain)
    trained = run_job(cc, job, 1.0, workdir, stop, seed=cc.seed)
    evaluation = _evaluate(cc, job, trained["final_state"], 1.0, cc.v_max.episodes, workdir, stop)
    value = {
      "value": float(np.mean(evaluation["speed"])),
      "source": "measured",
      "deterministic_return": float(np.mean(evaluation["returns"])),
      "dropped_episodes": trained["dropped_episodes"] + evaluation["dropped_episodes"],
    }
    _update_metadata(root, "v_max", domain, value)
  return read_metadata(root, "v_max")


def _evaluate(
  cc,
  job: Job,
  state,
  v_max: float,
  episodes: int,
  workdir: str,
  stop,
  mode: runner_lib.RunnerMode = runner_lib.RunnerMode.DETERMINISTIC,
) -> dict:
  """Runs a trained job's agents deterministically (or randomly) for ≥ `episodes` episodes."""
  n_ep = math.ceil(episodes / job.rc.num_envs)
  ev = dataclasses.replace(
    job,
    name=f"{job.name} eval",
    mode=mode,
    periods=1,
    period_episodes=n_ep,
    init_state=state,
    writer=None,
  )
  out = run_job(cc, ev, v_max, os.path.join(workdir, f"eval_mode{mode}"), stop, seed=cc.seed + 1)
  returns = [float(np.mean(a)) if a else float("nan") for a in out["returns"][0]]
  return {"returns": returns, "speed": out["speed"][0], "dropped_episodes": out["dropped_episodes"]}


def stage_gate(cc, root: str, domains, v_max: dict, stop) -> dict:
  """2. Feasibility gate: corner specialists must reach ≥ 30% of the default one."""
  for domain in domains:
    if _has_metadata(root, "gate", domain):
      continue
    if not cc.gate.enabled:
      _update_metadata(root, "gate", domain, {"enabled": False, "shrink": 0.0, "label": "gate off"})
      continue
    shrink, history, limit = 0.0, [], max_gate_shrink()
    for k in itertools.count(1):
      lo, hi = cc.gate.alpha[0] + shrink, cc.gate.alpha[1] - shrink
      corners = [(a, b) for a in (lo, hi) for b in (lo, hi)] + [(1.0, 1.0)]
      members = [scen.Scenario(domain, a, b, cc.gate.beta) for a, b in corners]
      ret = _specialists(
        cc, root, domain, members, v_max[domain]["value"], f"gate_{shrink:.2f}", stop
      )["returns"]
      ratios = [r / ret[-1] if ret[-1] > 0 else float("nan") for r in ret[:-1]]
      ok = all(np.isfinite(x) and x >= cc.gate.threshold for x in ratios)
      history.append({"alpha": [lo, hi], "returns": ret, "ratios": ratios, "passed": ok})
      print(
        f"gate {domain}: α in [{lo:.2f}, {hi:.2f}] ratios {np.round(ratios, 3)} → "
        f"{'pass' if ok else 'fail'}"
      )
      if ok or k * cc.gate.shrink >= limit - 1e-9:  # the next step would empty (d)'s ring
        break
      shrink = round(k * cc.gate.shrink, 9)
    verdict = {"enabled": True, "passed": ok, "shrink": shrink, "history": history}
    _update_metadata(root, "gate", domain, verdict)
  return read_metadata(root, "gate")


def _specialists(cc, root: str, domain: str, members, v_max: float, tag: str, stop) -> dict:
  """Trains one specialist per scenario (vmapped) and evaluates each deterministically."""
  per_member = [m for m in members for _ in range(cc.specialist.num_envs)]
  job = training_job(
    cc,
    "specialist",
    f"specialists {domain} {tag}",
    domain,
    lambda p, s=per_member: s,
    num_agents=len(members),
  )
  workdir = _stage_dir(root, "specialists", domain, tag)
  trained = run_job(cc, job, v_max, workdir, stop, seed=cc.seed + 7)
  return _evaluate(cc, job, trained["final_state"], v_max, cc.evaluation.episodes, workdir, stop)


def stage_behaviour(cc, root: str, domains, v_max: dict, gate: dict, stop) -> None:
  """3. Behaviour SACs (ξ as input); every record streamed to behaviour/<dist>/<domain>/stream."""
  n = cc.behaviour.num_envs
  for dist_name in cc.distributions:
    for domain in domains:
      workdir = _stage_dir(root, "behaviour", dist_name, domain)
      stream_path = os.path.join(workdir, "stream")
      if dataset_complete(stream_path) and os.path.exists(os.path.join(workdir, "result.json")):
        continue
      dist = training_distribution(dist_name, gate[domain]["shrink"])
      dom_id, dist_id = specs.get_domain(domain).id, DISTRIBUTIONS.index(dist_name)
      writer = open_writer(
        stream_path,
        domain,
        "behaviour",
        cc.episode_length,
        {"distribution": dist.to_dict(), "v_max": v_max[domain], "seed": cc.seed,
         "backend": resolved_backend(cc)},
      )  # fmt: skip
      job = training_job(
        cc, "behaviour", f"behaviour {dist_name}/{domain}", domain,
        functools.partial(_draw_period, cc, dist, domain, n, (3, dom_id, dist_id)),
        xi_gate=1.0, writer=writer,
      )  # fmt: skip
      result = run_job(cc, job, v_max[domain]["value"], workdir, stop, seed=cc.seed + 3)
      writer.close({"dropped_episodes": result["dropped_episodes"]})
      result.pop("final_state")
      logs.write_json(os.path.join(workdir, "result.json"), result)


def stage_datasets(cc, root: str, domains, v_max: dict, gate: dict, stop) -> None:
  """4. The mix / medium / expert / random datasets of every (distribution, domain)."""
  for dist_name in cc.distributions:
    for domain in domains:
      behaviour_dir = os.path.join(root, "behaviour", dist_name, domain)
      stream = dataset_lib.Dataset.open(os.path.join(behaviour_dir, "stream"))
      with open(os.path.join(behaviour_dir, "result.json")) as f:
        snapshots = json.load(f)["snapshots"]
      for snap in snapshots:
        snap["path"] = os.path.join(behaviour_dir, snap["path"])
      for kind in cc.datasets.kinds:
        path = dataset_path(root, dist_name, domain, kind)
        if dataset_complete(path):
          continue
        if kind == "mix":
          tmp = path + ".partial"
          shutil.rmtree(tmp, ignore_errors=True)
          rng = _rng(cc, 4, specs.get_domain(domain).id, DISTRIBUTIONS.index(dist_name))
          dataset_lib.select_streams(
            stream, tmp, max_records=cc.datasets.records, rng=rng, info=stream.info
          )
          shutil.rmtree(path, ignore_errors=True)
          os.replace(tmp, path)
          continue
        _generate(cc, root, dist_name, domain, kind, snapshots, v_max, gate, stop)


def _generate(cc, root, dist_name, domain, kind, snapshots, v_max, gate, stop) -> None:
  """medium / expert (a behaviour snapshot, stochastic, ξ on) or random (uniform actions) data.

  A snapshot acts exactly as it was trained, with ξ as input (PROTOCOL.md). `expert` replays the
  final snapshot; `medium` the first whose deterministic evaluation return (`snapshot_return`)
  is at least half the final snapshot's.
  """
  r = cc.behaviour
  n = r.num_envs
  dist = training_distribution(dist_name, gate[domain]["shrink"])
  per_episode = cc.episode_length + 1
  episodes = math.ceil(cc.datasets.records / (n * per_episode))
  p_eps = min(cc.scenario_episodes, episodes)
  info = {"distribution": dist.to_dict(), "v_max": v_max[domain], "seed": cc.seed,
          "backend": resolved_backend(cc)}  # fmt: skip
  actor, mode, xi_gate = None, runner_lib.RunnerMode.RANDOM, 0.0
  if kind in ("medium", "expert"):
    value = lambda snap: snapshot_return(cc, root, dist_name, domain, snap, v_max, gate, stop)
    final = value(snapshots[-1])
    pick = snapshots[-1]
    if kind == "medium":
      pick = next((s for s in snapshots if value(s) >= 0.5 * final), snapshots[-1])
    info["snapshot"] = {**pick, "deterministic_return": value(pick), "final_return": final}
    actor = load_actor(pick["path"], _actor_like(cc, domain))
    mode, xi_gate = runner_lib.RunnerMode.EXPLORE, 1.0
  path = dataset_path(root, dist_name, domain, kind)
  writer = open_writer(path, domain, kind, cc.episode_length, info)
  dom_id = specs.get_domain(domain).id
  job = Job(
    name=f"{kind} {dist_name}/{domain}",
    domain=domain,
    rc=recipe(cc, "behaviour"),
    periods=math.ceil(episodes / p_eps),
    period_episodes=p_eps,
    scenarios=functools.partial(
      _draw_period, cc, dist, domain, n, (5, dom_id, DATASET_KINDS.index(kind))
    ),
    mode=mode,
    xi_gate=xi_gate,
    actor=actor,
    writer=writer,
  )
  workdir = _stage_dir(root, "generate", dist_name, domain, kind)
  result = run_job(cc, job, v_max[domain]["value"], workdir, stop, seed=cc.seed + 5)
  writer.close({"dropped_episodes": result["dropped_episodes"]})


def snapshot_return(cc, root, dist_name, domain, snap: dict, v_max, gate, stop) -> float:
  """A behaviour snapshot's deterministic evaluation return on the training distribution.

  The snapshot acts with ξ on and the tanh of its mean for `datasets.eval_episodes` episodes
  or more (whole episodes on every slot of the behaviour program), on scenarios drawn once
  from the training distribution (the same for every snapshot). The result is recorded in
  `metadata/snapshot_returns.json` under "<distribution>/<domain>" and period, and read from
  there when present.
  """
  key, period = f"{dist_name}/{domain}", str(snap["period"])
  try:
    done = read_metadata(root, "snapshot_returns").get(key, {})
  except FileNotFoundError:
    done = {}
  if period in done:
    return done[period]["deterministic_return"]
  n = cc.behaviour.num_envs
  dist = training_distribution(dist_name, gate[domain]["shrink"])
  dom_id, dist_id = specs.get_domain(domain).id, DISTRIBUTIONS.index(dist_name)
  job = Job(
    name=f"evaluate {dist_name}/{domain} period {period}",
    domain=domain,
    rc=recipe(cc, "behaviour"),
    periods=1,
    period_episodes=math.ceil(cc.datasets.eval_episodes / n),
    scenarios=functools.partial(_draw_period, cc, dist, domain, n, (8, dom_id, dist_id)),
    mode=runner_lib.RunnerMode.DETERMINISTIC,
    xi_gate=1.0,
    actor=load_actor(snap["path"], _actor_like(cc, domain)),
  )
  workdir = _stage_dir(root, "generate", dist_name, domain, "evaluate", f"period_{period}")
  out = run_job(cc, job, v_max[domain]["value"], workdir, stop, seed=cc.seed + 8)
  returns = [x for per_agent in out["returns"][0] for x in per_agent]
  entry = {
    "deterministic_return": float(np.mean(returns)) if returns else float("nan"),
    "episodes": len(returns),
    "dropped_episodes": out["dropped_episodes"],
    "training_return": snap["mean_return"],  # the episodes played before it was saved
  }
  _update_metadata(root, "snapshot_returns", key, {**done, period: entry})
  return entry["deterministic_return"]


def _actor_like(cc, domain: str):
  """Zeros shaped as one behaviour actor's params (what `load_actor` restores into)."""
  shapes = _actor_shapes(cc, domain, cc.behaviour.num_envs)
  return jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), shapes)


def _actor_shapes(cc, domain: str, n: int):
  """The shapes of one agent's actor params (agent axis first)."""
  runner = get_runner(cc, domain, recipe(cc, "behaviour"))
  members = [scen.Scenario(domain)] * n
  state = jax.eval_shape(
    runner.init, make_params(cc, domain, members, 1.0, "target_speed"), jax.random.PRNGKey(0)
  )
  return state.sac.actor


def stage_lists(cc, root: str, domains, gate: dict) -> dict:
  """5. Evaluation lists: `scenarios` per (domain, evaluation setting), from a fixed seed."""
  for domain in domains:
    if _has_metadata(root, "eval_lists", domain):
      continue
    lists = {}
    for dist_name in cc.distributions:
      for setting in EVAL_SETTINGS[dist_name]:
        if cc.evaluation.settings and setting not in cc.evaluation.settings:
          continue
        d = evaluation_distribution(setting, gate[domain]["shrink"])
        rng = np.random.default_rng(
          [cc.evaluation.seed, specs.get_domain(domain).id, sorted(_all_settings()).index(setting)]
        )
        lists[setting] = [
          dataclasses.asdict(s) for s in d.sample(rng, domain, cc.evaluation.scenarios)
        ]
    _update_metadata(root, "eval_lists", domain, lists)
  return read_metadata(root, "eval_lists")


def _all_settings() -> list[str]:
  return [s for v in EVAL_SETTINGS.values() for s in v]


def _list_members(lists: dict, domain: str) -> tuple[list[str], list[scen.Scenario]]:
  keys, members = [], []
  for setting, items in lists[domain].items():
    for i, s in enumerate(items):
      keys.append(f"{setting}/{i}")
      members.append(scen.Scenario(**s))
  return keys, members


def stage_random(cc, root: str, domains, lists: dict, v_max: dict, stop) -> dict:
  """6. The uniform-random policy's mean return on every list scenario."""
  for domain in domains:
    if _has_metadata(root, "random_returns", domain):
      continue
    keys, members = _list_members(lists, domain)
    n = cc.specialist.num_envs
    per_member = [m for m in members for _ in range(n)]
    job = Job(
      name=f"random {domain}",
      domain=domain,
      rc=recipe(cc, "specialist", len(members)),
      periods=1,
      period_episodes=math.ceil(cc.evaluation.episodes / n),
      scenarios=lambda p, s=per_member: s,
      mode=runner_lib.RunnerMode.RANDOM,
    )
    workdir = _stage_dir(root, "random", domain)
    out = run_job(cc, job, v_max[domain]["value"], workdir, stop, seed=cc.seed + 6)
    returns = [float(np.mean(a)) for a in out["returns"][0]]
    _update_metadata(root, "random_returns", domain, dict(zip(keys, returns)))
  return read_metadata(root, "random_returns")


def stage_specialists(cc, root: str, domains, lists: dict, v_max: dict, rand: dict, stop) -> dict:
  """7. One specialist per list scenario (vmapped per domain); the score's R_ref."""
  for domain in domains:
    if _has_metadata(root, "specialists", domain):
      continue
    keys, members = _list_members(lists, domain)
    out = _specialists(cc, root, domain, members, v_max[domain]["value"], "lists", stop)
    entries = {}
    for key, r_ref in zip(keys, out["returns"]):
      r_rand = rand[domain][key]
      guard = (r_ref - r_rand) <= 0.05 * abs(r_ref)  # also R_ref = R_rand = 0 (score 0/0)
      entries[key] = {"return": r_ref, "random_return": r_rand, "degenerate": bool(guard)}
      if guard:
        print(
          f"warning: {domain} {key}: the specialist's return {r_ref:.1f} is not 5% above the "
          f"random return {r_rand:.1f}; this scenario's score will be NaN (PROTOCOL.md score "
          "guard). A longer specialist budget (config.collect.specialist.env_steps) may fix it."
        )
    _update_metadata(root, "specialists", domain, entries)
  return read_metadata(root, "specialists")


def run(cc, root: str, domains: tuple[str, ...] | None = None) -> dict:
  """Runs every stage in order (skipping finished ones); returns the metadata."""
  check_inputs(cc, root)
  domains = tuple(domains or cc.domains)
  os.makedirs(root, exist_ok=True)
  logs.write_json(os.path.join(root, "collect_config.json"), cc.to_dict())
  with logs.StopFlag() as stop:
    v_max = stage_v_max(cc, root, domains, stop)
    gate = stage_gate(cc, root, domains, v_max, stop)
    stage_behaviour(cc, root, domains, v_max, gate, stop)
    stage_datasets(cc, root, domains, v_max, gate, stop)
    lists = stage_lists(cc, root, domains, gate)
    rand = stage_random(cc, root, domains, lists, v_max, stop)
    ref = stage_specialists(cc, root, domains, lists, v_max, rand, stop)
  meta = {
    "v_max": v_max,
    "gate": gate,
    "eval_lists": lists,
    "random_returns": rand,
    "specialists": ref,
  }
  return meta


def print_metadata(meta: dict) -> None:
  for domain, v in meta["v_max"].items():
    print(f"{domain:8s} v_max {v['value']:.2f} m/s ({v['source']})")
  for domain, entries in meta["specialists"].items():
    for key, e in entries.items():
      print(
        f"{domain:8s} {key:10s} specialist {e['return']:8.1f}  random {e['random_return']:8.1f}"
      )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  cli.exit_on_bad_input(check_inputs, _CONFIG.value, _DATA_DIR.value)  # one line, no traceback
  try:
    print_metadata(run(_CONFIG.value, _DATA_DIR.value))
  except StageStopped as e:  # SIGTERM / SIGUSR1: the stage's last period checkpoint is kept
    print(e)
  except BackendSwitch as e:  # refused before the job compiled anything
    sys.exit(f"error: {e}")


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so the module imports cleanly)."""
  global _CONFIG, _DATA_DIR
  _CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/collect.py", "Collection config file (preset after ':')."
  )
  _DATA_DIR = flags.DEFINE_string(
    "data_dir", "runs/data", "Where datasets and metadata are written."
  )


if __name__ == "__main__":
  cli.run(main, define_flags, "experiments/configs/collect.py")
