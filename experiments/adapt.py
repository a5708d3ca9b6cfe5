"""Adapts policies to target scenarios with the pretrained world model (METHOD.md, Algorithm 2).

  python -m experiments.adapt --config=experiments/configs/adapt.py --workdir=runs/adapt_a \
      --config.pretrain.workdir=runs/meta
  python -m experiments.adapt --config=experiments/configs/adapt.py:smoke --workdir=runs/smoke_adapt
  python -m experiments.adapt --config=experiments/configs/adapt.py:smoke --workdir=runs/explicit \
      --config.target.domain=hopper --config.target.alpha_len=1.3 --config.target.beta=0.6

Every (target scenario, seed) pair adapts in one jitted program (`mrcom_jax.adaptation.program`);
this loop only logs, evaluates and checkpoints.

Seeds. A run adapts one pretraining run (`--config.pretrain.workdir`, its final checkpoint unless
`--config.pretrain.allow_partial=True`). The world model owns the observation function and its
seed (PROTOCOL.md, Observation functions): every pair observes through the pretraining run's
`data.obs_fn`, keyed with the pretraining run's `seed`, so `mask_fixed` masks the dimensions the
model was trained without; `target.obs_fn` / `target.obs_seed` may only repeat them (a different
request is refused, naming both). `seeds` are adaptation seeds: each keys a pair's SAC, its
exploration and its episodes. PROTOCOL.md's experiment seed s is `--config.seeds=(s,)` on the
pretraining run of seed s (what launch/sweep.py builds); more seeds on one pretraining run (the
smoke preset, the tests) are adaptation repeats of that one world model. Rows of `results.json`
record both (`seed`, `pretrain_seed`) and the checkpoint used (`world_model_step`).

Re-running the same command with the same `--workdir` resumes from the latest checkpoint and
continues exactly; SIGTERM or SIGUSR1 saves a checkpoint and exits cleanly.

The target envs run on `--config.env.backend` (auto: mjx on a GPU or TPU, mujoco on a CPU); the
resolved backend is recorded in run_info.json and in every row of results.json (`env_backend`),
and a run resumes only on the backend it started on (its checkpoints hold that backend's states).

The workdir keeps `config.json`, `run_info.json`, `metrics.jsonl` and `tensorboard/` (SAC losses,
training returns per domain, rollout statistics, real steps/s), `checkpoints/` (orbax),
`results.json` (one row per scenario × seed with its resolved scenario, returns, normalised score
and learning curve; scores per (domain, setting, seed) and their mean ± std over seeds) and
`learning_curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app
from tqdm import tqdm

from experiments import cli, collect
from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.adaptation import results as results_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.envs import scenarios as scen
from mrcom_jax.training import checkpoint as checkpoint_lib
from mrcom_jax.training import logs
from mrcom_jax.world_model import config as wm_config
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import train as train_lib


class NonFiniteLossError(RuntimeError):
  """A SAC loss or an imagined quantity became NaN or Inf; the newest checkpoint is kept."""


# ---- configuration ----------------------------------------------------------------------------
def validate(c) -> None:
  """Raises ValueError naming the field, before anything is loaded or compiled."""
  a, r = c.adapt, c.run
  checks = [
    (len(c.seeds) > 0, "seeds", c.seeds, "needs at least one seed"),
    (a.real_steps > 0, "adapt.real_steps", a.real_steps, "must be > 0"),
    (a.updates_per_step > 0, "adapt.updates_per_step", a.updates_per_step, "must be > 0"),
    (0 <= a.real_ratio <= 1, "adapt.real_ratio", a.real_ratio, "must be in [0, 1]"),
    (a.update_after >= 2, "adapt.update_after", a.update_after, "must be ≥ 2"),
    (c.eval.episodes > 0, "eval.episodes", c.eval.episodes, "must be > 0"),
    (c.target.scenarios > 0, "target.scenarios", c.target.scenarios, "must be > 0"),
    (c.target.episode_length > 0, "target.episode_length", c.target.episode_length, "must be > 0"),
    (r.chunk > 0, "run.chunk", r.chunk, "must be > 0"),
    (all(s >= 0 for s in c.seeds), "seeds", tuple(c.seeds), "must all be ≥ 0"),
    (
      len(set(c.seeds)) == len(c.seeds), "seeds", tuple(c.seeds),
      "has a seed twice: list each once",
    ),
    (c.target.obs_seed >= -1, "target.obs_seed", c.target.obs_seed, "must be ≥ -1 (-1: the run's)"),
    (
      len(c.target.domains) > 0 or bool(c.target.domain),
      "target.domains",
      tuple(c.target.domains),
      "needs a domain (or an explicit --config.target.domain)",
    ),
    (a.random_steps >= 0, "adapt.random_steps", a.random_steps, "must be ≥ 0"),
    (a.rollout.every > 0, "adapt.rollout.every", a.rollout.every, "must be > 0"),
    (a.rollout.start >= 0, "adapt.rollout.start", a.rollout.start, "must be ≥ 0"),
    (a.rollout.starts > 0, "adapt.rollout.starts", a.rollout.starts, "must be > 0"),
    (a.rollout.horizon > 0, "adapt.rollout.horizon", a.rollout.horizon, "(H) must be > 0"),
    (a.rollout.keep_rounds > 0, "adapt.rollout.keep_rounds", a.rollout.keep_rounds, "must be > 0"),
    (a.finetune.updates > 0, "adapt.finetune.updates", a.finetune.updates, "must be > 0"),
    (a.finetune.batch_size >= 0, "adapt.finetune.batch_size", a.finetune.batch_size, "must be ≥ 0"),
    (a.finetune.seq_len >= 0, "adapt.finetune.seq_len", a.finetune.seq_len, "must be ≥ 0"),
    (r.max_to_keep > 0, "run.max_to_keep", r.max_to_keep, "must be > 0"),
    (
      c.env.backend in env_lib.BACKENDS, "env.backend", c.env.backend,
      f"must be one of {env_lib.BACKENDS}",
    ),
  ]  # fmt: skip
  for name in ("hidden", "layers", "batch_size", "actor_lr", "critic_lr", "alpha_lr"):
    checks.append((a.sac[name] > 0, f"adapt.sac.{name}", a.sac[name], "must be > 0"))
  gamma = a.sac.discount
  checks.append((0 <= gamma < 1, "adapt.sac.discount", gamma, "must be in [0, 1)"))
  if c.target.domain:  # an explicit target (PROTOCOL.md: α > 0, v* = β · v_max with β ≤ 1)
    t = c.target
    checks += [(t.alpha_len > 0, "target.alpha_len", t.alpha_len, "must be > 0"),
               (t.alpha_size > 0, "target.alpha_size", t.alpha_size, "must be > 0"),
               (0 < t.beta <= 1, "target.beta", t.beta, "must be in (0, 1]")]  # fmt: skip
  multiple = f"must be a multiple of run.chunk={r.chunk}"
  sizes = (("adapt.real_steps", a.real_steps), ("run.checkpoint_every", r.checkpoint_every))
  for field, value in sizes:
    checks.append((value % max(r.chunk, 1) == 0, field, value, multiple))
  every = c.eval.every
  checks.append((every > 0 and every % max(r.chunk, 1) == 0, "eval.every", every,
                 f"must be a positive multiple of run.chunk={r.chunk}"))  # fmt: skip
  for ok, field, value, what in checks:
    if not ok:
      raise ValueError(f"config.{field}={value!r} {what}")
  domains = (c.target.domain,) if c.target.domain else tuple(c.target.domains)
  for d in domains:
    if d not in collect.DOMAINS:
      raise ValueError(f"config.target domain {d!r} is unknown: choose from {collect.DOMAINS}")
  if not c.target.domain and c.target.setting not in collect._all_settings():
    raise ValueError(
      f"config.target.setting={c.target.setting!r}: choose one of {collect._all_settings()}"
    )
  if c.target.obs_fn and c.target.obs_fn not in obs_functions.OBS_FUNCTIONS:  # '': the run's
    raise ValueError(
      f"config.target.obs_fn={c.target.obs_fn!r}: choose one of {obs_functions.OBS_FUNCTIONS}"
    )
  if c.adapt.finetune_world_model and not c.adapt.model_rollouts:
    raise ValueError(
      "config.adapt.finetune_world_model=True needs config.adapt.model_rollouts=True (a model "
      "that imagines nothing has nothing to fine-tune for)"
    )
  wm_config.resolve(c.world_model)  # its own checks: every size ≥ 1, scales, mv_mode


def check_inputs(c, workdir: str | None = None) -> None:
  """Everything `adapt` can refuse before it writes, loads or compiles anything: the config
  (`validate`), the pretraining run (its config.json and metadata, a checkpoint, and the same
  world model as `config.world_model`, read from its config.json without restoring anything)
  and, given the run's `workdir`, a resume on another simulation backend (`check_resume`).

  Raises:
    ValueError, FileNotFoundError: one line naming the field, the value and the fix
      (CheckpointMismatchError, a ValueError, for a run of another world model).
  """
  validate(c)
  if workdir is not None:
    check_resume(c, workdir)
  pre = open_pretrained(c)
  check_pretrained(c, pre)  # observation function and seed, episode length, a finished run
  if not c.adapt.model_rollouts:
    return  # the plain-SAC control never loads the world model
  ckpt_dir = os.path.join(pre.workdir, "checkpoints")
  if not any(d.isdigit() for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ())):
    raise FileNotFoundError(
      f"config.pretrain.workdir={c.pretrain.workdir!r} has no checkpoint in {ckpt_dir}: run "
      f"`python -m experiments.pretrain --workdir={c.pretrain.workdir}` to the end first"
    )
  differences = cli.world_model_differences(pre.config["world_model"], c.world_model)
  if differences:
    named = "; ".join(f"config.world_model.{k}: checkpoint {a!r}, this run {b!r}"
                      for k, a, b in differences)  # fmt: skip
    fix = " ".join(f"--config.world_model.{k}={a}" for k, a, _ in differences)
    raise checkpoint_lib.CheckpointMismatchError(
      f"config.pretrain.workdir={c.pretrain.workdir!r} holds another world model ({named}): "
      f"pass {fix}, or point config.pretrain.workdir at a run of this world model"
    )


def check_resume(c, workdir: str) -> None:
  """Refuses to resume `workdir` on another simulation backend than its checkpoints were made on
  (they hold that backend's env states: `mjx.Data` or the host's exact MuJoCo state), as
  recorded in its run_info.json.

  Raises:
    ValueError: one line naming both backends and the fix.
  """
  ckpt_dir, info = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "run_info.json")
  if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    return  # nothing to resume
  if not os.path.exists(info):
    return
  with open(info) as f:
    runs = json.load(f)["invocations"]
  saved = next((r["env_backend"] for r in reversed(runs) if "env_backend" in r), None)
  backend = env_lib.resolve_backend(c.env.backend)
  if saved is not None and saved != backend:
    raise ValueError(
      f"{workdir} adapted on the {saved!r} simulation backend and this run asks for {backend!r} "
      f"(config.env.backend={c.env.backend!r}): its checkpoints hold {saved} env states; resume "
      f"it with --config.env.backend={saved}, or adapt into a new --workdir"
    )


def make_spec(c, domains: tuple[tuple[str, int], ...], behaviour_sac) -> program_lib.AdaptSpec:
  a = c.adapt
  return program_lib.AdaptSpec(
    domains=domains,
    context_len=c.world_model.context_len,
    real_steps=a.real_steps,
    chunk=c.run.chunk,
    updates_per_step=a.updates_per_step,
    sac=sac_lib.SACConfig(
      hidden=(a.sac.hidden,) * a.sac.layers,
      lr=a.sac.alpha_lr,
      actor_lr=a.sac.actor_lr,
      critic_lr=a.sac.critic_lr,
      batch_size=a.sac.batch_size,
      discount=a.sac.discount,
    ),
    real_ratio=a.real_ratio if a.model_rollouts else 1.0,
    model_rollouts=a.model_rollouts,
    rollout_every=a.rollout.every,
    rollout_start=a.rollout.start,
    rollout_starts=a.rollout.starts,
    horizon=a.rollout.horizon,
    keep_rounds=a.rollout.keep_rounds,
    prompt=a.prompt,
    behaviour_sac=behaviour_sac,
    finetune_updates=a.finetune.updates if a.finetune_world_model else 0,
    finetune_batch=a.finetune.batch_size or c.world_model.batch_size,
    finetune_seq_len=a.finetune.seq_len or c.world_model.seq_len,
  )


# ---- the pretraining run: its config, data, world model and behaviour experts -----------------
@dataclasses.dataclass
class Pretrained:
  """What adaptation takes from a pretraining run."""

  workdir: str
  config: dict  # the pretraining run's config.json
  data_dir: str
  metadata: dict  # v_max, eval_lists, random_returns, specialists (those present)

  @property
  def seed(self) -> int:
    """The pretraining run's experiment seed (its observation functions' key)."""
    return int(self.config["seed"])

  @property
  def obs_fn(self) -> str:
    """The observation function the world model was trained on."""
    return self.config["data"]["obs_fn"]

  @property
  def final_step(self) -> int:
    """The update a finished pretraining run saves last."""
    return int(self.config["train"]["num_updates"])

  @property
  def episode_length(self) -> int:
    """Control steps per episode of the collection that measured R_rand and R_ref."""
    return int(self.config["collect"]["episode_length"])


def observation(c, pre: Pretrained) -> tuple[str, int]:
  """The observation function and its seed: the world model's (PROTOCOL.md, Observation
  functions). `target.obs_fn` ('' = the world model's) and `target.obs_seed` (-1 = the world
  model's) may only repeat them.

  Raises:
    ValueError: another function or seed was asked for; the message names both.
  """
  t = c.target
  asked = [f"config.target.obs_fn={t.obs_fn!r}"] if t.obs_fn and t.obs_fn != pre.obs_fn else []
  if t.obs_seed >= 0 and t.obs_seed != pre.seed:
    asked.append(f"config.target.obs_seed={t.obs_seed}")
  if asked:
    raise ValueError(
      f"{' and '.join(asked)} asks for another observation function or seed than the world "
      f"model's: the pretraining run at {pre.workdir} was trained with "
      f"data.obs_fn={pre.obs_fn!r} keyed by seed={pre.seed}, and the function and its seed "
      "belong to the world model (PROTOCOL.md); drop the override (target.obs_fn='' and "
      "target.obs_seed=-1 take the run's), or adapt a run pretrained with "
      "--config.data.obs_fn=... --config.seed=..."
    )
  return pre.obs_fn, pre.seed


def check_reference_length(c, pre: Pretrained, targets: dict) -> None:
  """R_rand and R_ref from the metadata are returns of `collect.episode_length`-step episodes:
  refuse targets that have them when `target.episode_length` differs."""
  if c.target.episode_length == pre.episode_length:
    return
  for name in ("random_returns", "specialists"):
    listed = pre.metadata.get(name, {})
    for domain, ts in targets.items():
      hit = [t.label for t in ts if t.label in listed.get(domain, {})]
      if hit:
        raise ValueError(
          f"config.target.episode_length={c.target.episode_length} but the {name} of {domain} "
          f"{hit[0]} in {pre.data_dir}/metadata were measured on {pre.episode_length}-step "
          f"episodes (collect.episode_length of {pre.workdir}): pass "
          f"--config.target.episode_length={pre.episode_length}, or adapt an explicit target "
          "(--config.target.domain=...), whose random return is measured at its own length"
        )


def check_final(c, pre: Pretrained, step: int) -> None:
  """Refuses a checkpoint before the pretraining run's last update unless
  `pretrain.allow_partial`."""
  if step < pre.final_step and not c.pretrain.allow_partial:
    raise ValueError(
      f"the newest pretraining checkpoint in {pre.workdir}/checkpoints is update {step} of "
      f"train.num_updates={pre.final_step}: the run has not finished. Finish it (rerun python "
      f"-m experiments.pretrain --workdir={pre.workdir}), or pass "
      f"--config.pretrain.allow_partial=True to adapt with update {step}"
    )


def check_pretrained(c, pre: Pretrained) -> None:
  """What adaptation refuses in the pretraining run before it loads or compiles anything: another
  observation function or seed, R_rand/R_ref of another episode length, an unfinished run (by
  the newest step saved; the restored step is checked again)."""
  observation(c, pre)
  check_reference_length(c, pre, resolve_targets(c, pre))
  ckpt_dir = os.path.join(pre.workdir, "checkpoints")
  saved = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  if c.adapt.model_rollouts and saved:
    check_final(c, pre, max(saved))


def open_pretrained(c) -> Pretrained:
  workdir = os.path.abspath(c.pretrain.workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"no pretraining run at {workdir} (config.json is missing): run `python -m "
      f"experiments.pretrain --workdir={c.pretrain.workdir}` first, or point "
      "--config.pretrain.workdir at an existing run"
    )
  with open(path) as f:
    config = json.load(f)
  data_dir = c.data_dir or config["data"]["dir"] or os.path.join(workdir, "data")
  metadata = {}
  for name in ("v_max", "eval_lists", "random_returns", "specialists"):
    try:
      metadata[name] = collect.read_metadata(data_dir, name)
    except FileNotFoundError:
      if name in ("v_max", "eval_lists"):
        raise
  return Pretrained(workdir, config, data_dir, metadata)


def load_world_model(c, pre: Pretrained):
  """The pretraining run's latest `TrainState` (world model, values, optimiser states), on this
  device, with the update it was saved at.

  Raises:
    CheckpointMismatchError: the checkpoint is not shaped like `config.world_model`; the message
      names the leaves and the config fields that differ.
    ValueError: the restored checkpoint is not the run's last update (`train.num_updates`) and
      `pretrain.allow_partial` is off.
  """
  template = jax.eval_shape(
    lambda: train_lib.init_train_state(c.world_model, jax.random.PRNGKey(0))
  )
  ckpt_dir = os.path.join(pre.workdir, "checkpoints")
  with checkpoint_lib.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    restored = ckpt.restore_latest(
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), template),
      config={"world_model": c.world_model.to_dict()},
    )
  if restored is None:
    raise FileNotFoundError(
      f"no pretraining checkpoint in {ckpt_dir}: run `python -m experiments.pretrain "
      f"--workdir={pre.workdir}` first"
    )
  step, state, _ = restored
  check_final(c, pre, step)
  return step, jax.device_put(state)


def behaviour_sac_config(pre: Pretrained) -> sac_lib.SACConfig:
  b = pre.config["collect"]["behaviour"]["sac"]
  return sac_lib.SACConfig(hidden=(b["hidden"],) * b["layers"], batch_size=b["batch_size"])


def load_behaviour_actor(pre: Pretrained, domain: str, bcfg: sac_lib.SACConfig):
  """The behaviour SAC's final actor (the expert that the prompt runs), as numpy params."""
  dist = pre.config["data"]["distribution"]
  root = os.path.join(pre.data_dir, "behaviour", dist, domain)
  with open(os.path.join(root, "result.json")) as f:
    snapshot = json.load(f)["snapshots"][-1]
  d = specs.get_domain(domain)
  shapes = jax.eval_shape(lambda: sac_lib.init(bcfg, jax.random.PRNGKey(0), d.obs_dim, d.act_dim))
  like = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes.actor)
  return collect.load_actor(os.path.join(root, snapshot["path"]), like)


