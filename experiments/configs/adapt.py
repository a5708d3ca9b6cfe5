"""Config of `python -m experiments.adapt`: scenario adaptation (METHOD.md, Algorithm 2).

Presets (pick one after ':'):
  adapt.py          the paper protocol: every domain, the 5 list scenarios of setting (a),
                    5 seeds, 100k real steps, 10 SAC updates per step, 95% imagined data;
  adapt.py:smoke    PROTOCOL.md's smoke preset: 3 domains × 1 scenario × 2 seeds, 3k real steps.
Targets come from an evaluation setting's list (`--config.target.setting=d`) or are given
explicitly: `--config.target.domain=hopper --config.target.alpha_len=1.3
--config.target.alpha_size=0.8 --config.target.beta=0.6`. The world model is the latest
checkpoint of `--config.pretrain.workdir`, which must be its last update
(`--config.pretrain.allow_partial=True` takes an unfinished run's); `config.world_model` must
describe it (the smoke preset's is `tiny()`, as in `meta.py:smoke`). The observation function
and its seed are the pretraining run's (Table 3: adapt a run pretrained with that function).
"""

from __future__ import annotations

import ml_collections

from mrcom_jax.world_model import config as wm_config

PRESETS = ("default", "smoke")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for adapt.py: choose one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  # adaptation seeds (SAC, exploration, episodes); each adapts every target (one pair each). The
  # paper's seed s is seeds=(s,) on the pretraining run of seed s (experiments/adapt.py, Seeds).
  c.seeds = (0, 1, 2, 3, 4)

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.workdir = "runs/meta"  # the pretraining run (its final checkpoint, config, data)
  c.pretrain.allow_partial = False  # True: adapt an unfinished run's newest checkpoint
  c.data_dir = ""  # metadata and behaviour experts; '' → the pretraining run's data directory

  c.world_model = wm_config.get_config()  # must match the checkpoint (checked, with a message)

  # Simulation backend of the target envs: 'auto' (mjx on a GPU or TPU, mujoco on a CPU), 'mjx'
  # or 'mujoco'; recorded in run_info.json and every result row; a run resumes only on its own.
  c.env = ml_collections.ConfigDict()
  c.env.backend = "auto"

  c.target = ml_collections.ConfigDict()
  c.target.setting = "a"  # evaluation setting whose list to adapt to: a, b, c, d, a@0.8, fixed
  c.target.domains = ("hopper", "walker", "cheetah")
  c.target.scenarios = 5  # the first n scenarios of each domain's list
  c.target.domain = ""  # an explicit target instead of a list ('' = use the list)
  c.target.alpha_len = 1.0  # explicit target only
  c.target.alpha_size = 1.0
  c.target.beta = 0.5
  # The observation function and its seed belong to the world model (PROTOCOL.md): '' and -1
  # take the pretraining run's data.obs_fn and seed; any other request must repeat them.
  c.target.obs_fn = ""
  c.target.obs_seed = -1
  c.target.episode_length = 1000  # control steps per real episode

  c.adapt = ml_collections.ConfigDict()
  c.adapt.real_steps = 100_000  # per (scenario, seed)
  c.adapt.random_steps = 5_000  # uniform actions first [METHOD.md choice]
  c.adapt.update_after = 256  # real transitions before the first SAC update
  c.adapt.updates_per_step = 10
  c.adapt.real_ratio = 0.05  # fraction of every SAC batch from real data
  c.adapt.model_rollouts = True  # False: plain SAC on real data (control)
  c.adapt.prompt = True  # False: the context holds only the target's own recent transitions
  c.adapt.finetune_world_model = False  # fine-tune the model on the target's data (own row)
  c.adapt.finetune = ml_collections.ConfigDict()  # [choice]: the paper gives no numbers
  c.adapt.finetune.updates = 25  # model updates per pair before every rollout round
  c.adapt.finetune.batch_size = 0  # windows per update; 0 → world_model.batch_size
  c.adapt.finetune.seq_len = 0  # T per window; 0 → world_model.seq_len
  c.adapt.rollout = ml_collections.ConfigDict()
  c.adapt.rollout.every = 250  # real steps between rounds
  c.adapt.rollout.start = 250  # real steps before the first round
  c.adapt.rollout.starts = 4096  # start states per round
  c.adapt.rollout.horizon = 5  # H
  c.adapt.rollout.keep_rounds = 5  # rounds in the model buffer
  c.adapt.sac = ml_collections.ConfigDict()
  c.adapt.sac.hidden = 256
  c.adapt.sac.layers = 2
  c.adapt.sac.batch_size = 256
  c.adapt.sac.actor_lr = 1e-4
  c.adapt.sac.critic_lr = 2e-4
  c.adapt.sac.alpha_lr = 3e-4  # temperature (the paper gives none; SAC's usual value)
  c.adapt.sac.discount = 0.99

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10_000  # real steps between evaluations (a multiple of run.chunk)
  c.eval.episodes = 10  # deterministic episodes per evaluation

  c.run = ml_collections.ConfigDict()
  c.run.chunk = 250  # real steps per jitted scan (log lines and possible checkpoints)
  c.run.checkpoint_every = 5_000  # real steps (a multiple of run.chunk)
  c.run.max_to_keep = 2
  c.run.async_checkpoint = True

  if preset == "smoke":
    c.seeds = (0, 1)
    c.pretrain.workdir = "runs/smoke"
    c.world_model = wm_config.tiny()
    c.target.scenarios = 1
    c.adapt.real_steps = 3_000
    c.adapt.random_steps = 500
    c.adapt.update_after = 64
    c.adapt.updates_per_step = 2
    c.adapt.real_ratio = 0.5
    c.adapt.rollout.starts = 256
    c.adapt.finetune.updates = 5
    c.adapt.sac.hidden = 64
    c.adapt.sac.batch_size = 64
    c.eval.every = 1_000
    c.eval.episodes = 2
    c.run.checkpoint_every = 500
  c.lock()
  return c
