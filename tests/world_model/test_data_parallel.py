"""Data parallelism: the shard_map update on 4 fake CPU devices equals the one-device update.

The 4-device program (`train.make_train_step(config, mesh)`, the one pretraining runs: every
device differentiates its rows' share under `shard_map`, one all-reduce) runs in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before JAX starts), from the same
state and a batch whose shards hold very different numbers of valid steps and pairs, pickled.
Here the one-device update (the session's compiled step) gives every loss metric and the new
state, and the session's per-term jacobian gives the gradient diagnostics.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.training import sharding
from mrcom_jax.world_model import config as config_lib
from mrcom_jax.world_model import losses
from tests.world_model import conftest

SCRIPT = textwrap.dedent(
  """
  import pickle, sys
  import jax, numpy as np
  from mrcom_jax.training import sharding
  from mrcom_jax.world_model import train
  from tests.world_model import conftest
  assert len(jax.devices()) == 4, jax.devices()
  with open(sys.argv[1], "rb") as f:
    state, key_data, batch = pickle.load(f)
  state = state.replace(key=jax.random.wrap_key_data(key_data))
  mesh = sharding.make_mesh(4)
  step = train.make_train_step(conftest.make_test_config(), mesh, donate=False)
  batch = sharding.shard_batch(jax.tree.map(np.asarray, batch), mesh)
  assert len(batch.obs.sharding.device_set) == 4
  new, metrics = step(sharding.replicate(state, mesh), batch)
  assert new.variables["params"]["decoder"]["out"]["kernel"].sharding.is_fully_replicated
  new = new.replace(key=jax.random.key_data(new.key))
  with open(sys.argv[2], "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, (new, metrics)), f)
  """
)
# Leading invalid slots per row: shards (2 rows each) train on 32, 31, 29 and 5 valid steps of
# 32; row 7 has one valid training step and no pair.
N_EMPTY = (0, 0, 3, 9, 11, 0, 20, 23)


def _to_host(state):
  return jax.tree.map(np.asarray, state.replace(key=None)), np.asarray(
    jax.random.key_data(state.key)
  )


@pytest.fixture(scope="module")
def uneven(batch):
  return batch.replace(valid=jnp.arange(batch.length)[None] >= jnp.array(N_EMPTY)[:, None])


@pytest.fixture(scope="module")
def four(state, uneven, tmp_path_factory):
  """(new state, metrics) of the 4-device shard_map update, from the subprocess."""
  tmp = tmp_path_factory.mktemp("data_parallel")
  host_state, key_data = _to_host(state)
  with open(tmp / "in.pkl", "wb") as f:
    pickle.dump((host_state, key_data, jax.tree.map(np.asarray, uneven)), f)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp / "in.pkl"), str(tmp / "out.pkl")],
    env=env, cwd=root, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp / "out.pkl", "rb") as f:
    return pickle.load(f)


def test_shards_are_uneven(uneven):
  k = conftest.make_test_config().context_len
  win = uneven.window(k)
  valid = np.asarray(win.valid).reshape(4, -1).sum(1)
  pairs = np.asarray(losses.pair_mask(win.first, win.valid)).reshape(4, -1).sum(1)
  assert list(valid) == [32, 31, 29, 5] and len(set(pairs)) == 4, (valid, pairs)


def test_four_devices_equal_one_on_every_metric(state, uneven, four):
  sharded, sharded_metrics = four
  single, metrics = conftest.train_step_for("")(state, uneven)
  diagnostics = {k for k in sharded_metrics if k.startswith(("grad_norm/", "grad_share/"))}
  assert set(sharded_metrics) == set(metrics) | diagnostics
  # Every mean divides by the whole batch's count; the L_mv variance is the whole batch's.
  for name, value in metrics.items():
    np.testing.assert_allclose(sharded_metrics[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
  for name in ("td", "meta_value", "meta_value_align", "mv_target_var", "value_mean"):
    assert abs(float(metrics[name])) > 1e-4, name  # the value terms are compared, not zeros
  # Adam's first step moves each parameter by lr · g / (|g| + ε): a component whose gradient is
  # near ε is sensitive to summation order, so parameters are compared to 1% of lr.
  atol = 0.01 * conftest.make_test_config().model_opt.lr
  new = (sharded.variables, sharded.values, sharded.target)
  ref = (single.variables, single.values, single.target)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
    assert np.mean(np.abs(np.asarray(a) - np.asarray(b))) < 1e-6
  np.testing.assert_array_equal(sharded.key, jax.random.key_data(single.key))


def _global_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


def test_gradient_diagnostics_are_each_terms_norm_and_share(state, uneven, four):
  """grad_norm/<term> = ‖λ ∇_θ term‖ (METHOD.md diagnostics); shares are over Σ of the norms."""
  _, m = four
  spec = config_lib.resolve(conftest.make_test_config())
  keys = conftest.train_keys(state, uneven.batch_size)
  grads = conftest.term_gradients()(state.variables, state.values, state.target, uneven, keys)
  scale = dict.fromkeys(losses.WM_TERMS, 1.0)
  scale.update(meta_state=spec.lambda_ms, meta_value_align=spec.lambda_mv)
  norms = {t: s * _global_norm(grads[t][0]) for t, s in scale.items()}
  assert {k.removeprefix("grad_norm/") for k in m if k.startswith("grad_norm/")} == set(norms) | {
    "wm"
  }
  for t, expect in norms.items():
    np.testing.assert_allclose(m[f"grad_norm/{t}"], expect, rtol=1e-4, err_msg=t)
    np.testing.assert_allclose(m[f"grad_share/{t}"], expect / sum(norms.values()), rtol=1e-4)
  np.testing.assert_allclose(m["grad_norm/wm"], _global_norm(grads["wm"][0]), rtol=1e-4)
  assert sum(m[f"grad_share/{t}"] for t in norms) == pytest.approx(1.0, abs=1e-5)
  assert m["grad_norm_model"] <= sum(norms.values()) * (1 + 1e-5)
  # With L_mv normalised (Eq. 15 [choice]) its gradient is no longer a rounding error of L_wm's.
  assert m["grad_share/meta_value_align"] > 0.01


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