# ---- targets ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
  """One target scenario: its label in the evaluation list ('a/0') or 'explicit'."""

  scenario: scen.Scenario
  setting: str
  label: str
  index: int  # position in its list (1000 for an explicit target)


def resolve_targets(c, pre: Pretrained) -> dict[str, list[Target]]:
  """{domain: targets} in pair order, from the list of `target.setting` or the explicit one."""
  t = c.target
  if t.domain:
    s = scen.Scenario(t.domain, float(t.alpha_len), float(t.alpha_size), float(t.beta))
    return {t.domain: [Target(s, "explicit", "explicit", 1000)]}
  out = {}
  for domain in t.domains:
    lists = pre.metadata["eval_lists"].get(domain, {})
    if t.setting not in lists:
      raise ValueError(
        f"config.target.setting={t.setting!r} has no evaluation list for {domain} in "
        f"{pre.data_dir}/metadata/eval_lists.json (it has {sorted(lists)}); collect it or give "
        "an explicit target (--config.target.domain=...)"
      )
    items = lists[t.setting][: t.scenarios]
    if len(items) < t.scenarios:
      raise ValueError(
        f"config.target.scenarios={t.scenarios} but the {domain} list of setting "
        f"{t.setting!r} holds {len(items)}"
      )
    out[domain] = [
      Target(scen.Scenario(**s), t.setting, f"{t.setting}/{i}", i) for i, s in enumerate(items)
    ]
  return out


