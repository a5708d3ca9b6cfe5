"""The multi-host helpers in one process, where they reduce to the single-process paths (the
two-process behaviour is `test_multiprocess.py`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcom_jax.training import sharding


def test_one_process_reads_every_row_and_needs_no_exchange():
  mesh = sharding.make_mesh(1)
  assert sharding.process_rows(mesh, 6) == slice(0, 6)
  block = jax.device_put(np.arange(6.0), sharding.local_sharding(mesh))
  assert sharding.global_batch(block, mesh, 6) is block
  np.testing.assert_array_equal(sharding.to_host({"x": block})["x"], np.arange(6.0))
  assert sharding.from_primary(np.array([3.0])).tolist() == [3.0]
  assert sharding.max_over_processes(5) == 5 and sharding.is_primary()


def test_initialize_distributed_modes(monkeypatch):
  for name in ("SLURM_NTASKS", "SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed("off") is False
  assert sharding.initialize_distributed("auto") is False  # one process: nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task Slurm job stays single-process
  assert sharding.initialize_distributed("auto") is False
  with pytest.raises(ValueError, match="choose auto, on or off"):
    sharding.initialize_distributed("yes")
