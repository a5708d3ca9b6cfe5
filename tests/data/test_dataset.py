"""The on-disk format: round trip, atomicity, resume, errors, returns, stream selection."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.data.dataset import Dataset, DatasetWriter
from tests.data.conftest import EPISODE_LENGTH, make_chunk, write_dataset


def test_round_trip(tmp_path):
  c0 = make_chunk("hopper", [0, 1, 2], n_episodes=2)
  c1 = make_chunk("hopper", [7, 8], n_episodes=3)
  writer = DatasetWriter(tmp_path / "d", "hopper", "mix", EPISODE_LENGTH, info={"seed": 3})
  writer.append(**c0)
  writer.append(**c1)
  ds = writer.close(info_update={"policy": "final"})

  meta = json.load(open(tmp_path / "d" / "meta.json"))
  assert meta["format"] == "mrcom-dataset" and meta["version"] == 1 and meta["complete"]
  assert (meta["domain"], meta["kind"], meta["obs_dim"], meta["act_dim"]) == (
    "hopper",
    "mix",
    15,
    4,
  )
  assert meta["episode_length"] == EPISODE_LENGTH
  assert meta["chunks"] == [
    {"name": "chunk_00000", "streams": 3, "length": 20},
    {"name": "chunk_00001", "streams": 2, "length": 30},
  ]
  assert meta["info"] == {"seed": 3, "policy": "final"}
  assert (ds.num_chunks, ds.num_streams, ds.num_records, ds.num_episodes) == (2, 5, 120, 12)
  np.testing.assert_array_equal(ds.stream_lengths, [20, 20, 20, 30, 30])
  assert ds.domain == "hopper" and ds.kind == "mix" and ds.info["seed"] == 3

  dtypes = dict(
    obs=np.float32, action=np.float32, reward=np.float32, first=np.bool_, last=np.bool_,
    xi=np.float32, stream=np.int32, step0=np.int32,
  )  # fmt: skip
  for got, want in zip(ds, (c0, c1)):
    for name, dtype in dtypes.items():
      arr = getattr(got, name)
      assert isinstance(arr, np.memmap), name
      assert arr.dtype == dtype and arr.shape == want[name].shape, name
      if name != "action":
        np.testing.assert_array_equal(arr, want[name], err_msg=name)
    # Actions at last records are stored as 0, the rest as given.
    np.testing.assert_array_equal(
      got.action[:, ~want["last"][0]], want["action"][:, ~want["last"][0]]
    )
    assert not got.action[:, want["last"][0]].any()

  chunk, row = ds.locate(4)
  assert chunk.stream[row] == 8 and row == 1


def test_episode_returns_by_hand(tmp_path):
  c = make_chunk("walker", [0, 1], n_episodes=2, episode_length=2)  # 3 records per episode
  c["reward"] = np.array([[0, 1, 2, 0, 3, 4], [0, 0.5, 0.5, 0, 0, 10]], np.float32)
  writer = DatasetWriter(tmp_path / "w", "walker", "expert", episode_length=2)
  writer.append(**c)
  c2 = make_chunk("walker", [5], n_episodes=1, episode_length=2)
  c2["reward"] = np.array([[0, -1, -2]], np.float32)
  writer.append(**c2)
  ds = writer.close()
  np.testing.assert_allclose(ds.episode_returns(block=1), [3, 7, 1, 10, -3])
  np.testing.assert_allclose(ds.episode_returns(), [3, 7, 1, 10, -3])


def test_stale_temp_and_unreferenced_chunks_are_ignored_then_removed(tmp_path):
  path = tmp_path / "d"
  writer = DatasetWriter(path, "cheetah", "behaviour", EPISODE_LENGTH)
  writer.append(**make_chunk("cheetah", [0, 1], 1))
  writer.append(**make_chunk("cheetah", [2, 3], 1))
  # A crash mid-append: a half-written temp dir and a renamed chunk that meta.json never listed.
  os.makedirs(path / ".tmp-chunk_00002-dead")
  (path / ".tmp-chunk_00002-dead" / "obs.npy").write_bytes(b"half")
  os.makedirs(path / "chunk_00002")
  (path / "chunk_00002" / "obs.npy").write_bytes(b"junk")
  (path / ".tmp-abc.json").write_text("{")

  with pytest.raises(ValueError, match="incomplete"):
    Dataset.open(path)
  ds = Dataset.open(path, allow_incomplete=True)
  assert ds.num_chunks == 2 and ds.num_records == 40

  writer = DatasetWriter.resume(path)
  assert sorted(os.listdir(path)) == ["chunk_00000", "chunk_00001", "meta.json"]
  writer.append(**make_chunk("cheetah", [4], 2))
  ds = writer.close()
  assert ds.num_chunks == 3 and ds.chunk(2).stream[0] == 4


def test_truncate_to_and_resume(tmp_path):
  path = tmp_path / "d"
  writer = DatasetWriter(path, "hopper", "behaviour", EPISODE_LENGTH)
  for i in range(3):
    writer.append(**make_chunk("hopper", [i], 1))
  del writer  # the collection stage dies; its last checkpoint had seen 1 chunk
  writer = DatasetWriter.resume(path, truncate_to=1)
  assert writer.num_chunks == 1 and writer.num_records == 10
  assert sorted(os.listdir(path)) == ["chunk_00000", "meta.json"]
  writer.append(**make_chunk("hopper", [9], 2))
  writer.truncate_to(2)  # no-op
  with pytest.raises(ValueError, match="truncate"):
    writer.truncate_to(3)
  ds = writer.close()
  np.testing.assert_array_equal([c.stream[0] for c in ds], [0, 9])
  with pytest.raises(ValueError, match="complete"):
    DatasetWriter.resume(path)
  with pytest.raises(FileExistsError, match="resume"):
    DatasetWriter(path, "hopper", "mix")


def test_context_manager_leaves_dataset_incomplete_on_error(tmp_path):
  with pytest.raises(RuntimeError):
    with DatasetWriter(tmp_path / "d", "hopper", "random", EPISODE_LENGTH) as w:
      w.append(**make_chunk("hopper", [0], 1))
      raise RuntimeError
  assert not Dataset.open(tmp_path / "d", allow_incomplete=True).meta["complete"]
  with DatasetWriter(tmp_path / "e", "hopper", "random", EPISODE_LENGTH) as w:
    w.append(**make_chunk("hopper", [0], 1))
  assert Dataset.open(tmp_path / "e").num_streams == 1


def test_open_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere.meta\.json"):
    Dataset.open(tmp_path / "nowhere")
  path = tmp_path / "d"
  write_dataset(path, "hopper", [([0], 1)])
  meta = json.load(open(path / "meta.json"))
  for change, pattern in (
    ({"format": "other"}, "format is 'other'"),
    ({"version": 2}, "version 2 is newer"),
    ({"complete": False}, "incomplete"),
  ):
    json.dump({**meta, **change}, open(path / "meta.json", "w"))
    with pytest.raises(ValueError, match=pattern) as e:
      Dataset.open(path)
    assert "meta.json" in str(e.value)
  json.dump(meta, open(path / "meta.json", "w"))
  os.remove(path / "chunk_00000" / "xi.npy")
  with pytest.raises(FileNotFoundError, match=r"xi\.npy"):
    Dataset.open(path).chunk(0)


def test_append_validation(tmp_path):
  w = DatasetWriter(tmp_path / "d", "walker", "mix", EPISODE_LENGTH)
  good = make_chunk("walker", [0, 1], 2)

  def bad(pattern, **change):
    with pytest.raises(ValueError, match=pattern):
      w.append(**{**good, **change})

  first = good["first"].copy()
  first[1, 10] = False
  bad("first flags break the episode pattern.*row 1, record 10", first=first)
  last = good["last"].copy()
  last[0, 8] = True
  bad("last flags break", last=last)
  per_step = ("obs", "action", "reward", "first", "last")
  bad("not a whole number of episodes", **{k: good[k][:, :15] for k in per_step})
  bad("obs must have shape", obs=good["obs"][..., :15])
  bad("first must be bool", first=good["first"].astype(np.int8))
  bad("reward must be 0 at an episode's first", reward=good["reward"] + 1)
  bad("one-hot does not say walker", xi=make_chunk("hopper", [0, 1], 2)["xi"])
  bad("non-finite", obs=np.where(good["obs"] > 5, np.nan, good["obs"]))
  bad("stream must be an integer", stream=good["stream"].astype(np.float32))
  with pytest.raises(ValueError, match="kind"):
    DatasetWriter(tmp_path / "k", "walker", "medium-expert")
  with pytest.raises(ValueError, match="JSON"):
    DatasetWriter(tmp_path / "j", "walker", "mix", info={"x": object()})
  assert w.num_chunks == 0  # nothing was written by the failures
  assert sorted(os.listdir(tmp_path / "d")) == ["meta.json"]


def test_select_streams(tmp_path):
  src = write_dataset(
    tmp_path / "src", "cheetah", [(range(0, 6), 2), (range(6, 10), 3), (range(10, 16), 2)],
    kind="behaviour", info={"distribution": "a"},
  )  # fmt: skip
  lengths = dict(zip(np.concatenate([c.stream for c in src]), src.stream_lengths))
  for seed, max_records in ((0, 100), (1, 100), (2, 35), (3, 1000), (4, 5)):
    mix = dataset_lib.select_streams(src, tmp_path / f"mix{seed}", max_records, seed)
    ids = np.concatenate([c.stream for c in mix]) if mix.num_chunks else np.zeros(0, int)
    assert len(set(ids)) == len(ids)
    assert mix.num_records == sum(lengths[i] for i in ids) <= max_records
    # Greedy prefix of one random order: no unchosen stream fits only if the budget is nearly spent.
    assert mix.num_records > max_records - 30 or mix.num_streams == src.num_streams
    assert mix.kind == "mix" and mix.info["distribution"] == "a"
    assert mix.info["max_records"] == max_records
    for chunk in mix:  # copied faithfully
      for row, sid in enumerate(chunk.stream):
        want = make_chunk("cheetah", [sid], lengths[sid] // (EPISODE_LENGTH + 1))
        np.testing.assert_array_equal(chunk.obs[row], want["obs"][0])
        np.testing.assert_array_equal(chunk.reward[row], want["reward"][0])
        np.testing.assert_array_equal(chunk.step0[row], want["step0"][0])
  assert Dataset.open(tmp_path / "mix3").num_streams == 16
  assert Dataset.open(tmp_path / "mix4").num_streams == 0
  a = Dataset.open(tmp_path / "mix0").info["selected_streams"]
  b = Dataset.open(tmp_path / "mix1").info["selected_streams"]
  assert a != b
  # An interrupted selection is redone; a finished one is not overwritten.
  json.dump({**json.load(open(tmp_path / "mix0" / "meta.json")), "complete": False},
            open(tmp_path / "mix0" / "meta.json", "w"))  # fmt: skip
  redo = dataset_lib.select_streams(src, tmp_path / "mix0", 100, 0)
  assert redo.info["selected_streams"] == a
  with pytest.raises(FileExistsError):
    dataset_lib.select_streams(src, tmp_path / "mix0", 100, 0)


def test_chunk_shapes_by_hand():
  from mrcom_jax.envs import specs

  shapes = dataset_lib.chunk_shapes(specs.get_domain("walker"), 3, 42)
  assert shapes == {
    "obs": (3, 42, 24), "action": (3, 42, 6), "reward": (3, 42), "first": (3, 42),
    "last": (3, 42), "xi": (3, 6), "stream": (3,), "step0": (3,),
  }  # fmt: skip