@dataclasses.dataclass(frozen=True)
class Pair:
  domain: str
  target: Target
  seed: int


def make_pairs(c, targets: dict[str, list[Target]]) -> list[Pair]:
  """Domain-major, then scenario, then seed (the program's pair order)."""
  return [Pair(d, t, int(s)) for d, ts in targets.items() for t in ts for s in c.seeds]


def pair_key(pair: Pair) -> np.ndarray:
  """A pair's own key: a function of (seed, domain, scenario) only, whatever else runs."""
  key = jax.random.PRNGKey(pair.seed)
  key = jax.random.fold_in(key, specs.get_domain(pair.domain).id)
  return np.asarray(jax.random.fold_in(key, pair.target.index))


def env_params(c, pre: Pretrained, domain: str, pairs: list[Pair]) -> env_lib.EnvParams:
  """The domain's sub-batch: v* = β · v_max from the metadata; the world model's observation
  function and seed key (`observation`), one obs-function stream per pair."""
  env = env_lib.make_env(
    domain, mass_rule=pre.config["collect"]["mass_rule"], backend=c.env.backend
  )  # the program's backend (`adapt`)
  obs_fn, obs_seed = observation(c, pre)
  params = env.make_params(
    [p.target.scenario for p in pairs], obs_fn=obs_fn, seed=obs_seed,
    episode_length=c.target.episode_length,
  )  # fmt: skip
  v_max = pre.metadata["v_max"][domain]["value"]
  stream = [1_000_000 + 10_000 * p.seed + p.target.index for p in pairs]
  return params.replace(
    v_target=np.asarray([p.target.scenario.beta * v_max for p in pairs], np.float32),
    stream=np.asarray(stream, np.int32),
  )


