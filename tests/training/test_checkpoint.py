"""Checkpointer: round trip, fallback past a corrupted step (unreadable, silently flipped bytes,
non-finite), and a mismatch that names the field."""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.training import checkpoint
from tests import distributed


def _state(width: int = 4, offset: float = 0.0):
  return {
    "params": {"dense": {"kernel": jnp.arange(width * 2, dtype=jnp.float32).reshape(width, 2)}},
    "step": jnp.asarray(3, jnp.int32),
    "key": jax.random.PRNGKey(7),
    "bias": jnp.full((2,), offset, jnp.float32),
  }


def _random_state(seed: int):
  """A state whose largest leaf is random bits: incompressible, so TensorStore stores its bytes
  as they are (random floats are zstd-compressed, and inverting compressed bytes sometimes reads
  back as an error instead of wrong values)."""
  return {
    "w": jax.random.bits(jax.random.PRNGKey(seed), (64, 16), jnp.uint32),
    "b": jnp.full((3,), 1.0),
  }


def largest_array_file(step_dir: str) -> str:
  """The largest data file that a one-process run's orbax wrote for a step's `state` item
  (chunks of array values, stored without a checksum)."""
  paths = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  return max(paths, key=os.path.getsize)


def flip_bytes(path: str, n: int = 64, at: int | None = None) -> None:
  """Inverts `n` bytes of `path` from offset `at` (default: the middle)."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    at = len(data) // 2 if at is None else at
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    f.seek(0)
    f.write(data)


def flip_stored_bytes(step_dir: str, leaf, n: int = 64) -> str:
  """Inverts up to `n` bytes in the middle of `leaf`'s values where a step's data files store
  them as they are (an incompressible leaf: random bits, a PRNG key): the files stay readable
  and read back other values, silently. Returns the file's path."""
  raw = np.asarray(leaf).tobytes()
  n = min(n, len(raw))
  probe = raw[(len(raw) - n) // 2 :][:n]
  for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")):
    with open(path, "rb") as f:
      at = f.read().find(probe)
    if at >= 0:
      flip_bytes(path, n, at)
      return path
  raise AssertionError(f"no data file of {step_dir} stores the leaf's bytes as they are")


def _restore_two(tmp_path, second_state, caplog, monkeypatch, corrupt=None):
  """Saves steps 1 (finite) and 2 (`second_state`), corrupts step 2, restores: (step, state,
  the WARNING+ log lines and the exceptions Python would print as unraisable, e.g. abandoned
  reads collected later)."""
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as ck:
    ck.save(1, _random_state(1), {"data_position": 1})
    ck.save(2, second_state, {"data_position": 2})
    ck.wait()
    if corrupt is not None:
      corrupt(os.path.join(tmp_path, "2"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      step, state, meta = ck.restore_latest(_random_state(0))
      gc.collect()
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines = [ln for r in records for ln in r.getMessage().splitlines()]
    lines += [f"unraisable: {u.exc_value!r}"[:200] for u in unraisable]
    assert ck.steps() == [1] and os.path.isdir(os.path.join(tmp_path, "corrupted_2"))
  assert meta["data_position"] == step
  return step, state, lines


def test_flipped_bytes_fail_the_digest_and_fall_back(tmp_path, caplog, capfd, monkeypatch):
  """The read succeeds with other values; only the digest sees it. The checkpointer's own log
  says so in one line (other libraries' records are not this test's subject: CI once saw one
  more WARNING line here that no run on the development machine shows)."""
  step, state, _ = _restore_two(
    tmp_path, _random_state(2), caplog, monkeypatch,
    corrupt=lambda step_dir: flip_stored_bytes(step_dir, _random_state(2)["w"]),
  )  # fmt: skip
  assert step == 1
  np.testing.assert_array_equal(state["w"], _random_state(1)["w"])
  ours = [
    ln
    for r in caplog.records
    if r.name == checkpoint.log.name and r.levelno >= logging.WARNING
    for ln in r.getMessage().splitlines()
  ]
  assert len(ours) == 1, ours
  assert "checkpoint step 2 is corrupted" in ours[0] and "digest" in ours[0], ours[0]
  assert "corrupted_2" in ours[0]
  assert "Traceback" not in capfd.readouterr().err


def test_non_finite_restored_state_falls_back(tmp_path, caplog, monkeypatch):
  bad = _random_state(2)
  bad["b"] = bad["b"].at[1].set(jnp.nan)  # saved as is: its digest matches
  step, state, lines = _restore_two(tmp_path, bad, caplog, monkeypatch)
  assert step == 1 and np.isfinite(np.asarray(state["b"])).all()
  assert len(lines) == 1 and "not finite" in lines[0] and "['b']" in lines[0], lines


def test_truncated_file_warns_in_one_line_without_tracebacks(tmp_path, caplog, capfd, monkeypatch):
  """The one warning line, and none of the pages that the failed read leaves behind: orbax's
  abandoned reads of the other leaves, printed with their tracebacks when collected."""

  def truncate(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)

  step, _, lines = _restore_two(tmp_path, _random_state(2), caplog, monkeypatch, corrupt=truncate)
  assert step == 1
  assert len(lines) == 1 and "checkpoint step 2 is corrupted" in lines[0], lines
  assert len(lines[0]) < 400, lines[0]
  err = capfd.readouterr().err
  assert len(err.splitlines()) <= 1 and "Traceback" not in err, err


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


_TWO_PROCESSES = textwrap.dedent(
  """
  import json, sys
  from mrcom_jax.training import sharding
  assert sharding.initialize_distributed("auto")
  import jax, jax.numpy as jnp
  from mrcom_jax.training import checkpoint
  mesh = sharding.make_mesh()
  state = lambda s, b=1.0: sharding.replicate(
    {"w": jax.random.normal(jax.random.PRNGKey(s), (64, 16)), "b": jnp.full((3,), b)}, mesh)
  with checkpoint.Checkpointer(sys.argv[1]) as ck:
    ck.save(1, state(1), {}); ck.save(2, state(2, jnp.inf), {}); ck.wait()
    step, got, _ = ck.restore_latest(state(0))
    same = bool((sharding.to_host(got["w"]) == jax.device_get(state(1)["w"])).all())
    print("RESULT " + json.dumps(dict(step=step, same=same, steps=ck.steps())))
  """
)


def test_two_processes_fall_back_together(tmp_path):
  """2 JAX processes × 2 CPU devices, a replicated state whose step 2 holds an Inf: both
  processes reject it, agree, set it aside once (process 0 moves it) and restore step 1."""
  results = distributed.run_processes(
    ["-c", _TWO_PROCESSES, str(tmp_path)], processes=2, devices=2, timeout=240
  )
  for r in results:
    assert r.returncode == 0, r.tail()
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.tail()
    assert json.loads(line[-1].removeprefix("RESULT ")) == {"step": 1, "same": True, "steps": [1]}
    assert "checkpoint step 2 is corrupted (leaf ['b'] is not finite)" in r.stderr, r.tail()
  assert os.path.isdir(tmp_path / "corrupted_2") and not os.path.exists(tmp_path / "2")
