"""`experiments.pretrain` end to end on the shared pipeline run (tests/experiments/conftest.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from experiments import collect, pretrain
from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.training import checkpoint, logs
from tests.experiments.conftest import pipeline_config
from tests.training import test_checkpoint

# The total loss (Eq. 16) of the first logged 50-update chunk over that of the last falls by at
# least this factor over the 300 smoke updates (measured: 14.18 → 11.28, a factor 1.26).
LOSS_FACTOR = 1.15


def _same_tree(a, b) -> bool:
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _reuse_data(pipeline, tmp_path) -> str:
  """A fresh workdir whose data/ is the pipeline's datasets (collected once per session)."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  os.symlink(pipeline.data_dir, os.path.join(workdir, "data"))
  return workdir


def test_smoke_collects_trains_and_checkpoints(pipeline):
  w = pipeline.workdir
  summary = pipeline.run.summary
  assert pipeline.run.step == 300 and summary["updates"] == 300
  assert summary["loss_last"] > 0 and summary["loss_first"] / summary["loss_last"] > LOSS_FACTOR
  for domain in ("hopper", "walker", "cheetah"):
    errs = summary["domains"][domain]
    assert set(errs) == {"mse_1_step", "mse_15_step"} and all(np.isfinite(list(errs.values())))
  assert sorted(os.listdir(os.path.join(w, "checkpoints")))[-3:] == ["100", "200", "300"]
  rows = logs.read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [50, 100, 150, 200, 250, 300]
  for key in (
    "total",
    "recon",
    "kl_z",
    "meta_state",
    "td",
    "grad_norm_model",
    "updates_per_s",
    "data_wait_fraction",
  ):
    assert key in rows[-1], key
  with open(os.path.join(w, "run_info.json")) as f:
    info = json.load(f)["invocations"][0]
  assert info["versions"]["mujoco-mjx"] == "3.17.0" and info["git"]
  # Collection metadata that later stages read (smoke: provisional v_max, gate off, labelled).
  v_max = collect.read_metadata(pipeline.data_dir, "v_max")
  assert v_max["cheetah"] == {"value": 8.0, "source": "provisional (labelled)"}
  assert collect.read_metadata(pipeline.data_dir, "gate")["walker"]["enabled"] is False
  lists = collect.read_metadata(pipeline.data_dir, "eval_lists")
  assert {d: list(v) for d, v in lists.items()} == {
    d: ["a"] for d in ("hopper", "walker", "cheetah")
  }
  spec = collect.read_metadata(pipeline.data_dir, "specialists")
  rand = collect.read_metadata(pipeline.data_dir, "random_returns")
  for domain in ("hopper", "walker", "cheetah"):
    assert spec[domain]["a/0"]["random_return"] == rand[domain]["a/0"]


def test_the_resolved_backend_is_recorded(pipeline):
  """The pipeline runs on the default `env.backend` ('auto': mujoco on a CPU, mjx on a GPU or
  TPU); run_info.json, summary.json, every dataset and every collection job record it."""
  c, w = pipeline.config, pipeline.workdir
  backend = "mujoco" if jax.default_backend() == "cpu" else "mjx"
  assert c.env.backend == c.collect.env.backend == "auto"
  assert collect.resolved_backend(c.collect) == backend
  domains = ("hopper", "walker", "cheetah")
  with open(os.path.join(w, "run_info.json")) as f:
    info = json.load(f)["invocations"][0]
  with open(os.path.join(w, "summary.json")) as f:
    summary = json.load(f)
  for record in (info, summary, pipeline.run.summary):
    assert record["env_backend"] == backend
    assert record["data_backends"] == {d: backend for d in domains}
  jobs = [os.path.join(*p) for d in domains
          for p in (("behaviour", "narrow", d), ("random", d), ("specialists", d, "lists"),
                    ("specialists", d, "lists", "eval_mode2"))]  # fmt: skip
  for job in jobs:
    with open(os.path.join(pipeline.data_dir, job, collect.BACKEND_FILE)) as f:
      assert json.load(f) == {"backend": backend}, job
  for d in domains:
    for path in (collect.dataset_path(pipeline.data_dir, "narrow", d, "mix"),
                 os.path.join(pipeline.data_dir, "behaviour", "narrow", d, "stream")):  # fmt: skip
      assert dataset_lib.Dataset.open(path).info["backend"] == backend, path


def test_resume_after_stop_is_bitwise(pipeline, tmp_path):
  workdir = _reuse_data(pipeline, tmp_path)
  first = pretrain.pretrain(pipeline.config, workdir, stop_after=100, verbose=False)
  assert first.stopped_by == "stop_after" and first.step == 100
  second = pretrain.pretrain(pipeline.config, workdir, verbose=False)
  assert second.step == 300
  assert _same_tree(second.state, pipeline.run.state)
  rows = logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [50, 100, 150, 200, 250, 300]