# ---- the run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class AdaptRun:
  """What `adapt` returns."""

  state: program_lib.AdaptState
  real_steps: int
  stopped_by: str | None
  results: dict | None
  program: program_lib.Program  # the compiled program and its data, to run or evaluate further
  params: program_lib.AdaptParams
  workdir: str


def _check_finite(out, step: int, chunk: int, ckpt_step, where) -> None:
  for group in (out.sac, out.model):
    for name, values in group.items():
      values = np.asarray(values)
      bad = ~np.isfinite(values)
      if bad.any():
        i = int(np.argwhere(bad)[0][0])
        kept = (
          f"the newest checkpoint (real step {ckpt_step}) is kept in {where} (its leaf digests "
          "and finiteness are checked when it is restored)"
          if ckpt_step is not None
          else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
          f"{name!r} became {values[bad][0]} at real step "
          f"{step - chunk + i + 1}. Adaptation stopped; {kept}. Lower the SAC learning rates "
          "(--config.adapt.sac.actor_lr / critic_lr), shorten the rollouts "
          "(--config.adapt.rollout.horizon), or check the world model's checkpoint; rerunning "
          "the same command resumes from that checkpoint."
        )


def _chunk_scalars(out, pairs: list[Pair], elapsed: float, chunk: int) -> dict[str, float]:
  sac, model = jax.tree.map(np.asarray, (out.sac, out.model))
  done = sac["updates"] > 0
  scalars = {}
  if done.any():
    for name in program_lib.SAC_METRICS:
      scalars[f"sac/{name}"] = float(sac[name][done].mean())
  rounds = model["rounds"] > 0
  if rounds.any():
    scalars["model/imagined_reward"] = float(model["imagined_reward"][rounds].mean())
    scalars["model/imagined_obs_absmax"] = float(model["imagined_obs_absmax"][rounds].max())
    if "finetune_loss" in model:
      scalars["model/finetune_loss"] = float(model["finetune_loss"][rounds].mean())
  last, ret = np.asarray(out.last), np.asarray(out.episode_return)
  for d in dict.fromkeys(p.domain for p in pairs):
    cols = [i for i, p in enumerate(pairs) if p.domain == d]
    finished = ret[:, cols][last[:, cols]]
    if finished.size:
      scalars[f"train_return/{d}"] = float(finished.mean())
  scalars["real_steps_per_s"] = chunk / elapsed
  scalars["sac_updates_per_s"] = float(sac["updates"].sum()) / elapsed
  return scalars


