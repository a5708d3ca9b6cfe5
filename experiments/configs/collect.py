"""Config of `python -m experiments.collect`: behaviour policies, datasets, lists and references.

Presets (PROTOCOL.md, "Behaviour policies, datasets, recipes" and "The smoke preset"):
  collect.py          the paper-scale protocol (every training distribution, all four datasets);
  collect.py:smoke    setting (a) only, 4 envs per domain, 8k env steps per SAC, `mix` only;
  collect.py:hopper / :walker / :cheetah   the default restricted to one domain.
Everything made here is made once (seed 0) and shared by every experiment seed, on the simulation
backend `env.backend` (default auto: mjx on a GPU or TPU, mujoco on a CPU).
"""

from __future__ import annotations

import ml_collections

from mrcom_jax.envs import rewards

PRESETS = ("default", "smoke", "hopper", "walker", "cheetah")
DOMAINS = ("hopper", "walker", "cheetah")
# Training distributions (PROTOCOL.md, Settings): one dataset set per (domain, distribution).
#   narrow: settings (a)/(b) (δ 0.2, β [0.5, 0.8]); wide: (c)/(d) (δ 0.4, β [0.3, 0.9]);
#   *_beta0.8: Table 2 (β = 0.8 throughout); fixed: Table 5 (α = 1, β [0.5, 0.8]).
DISTRIBUTIONS = ("narrow", "wide", "narrow_beta0.8", "wide_beta0.8", "fixed")
DATASET_KINDS = ("mix", "medium", "expert", "random")


def _sac(hidden: int, batch: int, lr: float = 3e-4) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(hidden=hidden, layers=2, batch_size=batch, lr=lr))


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for collect.py: choose one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0  # everything here is made once and shared by the experiment seeds
  c.domains = DOMAINS if preset in ("default", "smoke") else (preset,)
  c.distributions = DISTRIBUTIONS
  c.mass_rule = "fixed"  # torso mass rule of the morphology edits
  c.episode_length = 1000  # control steps per episode (each episode has 1001 records)
  c.scenario_episodes = 5  # a slot keeps its scenario for this many episodes (one "period")
  c.chunk = 143  # control steps per jitted scan; must divide episode_length + 1 (= 7·11·13)

  # Simulation backend (PROTOCOL.md, Simulation backends): 'auto' (mjx on a GPU or TPU, mujoco on
  # a CPU), 'mjx' or 'mujoco'. Each stage records the one it resolved to and resumes only on it.
  c.env = ml_collections.ConfigDict()
  c.env.backend = "auto"

  # 1. v_max experts: the suite's run/hop reward at δ = 0, then deterministic episodes.
  c.v_max = ml_collections.ConfigDict()
  c.v_max.measure = True  # False: use the labelled provisional values below
  c.v_max.provisional = dict(rewards.PROVISIONAL_V_MAX)  # m/s, PROTOCOL.md's estimates
  c.v_max.episodes = 10  # deterministic evaluation episodes
  c.v_max.from_step = 200  # mean v_x over control steps from_step .. episode_length − 1

  # 2. Feasibility gate: specialists at the (α_len, α_size) corners of the widest range.
  c.gate = ml_collections.ConfigDict()
  c.gate.enabled = True
  c.gate.alpha = (0.4, 1.6)  # corners of the widest evaluated range
  c.gate.beta = 0.5
  c.gate.threshold = 0.3  # each corner needs ≥ 30% of the default-morphology specialist
  c.gate.shrink = 0.05  # step by which the widest δ and the OOD bounds shrink on failure

  # 3. Behaviour SACs (and the v_max experts, same recipe).
  c.behaviour = ml_collections.ConfigDict()
  c.behaviour.num_envs = 256
  c.behaviour.env_steps = 5_000_000  # rounded up to whole scenario periods
  c.behaviour.updates_per_iter = 32  # 1 update per 8 env steps at 256 envs
  c.behaviour.random_steps = 10_000  # env steps of uniform actions first
  c.behaviour.sac = _sac(256, 512)

  # 4. Datasets per (domain, distribution).
  c.datasets = ml_collections.ConfigDict()
  c.datasets.kinds = DATASET_KINDS
  c.datasets.records = 1_000_000  # transitions per domain and kind
  # medium: deterministic evaluation episodes per behaviour snapshot (ξ on, training distribution)
  c.datasets.eval_episodes = 10

  # 5. Evaluation lists: scenarios per (domain, evaluation setting), drawn once.
  c.evaluation = ml_collections.ConfigDict()
  c.evaluation.scenarios = 5
  c.evaluation.episodes = 10  # random and specialist returns: mean over this many episodes
  c.evaluation.seed = 2024  # the lists' own seed (fixed, independent of c.seed)
  c.evaluation.settings = ()  # evaluation settings to list; () = all of each distribution's

  # 7. Specialists: one per evaluation scenario, vmapped per domain.
  c.specialist = ml_collections.ConfigDict()
  c.specialist.num_envs = 16
  c.specialist.env_steps = 500_000
  c.specialist.updates_per_iter = 16  # 1 update per env step at 16 envs
  c.specialist.random_steps = 5_000
  c.specialist.sac = _sac(256, 256)

  if preset == "smoke":
    c.distributions = ("narrow",)  # setting (a) only
    c.v_max.measure = False  # provisional values (labelled in the metadata)
    c.gate.enabled = False  # off (labelled in the metadata)
    c.behaviour.num_envs = 4
    c.behaviour.env_steps = 8_000
    c.behaviour.updates_per_iter = 1  # 1 update per 4 env steps
    c.behaviour.random_steps = 1_000
    c.behaviour.sac = _sac(64, 64)
    c.datasets.kinds = ("mix",)
    c.evaluation.scenarios = 1
    c.evaluation.settings = ("a",)
    c.evaluation.episodes = 2
    # Same shapes as the behaviour SAC, so the smoke run compiles one program per domain.
    c.specialist.num_envs = 4
    c.specialist.env_steps = 8_000
    c.specialist.updates_per_iter = 1
    c.specialist.random_steps = 1_000
    c.specialist.sac = _sac(64, 64)
  c.lock()
  return c
