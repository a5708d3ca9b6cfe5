"""Checkpointer: round trip, fallback past a corrupted step, and a mismatch that names the field."""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.training import checkpoint


def _state(width: int = 4, offset: float = 0.0):
  return {
    "params": {"dense": {"kernel": jnp.arange(width * 2, dtype=jnp.float32).reshape(width, 2)}},
    "step": jnp.asarray(3, jnp.int32),
    "key": jax.random.PRNGKey(7),
    "bias": jnp.full((2,), offset, jnp.float32),
  }


def test_round_trip_is_exact_and_keeps_meta(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    ck.save(10, _state(offset=1.5), {"data_position": 10})
    ck.wait()
    step, state, meta = ck.restore_latest(_state())
  assert step == 10 and meta["data_position"] == 10
  np.testing.assert_array_equal(state["bias"], [1.5, 1.5])
  np.testing.assert_array_equal(state["key"], jax.random.PRNGKey(7))
  assert meta["fingerprint"]["['params']['dense']['kernel']"] == [[4, 2], "float32"]


def test_max_to_keep_drops_old_steps(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, _state(offset=step), {})
    ck.wait()
    assert ck.steps() == [2, 3]


def test_max_step_restores_an_earlier_step(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as ck:
    for step in (10, 20, 30):
      ck.save(step, _state(offset=step), {"data_position": step})
    ck.wait()
    step, state, meta = ck.restore_latest(_state(), max_step=25)
    assert ck.restore_latest(_state(), max_step=5) is None
  assert step == 20 and meta["data_position"] == 20
  np.testing.assert_array_equal(state["bias"], [20.0, 20.0])


def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog):
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as ck:
    ck.save(1, _state(offset=1.0), {})
    ck.save(2, _state(offset=2.0), {})
    ck.wait()
    for path in glob.glob(os.path.join(tmp_path, "2", "state", "**", "*"), recursive=True):
      if os.path.isfile(path):
        with open(path, "wb") as f:
          f.write(b"garbage")
    step, state, _ = ck.restore_latest(_state())
    assert os.path.isdir(os.path.join(tmp_path, "corrupted_2")) and ck.steps() == [1]
    ck.save(2, _state(offset=5.0), {})  # the resumed run redoes step 2
    ck.wait()
    assert ck.steps() == [1, 2]
  assert step == 1
  np.testing.assert_array_equal(state["bias"], [1.0, 1.0])
  assert "step 2 is corrupted" in caplog.text


def test_no_checkpoint_gives_none(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ck:
    assert ck.restore_latest(_state()) is None


def test_mismatched_size_names_leaf_and_config_field(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ck:
    ck.save(5, _state(width=4), {"config": {"world_model": {"deter": 32}}})
    ck.wait()
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
      ck.restore_latest(_state(width=8), config={"world_model": {"deter": 256}})
  msg = str(e.value)
  assert "['params']['dense']['kernel']: checkpoint (4, 2) float32, this run (8, 2) float32" in msg
  assert "config.world_model.deter: checkpoint 32, this run 256" in msg
  assert "fresh --workdir" in msg