def adapt(c, workdir: str, *, stop_after: int | None = None, verbose: bool = True) -> AdaptRun:
  """Runs (or resumes) the adaptation of every (target, seed) pair; returns results.

  Args:
    c: an `adapt.py` config.
    workdir: run directory.
    stop_after: stop (with a checkpoint) once this many real steps are done, as if pre-empted.
    verbose: progress bar and printed table.
  """
  check_inputs(c, workdir)  # bad input fails here, before anything is written
  os.makedirs(workdir, exist_ok=True)
  backend = env_lib.resolve_backend(c.env.backend)
  pre = open_pretrained(c)
  targets = resolve_targets(c, pre)
  pairs = make_pairs(c, targets)
  domains = tuple((d, sum(p.domain == d for p in pairs)) for d in targets)
  bcfg = behaviour_sac_config(pre)
  spec = make_spec(c, domains, bcfg)
  world_model, wm_state, wm_step = None, None, None
  if spec.model_rollouts:
    world_model = model_lib.make_world_model(c.world_model)
    wm_step, wm_state = load_world_model(c, pre)
  obs_fn, obs_seed = observation(c, pre)
  logs.write_run_info(
    workdir, c, {
      "pairs": len(pairs), "world_model_step": wm_step, "world_model_final_step": pre.final_step,
      "pretrain_seed": pre.seed, "obs_fn": obs_fn, "obs_seed": obs_seed, "data_dir": pre.data_dir,
      "env_backend": backend,
    },
  )  # fmt: skip
  program = program_lib.make_program(
    spec, world_model, pre.config["collect"]["mass_rule"], c.world_model, backend=backend
  )
  params = program_params(c, pre, program, pairs, wm_state)
  info = pairs_info(pairs, pre, wm_step, backend)
  state = program.init(params)
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=c.run.max_to_keep,
    async_save=c.run.async_checkpoint,
  )
  restored = ckpt.restore_latest(state, config=c.to_dict())
  if restored is not None:
    step, state, meta = restored
    history = meta["history"]
    if meta.get("world_model_step", wm_step) != wm_step:
      raise ValueError(
        f"{workdir} adapted from update {meta['world_model_step']} of {pre.workdir}, whose "
        f"newest checkpoint is now update {wm_step}: resume into a new --workdir"
      )
    print(f"resuming from the checkpoint at real step {step}")
  else:
    step, history = 0, {"steps": [], "returns": []}
    state = program.prompt(state, params)
    state, history["random_returns"] = random_returns(c, pre, program, state, params, pairs)
    ckpt.save(0, state, {"real_steps": 0, "history": history, "config": c.to_dict(),
                         "world_model_step": wm_step})  # fmt: skip
  last_ckpt = step
  writer = logs.MetricWriter(workdir, resume_step=step)
  total, chunk = c.adapt.real_steps, c.run.chunk
  stopped_by = None
  bar = tqdm(total=total, initial=step, unit="step", disable=not verbose, dynamic_ncols=True)
  try:
    with logs.StopFlag() as stop:
      while step < total:
        t0 = time.perf_counter()
        state, out = program.run(state, params, program_lib.AdaptMode.TRAIN)
        out = jax.device_get(out)
        elapsed = time.perf_counter() - t0
        step += chunk
        _check_finite(out, step, chunk, last_ckpt, ckpt.directory)
        scalars = _chunk_scalars(out, pairs, elapsed, chunk)
        if step % c.eval.every == 0 or step == total:
          state, returns = program.evaluate(state, params, c.eval.episodes, tag=step)
          history["steps"].append(step)
          history["returns"].append(returns.tolist())
          rows = results_lib.rows(info, history, pre.metadata)
          for d in dict.fromkeys(p.domain for p in pairs):
            mine = [r for r in rows if r["domain"] == d]
            scalars[f"eval_return/{d}"] = float(np.mean([r["return"] for r in mine]))
            scores = [r["score"] for r in mine if r["score"] is not None]
            if scores:
              scalars[f"eval_score/{d}"] = float(np.mean(scores))
        writer.write(step, scalars)
        bar.update(chunk)
        bar.set_postfix(steps_per_s=f"{scalars['real_steps_per_s']:.0f}")
        stopped_by = stop.reason(step, stop_after)
        if step % c.run.checkpoint_every == 0 or step == total or stopped_by:
          meta = {"real_steps": step, "history": history, "config": c.to_dict()}
          ckpt.save(step, state, dict(meta, world_model_step=wm_step))
          last_ckpt = step
        if stopped_by:
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  if stopped_by:
    print(f"stopped by {stopped_by} at real step {step}; checkpoint saved, rerun to resume")
    return AdaptRun(state, step, stopped_by, None, program, params, workdir)
  results = results_lib.summarise(c.to_dict(), info, history, pre.metadata)
  logs.write_json(os.path.join(workdir, "results.json"), results)
  results_lib.plot_curves(results, os.path.join(workdir, "learning_curves.png"))
  if verbose:
    results_lib.print_table(results)
  return AdaptRun(state, step, None, results, program, params, workdir)


