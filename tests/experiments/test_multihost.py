"""Pretraining as 2 processes × 2 CPU devices matches the single-process run on 4 devices.

PROTOCOL.md's equality over the first 100 updates, on the pipeline's datasets with batch 8:
- `python -m experiments.pretrain` runs as two tasks of a simulated Slurm step
  (`tests/distributed.py`): `jax.distributed.initialize()` picks up Slurm's variables, the mesh
  spans both processes' devices, each process reads only its own rows of every batch;
- the first invocation has a budget of 20 updates; a second one resumes from the checkpoint that
  both processes restored and goes on to 100;
- the reference is the 4-device run of the `data_parallel_runs` fixture (one process, the same
  config), so this test adds no single-process run of its own.
Checked: parameters at update 20 within 1e-5 relative; the logged losses of every 10-update chunk
within 1% and the parameters at 100 within 1e-2 (as `test_data_parallel.py` argues, Adam turns
last-bit differences of reordered sums into full steps, so later updates are compared as whole
runs); only process 0 wrote logs and results.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mrcom_jax.training import logs
from tests import distributed
from tests.experiments.conftest import (
  DATA_PARALLEL_OVERRIDES,
  checkpoint_params,
  relative_difference,
)

CONFIG_FILE = """
from tests.experiments.conftest import pipeline_config

def get_config(updates="100"):
  overrides = {{**{overrides!r}, "train.num_updates": int(updates), "data.dir": {data!r}}}
  return pipeline_config(**overrides)
"""


def test_two_processes_match_one_process(pipeline, data_parallel_runs, tmp_path):
  config = tmp_path / "multihost_config.py"
  config.write_text(CONFIG_FILE.format(overrides=DATA_PARALLEL_OVERRIDES, data=pipeline.data_dir))
  multi, single = str(tmp_path / "multi"), data_parallel_runs.four["workdir"]

  for updates in (20, 100):
    command = ["-m", "experiments.pretrain", f"--config={config}:{updates}", f"--workdir={multi}"]
    results = distributed.run_processes(command, processes=2, devices=2, timeout=600)
    for r in results:
      assert r.returncode == 0, r.tail()
    assert "held-out" in results[0].stdout and "held-out" not in results[1].stdout
  assert "resuming from the checkpoint at update 20" in results[0].stdout

  info = json.load(open(os.path.join(multi, "run_info.json")))["invocations"]
  assert len(info) == 2 and {i["process_count"] for i in info} == {2}, info
  assert info[0]["mesh"] == {"data": 4} and len(info[0]["devices"]) == 4
  rows = {w: logs.read_jsonl(os.path.join(w, "metrics.jsonl")) for w in (multi, single)}
  assert [r["step"] for r in rows[multi]] == list(range(10, 101, 10)), rows[multi]
  losses = {w: np.array([r["total"] for r in rows[w]]) for w in rows}
  loss_gap = float(np.max(np.abs(losses[multi] - losses[single]) / np.abs(losses[single])))
  at20 = relative_difference(checkpoint_params(single, 20), checkpoint_params(multi, 20))
  at100 = relative_difference(checkpoint_params(single, 100), checkpoint_params(multi, 100))
  print(
    f"relative parameter difference at 20: {at20:.2e}, at 100: {at100:.2e}; loss gap {loss_gap:.2e}"
  )
  assert at20 < 1e-5, at20
  assert at100 < 1e-2, at100
  assert loss_gap < 1e-2, loss_gap
  summary = json.load(open(os.path.join(multi, "summary.json")))
  assert summary["updates"] == 100 and set(summary["domains"]) == {"hopper", "walker", "cheetah"}
