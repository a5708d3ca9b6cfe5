"""Data parallelism: one update on 4 fake CPU devices equals the single-device update.

The 4-device program runs in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=4
must be set before JAX starts), from the same state and batch, pickled; the single-device
update runs here with the session's compiled step.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np

from mrcom_jax.training import sharding
from tests.world_model import conftest

SCRIPT = textwrap.dedent(
  """
  import pickle, sys
  import jax, numpy as np
  from mrcom_jax.training import sharding
  from tests.world_model import conftest
  assert len(jax.devices()) == 4, jax.devices()
  with open(sys.argv[1], "rb") as f:
    state, key_data, batch = pickle.load(f)
  state = state.replace(key=jax.random.wrap_key_data(key_data))
  mesh = sharding.make_mesh(4)
  step = conftest.train_step_for("")
  batch = sharding.shard_batch(jax.tree.map(np.asarray, batch), mesh)
  assert len(batch.obs.sharding.device_set) == 4
  new, metrics = step(sharding.replicate(state, mesh), batch)
  assert new.variables["params"]["decoder"]["out"]["kernel"].sharding.is_fully_replicated
  new = new.replace(key=jax.random.key_data(new.key))
  with open(sys.argv[2], "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, (new, metrics)), f)
  """
)


def _to_host(state):
  return jax.tree.map(np.asarray, state.replace(key=None)), np.asarray(
    jax.random.key_data(state.key)
  )


def test_four_devices_equal_one(state, batch, tmp_path):
  host_state, key_data = _to_host(state)
  with open(tmp_path / "in.pkl", "wb") as f:
    pickle.dump((host_state, key_data, jax.tree.map(np.asarray, batch)), f)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp_path / "in.pkl"), str(tmp_path / "out.pkl")],
    env=env, cwd=root, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / "out.pkl", "rb") as f:
    sharded, sharded_metrics = pickle.load(f)
  single, metrics = conftest.train_step_for("")(state, batch)
  # Gradients are means over the global batch, not scaled by the device count.
  np.testing.assert_allclose(
    sharded_metrics["grad_norm_model"], metrics["grad_norm_model"], rtol=1e-5
  )
  for name in ("total", "recon", "td", "meta_value_align"):
    np.testing.assert_allclose(sharded_metrics[name], metrics[name], rtol=1e-5, err_msg=name)
  # Adam's first step moves each parameter by lr · g / (|g| + ε): a component whose gradient is
  # near ε is sensitive to summation order, so parameters are compared to 1% of lr.
  atol = 0.01 * conftest.make_test_config().model_opt.lr
  new = (sharded.variables, sharded.values, sharded.target)
  ref = (single.variables, single.values, single.target)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
    assert np.mean(np.abs(np.asarray(a) - np.asarray(b))) < 1e-6
  np.testing.assert_array_equal(sharded.key, jax.random.key_data(single.key))


def test_mesh_helpers_on_one_device():
  mesh = sharding.make_mesh(1)
  assert mesh.axis_names == (sharding.DATA_AXIS,) and mesh.shape[sharding.DATA_AXIS] == 1
  x = sharding.shard_batch({"a": np.arange(6.0).reshape(3, 2)}, mesh)
  np.testing.assert_array_equal(x["a"], np.arange(6.0).reshape(3, 2))
  assert sharding.replicated(mesh).is_fully_replicated
  try:
    sharding.make_mesh(len(jax.devices()) + 1)
  except ValueError as e:
    assert "devices" in str(e)
  else:
    raise AssertionError("expected ValueError")