def program_params(c, pre: Pretrained, program, pairs: list[Pair], wm_state):
  """The program's data for `pairs`: env sub-batches with the world model's observation function
  and seed, pair keys, the world model (`wm_state`, or None), the behaviour experts' actors."""
  domains = [d for d, _ in program.spec.domains]
  by_domain = {d: [p for p in pairs if p.domain == d] for d in domains}
  obs_fn, _ = observation(c, pre)
  return program.make_params(
    [env_params(c, pre, d, by_domain[d]) for d in domains],
    np.stack([pair_key(p) for p in pairs]),
    [obs_functions.obs_fn_id(obs_fn)] * len(pairs),
    None if wm_state is None else wm_state.variables,
    [load_behaviour_actor(pre, d, program.spec.behaviour_sac) for d in domains]
    if program.spec.prompt
    else None,
    world_model_state=wm_state,
    random_steps=c.adapt.random_steps,
    update_after=c.adapt.update_after,
  )


def pairs_info(
  pairs: list[Pair], pre: Pretrained, world_model_step: int | None, backend: str
) -> list[dict]:
  """One dict per pair: domain, setting, label, scenario parameters, adaptation seed, what it
  adapted (the pretraining run's seed and observation function, the checkpoint's update) and
  the simulation backend its target env ran on (resolved)."""
  return [
    {
      "domain": p.domain,
      "setting": p.target.setting,
      "label": p.target.label,
      "scenario": dataclasses.asdict(p.target.scenario),
      "seed": p.seed,
      "pretrain_seed": pre.seed,
      "obs_fn": pre.obs_fn,
      "world_model_step": world_model_step,
      "env_backend": backend,
    }
    for p in pairs
  ]


