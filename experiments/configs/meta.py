"""Config of `python -m experiments.pretrain`: the multi-scenario world model (MrCoM).

Presets (pick one after ':'):
  meta.py            the paper-scale run: hopper + walker + cheetah `mix` data of setting (a)'s
                     training distribution, the paper's model sizes, 100k updates;
  meta.py:smoke      PROTOCOL.md's smoke preset: the whole pipeline on a 2-core CPU in minutes;
  meta.py:hopper / :walker / :cheetah   a world model per domain (Table 4).
Override any field on the command line, e.g. `--config.world_model.deter=256
--config.data.distribution=wide --config.train.num_updates=2000`; `--config.env.backend=mjx` (or
mujoco; default auto: mjx on a GPU or TPU, mujoco on a CPU) picks the collection's simulator.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import collect
from mrcom_jax.world_model import config as wm_config

PRESETS = ("default", "smoke", "hopper", "walker", "cheetah")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for meta.py: choose one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0  # experiment seed: model init, window draws, observation functions

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # datasets root; '' → <workdir>/data (collected there when missing)
  c.data.domains = collect.DOMAINS if preset in ("default", "smoke") else (preset,)
  c.data.distribution = "narrow"  # training distribution (collect.DISTRIBUTIONS)
  c.data.kind = "mix"  # behaviour dataset (Table 5 varies it: mix/medium/expert/random)
  c.data.obs_fn = "none"  # observation function (PROTOCOL.md, Table 3)
  c.data.holdout_streams = 1  # streams per dataset kept out of training for the final summary
  c.data.normalizer_records = 50_000  # the normaliser's fit: records per domain, drawn uniformly
  c.data.prefetch = 4  # batches prepared ahead by the sampler's thread
  c.data.online = False  # PROTOCOL.md's online mode (not implemented: offline datasets only)

  c.world_model = wm_config.get_config()

  c.train = ml_collections.ConfigDict()
  c.train.num_updates = 100_000
  c.train.chunk = 100  # updates between NaN checks, log lines and possible checkpoints
  c.train.checkpoint_every = 5_000  # updates (a multiple of chunk)
  c.train.max_to_keep = 3
  c.train.async_checkpoint = True
  c.train.num_devices = 0  # 0: every local device (data parallel over the mesh)
  c.train.distributed = "auto"  # jax.distributed.initialize(): 'auto' (Slurm/TPU pod), on, off

  c.eval = ml_collections.ConfigDict()
  c.eval.windows = 64  # held-out windows per domain for the final summary
  c.eval.burn_in = 5  # filtered steps before the open-loop prediction
  c.eval.horizons = (1, 15)  # open-loop prediction errors reported

  c.collect = collect.get_config("default" if preset in ("default", "smoke") else preset)

  if preset == "smoke":
    c.world_model = wm_config.tiny()  # E 33, S 16, D 32, U 8, MLP 64, k 8, T 16, B 6
    c.train.num_updates = 300
    c.train.chunk = 50
    c.train.checkpoint_every = 100
    c.eval.windows = 8
    c.collect = collect.get_config("smoke")
  # The simulation backend is the collection's (pretraining simulates nothing else):
  # `env.backend` is `collect.env.backend` under the name every entry point shares, one value.
  c.env = ml_collections.ConfigDict()
  c.env.backend = c.collect.env.get_ref("backend")
  c.lock()
  return c
