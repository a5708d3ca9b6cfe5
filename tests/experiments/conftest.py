"""Session fixtures of the pipeline tests: one small collect + pretrain run shared by all of them.

`pipeline_config()` is the smoke preset with shorter episodes (50 control steps, 51 records) and
budgets, so a 2-core CPU runs every stage of PROTOCOL.md's pipeline (behaviour SACs, the `mix`
dataset, evaluation lists, random returns, specialists, pretraining, checkpoints, summary) in a
few minutes, most of it compiling one runner program per domain and one world-model update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap

import jax
import numpy as np
import pytest

from experiments import adapt, pretrain
from experiments.configs import adapt as adapt_presets
from experiments.configs import meta
from mrcom_jax.training import checkpoint as checkpoint_lib
from mrcom_jax.world_model import normalizer as normalizer_lib
from mrcom_jax.world_model import train as train_lib
from tests import distributed

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


# One subprocess (4 CPU devices must exist before JAX starts) pretrains on the pipeline's data
# with batch 8 on 1 device and on 4, each stopped after 20 updates and resumed to 100; the
# data-parallel and multi-host tests compare against these runs.
DATA_PARALLEL_OVERRIDES = {
  "train.num_updates": 100,
  "train.chunk": 10,
  "train.checkpoint_every": 10,
  "train.max_to_keep": 10,
  "world_model.batch_size": 8,
}
_DATA_PARALLEL_SCRIPT = textwrap.dedent(
  """
  import json, os, sys
  import jax, numpy as np
  from experiments import pretrain
  from tests.experiments.conftest import DATA_PARALLEL_OVERRIDES, pipeline_config
  assert len(jax.devices()) == 4, jax.devices()
  data, out = sys.argv[1], sys.argv[2]
  report = {}
  for n in (1, 4):
    workdir = os.path.join(out, f"devices{n}")
    os.makedirs(workdir)
    os.symlink(data, os.path.join(workdir, "data"))
    c = pipeline_config(**DATA_PARALLEL_OVERRIDES, **{"train.num_devices": n})
    early = pretrain.pretrain(c, workdir, stop_after=20, verbose=False)
    late = pretrain.pretrain(c, workdir, verbose=False)
    leaf = jax.tree.leaves(late.state.variables["params"])[0]
    report[n] = dict(workdir=workdir, stopped_at=early.step, final=late.step,
                     devices=len(leaf.sharding.device_set),
                     replicated=bool(leaf.sharding.is_fully_replicated))
  print("REPORT " + json.dumps(report))
  """
)


@dataclasses.dataclass
class DataParallelRuns:
  """The workdirs (checkpoints every 10 updates, metrics) and facts of the two runs."""

  one: dict
  four: dict


@pytest.fixture(scope="session")
def data_parallel_runs(pipeline, tmp_path_factory) -> DataParallelRuns:
  out = tmp_path_factory.mktemp("data_parallel")
  result = distributed.run(["-c", _DATA_PARALLEL_SCRIPT, pipeline.data_dir, str(out)], 4, 900)
  assert result.returncode == 0, result.tail()
  line = [ln for ln in result.stdout.splitlines() if ln.startswith("REPORT ")]
  assert line, result.tail()
  report = json.loads(line[-1].removeprefix("REPORT "))
  return DataParallelRuns(report["1"], report["4"])


def checkpoint_params(workdir: str, step: int) -> list:
  """The world-model parameters of `workdir`'s checkpoint at `step`, as numpy leaves."""
  c = pipeline_config(**DATA_PARALLEL_OVERRIDES)
  target = train_lib.init_train_state(
    c.world_model, jax.random.PRNGKey(0), normalizer_lib.Normalizer.identity()
  )
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    got, state, _ = ckpt.restore_latest(target, max_step=step)
  assert got == step, (workdir, got)
  return [np.asarray(x) for x in jax.tree.leaves(state.variables["params"])]


def relative_difference(xs, ys) -> float:
  """max over leaves of ‖a − b‖ / ‖a‖."""
  return max(
    float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)) for a, b in zip(xs, ys, strict=True)
  )