def random_returns(c, pre, program, state, params, pairs):
  """R_rand per pair: the metadata's (PROTOCOL.md) where the scenario is listed, else measured.

  Returns:
    (the state, as given: `evaluate` consumes its argument; {'values', 'source'}).
  """
  listed = pre.metadata.get("random_returns", {})
  values = [listed.get(p.domain, {}).get(p.target.label) for p in pairs]
  source = ["metadata" if v is not None else "measured" for v in values]
  if None in values:
    state, measured = program.evaluate(state, params, c.eval.episodes, random=True, tag=0)
    values = [float(m) if v is None else v for v, m in zip(values, measured)]
  return state, {"values": values, "source": source}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  c, workdir = RUN_FLAGS.config.value, RUN_FLAGS.workdir.value
  cli.exit_on_bad_input(check_inputs, c, workdir)  # one line, no traceback
  adapt(c, workdir)


RUN_FLAGS = cli.RunFlags(
  "experiments/configs/adapt.py",
  "Adaptation config file (preset after ':').",
  "runs/adapt",
  "Run directory: checkpoints, metrics, config, results, plot.",
)
define_flags = RUN_FLAGS.define  # launchers: define_flags(flag_values, sys_argv)


if __name__ == "__main__":
  cli.run(main, define_flags, "experiments/configs/adapt.py")