def test_sigterm_saves_and_resumes_exactly(pipeline, tmp_path):
  workdir = _reuse_data(pipeline, tmp_path)
  metrics = os.path.join(workdir, "metrics.jsonl")

  def send_sigterm():
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=send_sigterm, daemon=True).start()
  first = pretrain.pretrain(pipeline.config, workdir, verbose=False)
  assert first.stopped_by == "SIGTERM" and first.step < 300
  assert int(sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)[-1]) == first.step
  second = pretrain.pretrain(pipeline.config, workdir, verbose=False)
  assert _same_tree(second.state, pipeline.run.state)


@pytest.mark.parametrize("damage", ["flip", "swap", "truncate"])
def test_corrupted_latest_checkpoint_falls_back(damage, pipeline, tmp_path, caplog, capfd):
  """The newest checkpoint damaged: 64 inverted bytes in the middle of its largest array file
  (compressed: it reads back either as an error or, silently, as other values), its arrays
  replaced by the previous save's (readable, other values: only the leaf digests see it), or its
  largest array file cut in half (unreadable). The run sets the step aside with one warning
  line, resumes from the save before it and ends as the uninterrupted run."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(pipeline.workdir, workdir, symlinks=True)
  step_dir = os.path.join(workdir, "checkpoints", "300")
  path = test_checkpoint.largest_array_file(step_dir)
  if damage == "flip":
    test_checkpoint.flip_bytes(path)
  elif damage == "swap":
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "200", "state"),
                    os.path.join(step_dir, "state"))  # fmt: skip
  else:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  capfd.readouterr()
  run = pretrain.pretrain(pipeline.config, workdir, verbose=False)
  records = [r for r in caplog.records if r.levelno >= logging.WARNING]
  ours = [r.getMessage() for r in records if r.name == checkpoint.log.name]
  assert len(ours) == 1 and "\n" not in ours[0], ours
  assert "checkpoint step 300 is corrupted" in ours[0] and "corrupted_300" in ours[0]
  if damage == "swap":
    assert "digest" in ours[0], ours[0]
  noise = [r.getMessage() for r in records if r.exc_info or "TensorStore" in r.getMessage()]
  assert not noise and "Traceback" not in capfd.readouterr().err, noise
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupted_300"))
  assert _same_tree(run.state, pipeline.run.state)  # resumed at 200, redid 100 updates


def test_checkpoint_of_other_model_size_names_the_field(pipeline, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(pipeline.workdir, workdir, symlinks=True)
  c = pipeline_config(**{"world_model.deter": 48})
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=r"config.world_model.deter: checkpoint 32, this run 48",
  ):
    pretrain.pretrain(c, workdir, verbose=False)


@pytest.mark.parametrize(
  "override, message",
  [
    ({"world_model.batch_size": -6}, r"config.world_model.batch_size=-6 must be an integer ≥ 1"),
    ({"world_model.context_len": 0}, r"config.world_model.context_len=0 must be an integer ≥ 1"),
    (
      {"train.checkpoint_every": 75},
      r"config.train.checkpoint_every=75 must be a positive multiple",
    ),
    ({"data.kind": "bogus"}, r"config.data.kind='bogus'"),
  ],
)
def test_config_errors_name_the_field(override, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    pretrain.pretrain(pipeline_config(**override), str(tmp_path), verbose=False)
  assert not os.path.exists(tmp_path / "data")  # failed before collecting or compiling


def test_window_longer_than_streams_fails_before_compiling(pipeline, tmp_path):
  workdir = _reuse_data(pipeline, tmp_path)
  c = pipeline_config(**{"world_model.seq_len": 200})
  with pytest.raises(
    ValueError, match=r"window = context_len \+ seq_len = 208 exceeds the shortest stream"
  ):
    pretrain.pretrain(c, workdir, verbose=False)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.pretrain", *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )


def test_cli_unknown_field_and_preset():
  out = _cli("--config=experiments/configs/meta.py:smoke", "--config.train.bogus=1")
  assert out.returncode != 0 and "bogus" in out.stderr
  out = _cli("--config=experiments/configs/meta.py:tiny")
  assert out.returncode != 0 and "unknown preset 'tiny'" in out.stderr
  out = _cli("--help")
  assert "--workdir" in out.stdout and "--config" in out.stdout


def test_nan_loss_stops_naming_step_and_term_and_keeps_checkpoint(pipeline, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(pipeline.workdir, workdir, symlinks=True)
  c = pipeline_config(
    **{
      "train.num_updates": 600,
      "world_model.model_opt.lr": 1e6,
      "world_model.model_opt.clip_norm": 1e9,
    }
  )
  with pytest.raises(pretrain.NonFiniteLossError) as e:
    pretrain.pretrain(c, workdir, verbose=False)
  msg = str(e.value)
  assert re.search(r"loss term '[\w/]+' became (nan|inf|-inf) at update 3\d\d\.", msg), msg
  # The checkpoint a rerun would use, how it was checked, and what to do; never "good".
  assert "the newest checkpoint is update 300" in msg and "resumed from it after checking" in msg
  assert "rerun: the run resumes from update 300" in msg and "300 aside" in msg
  assert "good" not in msg
  assert max(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == 300
