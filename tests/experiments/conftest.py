"""Session fixtures of the pipeline tests: one small collect + pretrain run shared by all of them.

`pipeline_config()` is the smoke preset with shorter episodes (50 control steps, 51 records) and
budgets, so a 2-core CPU runs every stage of PROTOCOL.md's pipeline (behaviour SACs, the `mix`
dataset, evaluation lists, random returns, specialists, pretraining, checkpoints, summary) in a
few minutes, most of it compiling one runner program per domain and one world-model update.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from experiments import adapt, pretrain
from experiments.configs import adapt as adapt_presets
from experiments.configs import meta

EPISODE = 50  # control steps per episode in the pipeline tests (51 records)


def pipeline_config(**overrides):
  c = meta.get_config("smoke")
  c.unlock()
  cc = c.collect
  cc.episode_length = EPISODE
  cc.chunk = EPISODE + 1
  cc.behaviour.env_steps = 4 * 2 * (EPISODE + 1)  # 2 episodes per slot → streams of 102 records
  cc.behaviour.random_steps = 200
  cc.specialist.env_steps = 4 * 2 * (EPISODE + 1)
  cc.specialist.random_steps = 200
  c.train.num_updates = 300
  c.train.chunk = 50
  c.train.checkpoint_every = 100
  c.data.prefetch = 2
  return _override(c, overrides)


def _override(c, overrides: dict):
  """Sets dotted fields ('train.num_updates') of an unlocked config, then locks it."""
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def adapt_config(pretrain_workdir: str, **overrides):
  """adapt.py:smoke on an explicit cheetah target (β = 0.5) with 250-step episodes, 3k real steps
  and evaluations every 500 steps: the program that the rollout tests share."""
  c = adapt_presets.get_config("smoke")
  c.unlock()
  c.pretrain.workdir = pretrain_workdir
  c.target.domain = "cheetah"
  c.target.beta = 0.5
  c.target.episode_length = 250
  c.eval.every = 500
  return _override(c, overrides)


@dataclasses.dataclass
class Pipeline:
  config: object
  workdir: str
  data_dir: str
  run: pretrain.Run


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  c = pipeline_config()
  run = pretrain.pretrain(c, workdir, verbose=False)
  return Pipeline(c, workdir, os.path.join(workdir, "data"), run)


ADAPT_UPDATES = 2000  # tiny world-model updates behind the adaptation tests (the issue's ≥ 2k)


@pytest.fixture(scope="session")
def adapt_pretrained(pipeline, tmp_path_factory) -> str:
  """A pretraining run of ADAPT_UPDATES updates on the pipeline's data (its workdir)."""
  workdir = str(tmp_path_factory.mktemp("adapt_pretrained"))
  os.symlink(pipeline.data_dir, os.path.join(workdir, "data"))
  c = pipeline_config(**{"train.num_updates": ADAPT_UPDATES, "train.checkpoint_every": 1000})
  pretrain.pretrain(c, workdir, verbose=False)
  return workdir


@pytest.fixture(scope="session")
def adapt_run(adapt_pretrained, tmp_path_factory) -> adapt.AdaptRun:
  """`experiments.adapt` end to end with rollouts: 2 seeds on the explicit cheetah target."""
  workdir = str(tmp_path_factory.mktemp("adapt"))
  return adapt.adapt(adapt_config(adapt_pretrained), workdir, verbose=False)
