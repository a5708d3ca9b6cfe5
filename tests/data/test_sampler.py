"""WindowSampler and fit_normalizer on small synthetic datasets (no physics).

Every sampler here shares one layout (hopper, walker, cheetah; B = 6; window K + T = 4 + 6), so
the jitted finalisation compiles once for the module.
"""

from __future__ import annotations

import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.data import sampler as sampler_lib
from mrcom_jax.data.sampler import WindowIndex, WindowSampler, fit_normalizer
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.training import sharding
from mrcom_jax.world_model import config as config_lib
from mrcom_jax.world_model import losses
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import normalizer as normalizer_lib
from tests.data.conftest import EPISODE_LENGTH, make_chunk, write_dataset

WINDOW, K, B = 10, 4, 6  # window = K + T: K context slots, T = 6 training steps
HELD_OUT = {4, 7, 13, 22}  # the last stream of each dataset


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  d = tmp_path_factory.mktemp("sampler")
  return [
    write_dataset(d / "h1", "hopper", [([0, 1, 2], 2), ([3, 4], 3)]),
    write_dataset(d / "w", "walker", [([10, 11, 12, 13], 2)]),
    write_dataset(d / "h2", "hopper", [([5, 6, 7], 2)]),
    write_dataset(d / "c", "cheetah", [([20, 21, 22], 3)]),
  ]


@pytest.fixture(scope="module")
def sampler(datasets):
  s = WindowSampler(datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn="none", seed=0)
  yield s
  s.close()


def records(datasets):
  """{global stream id: (domain id, Chunk, row)}."""
  out = {}
  for ds in datasets:
    for chunk in ds:
      for row, sid in enumerate(chunk.stream):
        out[int(sid)] = (ds.spec.id, chunk, row)
  return out


def decode(obs):
  """Stream ids and steps of windows of `none` observations: two [B, W] int arrays."""
  v = np.asarray(obs[..., 0]).astype(np.int64)
  return v // 10000, v % 10000


def test_windows_are_consecutive_records_of_one_stream_of_the_row_domain(datasets, sampler):
  assert sampler.domain_ids == (0, 1, 2)
  by_id = records(datasets)
  seen_first_inside = seen_pre_stream = False
  for i in range(12):
    batch = jax.device_get(sampler.batch(i))
    assert batch.obs.shape == (B, WINDOW, 27) and batch.obs.dtype == np.float32
    assert batch.action.shape == (B, WINDOW, 6) and batch.reward.shape == (B, WINDOW)
    np.testing.assert_array_equal(batch.domain, [0, 1, 2, 0, 1, 2])  # equal shares: b mod 3
    sid, step = decode(batch.obs)
    for b in range(B):
      # Slots before the stream (only ever context slots) are invalid and hold zeros.
      pre = int((~batch.valid[b]).sum())
      assert pre <= K
      np.testing.assert_array_equal(batch.valid[b], np.arange(WINDOW) >= pre)
      for field in (batch.obs, batch.action, batch.reward, batch.first):
        assert not field[b, :pre].any()
      seen_pre_stream |= pre > 0
      s = sid[b, pre]
      d, chunk, row = by_id[s]
      spec = specs.DOMAINS[d]
      assert d == batch.domain[b] and s not in HELD_OUT
      assert (sid[b, pre:] == s).all()
      j = step[b, pre:] - chunk.step0[row]  # record indices inside the stream
      np.testing.assert_array_equal(j, j[0] + np.arange(len(j)))
      assert j[0] == 0 or not pre  # after pre-stream slots comes the stream's record 0
      np.testing.assert_array_equal(batch.obs[b, pre:, : spec.obs_dim], chunk.obs[row, j])
      assert not batch.obs[b, :, spec.obs_dim :].any()
      np.testing.assert_array_equal(batch.action[b, pre:, : spec.act_dim], chunk.action[row, j])
      assert not batch.action[b, :, spec.act_dim :].any()
      np.testing.assert_array_equal(batch.reward[b, pre:], chunk.reward[row, j])
      np.testing.assert_array_equal(batch.first[b, pre:], j % 10 == 0)
      seen_first_inside |= bool(batch.first[b, pre + 1 :].any())
      np.testing.assert_array_equal(batch.xi[b], chunk.xi[row])
      np.testing.assert_array_equal(batch.obs_mask[b], specs.obs_mask(d, 0))
      np.testing.assert_array_equal(batch.act_mask[b], specs.act_mask(d))
  assert seen_first_inside  # windows do span episode boundaries inside a stream
  assert seen_pre_stream  # and some begin before their stream


def test_window_draws_are_uniform_and_skip_held_out_streams(datasets, sampler):
  # A stream of L records has L − T + 1 first training steps (20 → 15, 30 → 25 records).
  assert sampler.num_train_windows == {"hopper": 15 * 5 + 25, "walker": 45, "cheetah": 50}
  counts = {}
  starts = set()
  n = 1500
  for i in range(n):
    idx = sampler.indices(i)
    for k, s, t in zip(idx.dataset, idx.stream, idx.start):
      sid = int(datasets[k].locate(int(s))[0].stream[datasets[k].locate(int(s))[1]])
      counts[sid] = counts.get(sid, 0) + 1
      starts.add((sid, int(t)))
  assert not HELD_OUT & set(counts)
  hopper = {0: 15, 1: 15, 2: 15, 3: 25, 5: 15, 6: 15}
  total = sum(hopper.values())
  for sid, w in hopper.items():
    p = w / total
    sd = np.sqrt(2 * n * p * (1 - p))
    assert abs(counts[sid] - 2 * n * p) < 4 * sd, (sid, counts[sid], 2 * n * p)
  # The first training step (start + K) is any record 0 .. L − T of the stream.
  assert {t for s, t in starts if s == 3} == set(range(-K, 30 - WINDOW + 1))


def test_windows_begin_in_a_streams_first_k_records_at_the_expected_rate(datasets, sampler):
  # METHOD.md Eq. 4: the first training step may be any of a stream's first K records; then the
  # context slots before the stream are invalid (the `empty` token). Per domain, that happens
  # with probability Σ K / Σ (L − T + 1) over its training streams.
  expected = {0: 6 * K / 100, 1: 3 * K / 45, 2: 2 * K / 50}
  n = 2000
  early = {d: 0 for d in expected}
  for i in range(n):
    idx = sampler.indices(i)
    for b, t in enumerate(idx.start):
      early[b % 3] += bool(t < 0)
  for d, p in expected.items():
    m = 2 * n  # two rows of each domain per batch
    assert abs(early[d] - m * p) < 4 * np.sqrt(m * p * (1 - p)), (d, early[d], m * p)
  # Such a window's slots before the stream's record 0 are invalid, the others valid.
  i = next(i for i in range(n) if (sampler.indices(i).start < 0).any())
  idx, batch = sampler.indices(i), jax.device_get(sampler.batch(i))
  pre = np.maximum(-idx.start, 0)
  np.testing.assert_array_equal(batch.valid, np.arange(WINDOW)[None] >= pre[:, None])
  sid, step = decode(batch.obs)
  for b in np.flatnonzero(pre):
    assert batch.first[b, pre[b]]  # the stream's record 0 starts an episode
    assert step[b, pre[b]] == 100 * sid[b, pre[b]]  # it is record 0 (step0 = 100 · stream id)
  # Equal domain shares for any B: row b reads a dataset of domain b mod 3.
  eight = WindowSampler(datasets, window=WINDOW, context_len=K, batch_size=8, obs_fn=0, seed=0)
  for i in range(20):
    got = [datasets[k].spec.id for k in eight.indices(i).dataset]
    assert got == [b % 3 for b in range(8)]


def test_same_record_same_perturbation_at_any_position(datasets):
  s = WindowSampler(
    datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn="add_gaussian", seed=3
  )
  # Rows 0 and 3 (hopper) see stream 3 from records 5 and 12: record 12 sits at positions 7 and 0;
  # rows 1 and 4 (walker) see stream 10 from 0 and 7: record 9 at positions 9 and 2.
  idx = WindowIndex(
    dataset=np.array([0, 1, 3, 0, 1, 3]),
    stream=np.array([3, 0, 0, 3, 0, 1]),
    start=np.array([5, 0, 0, 12, 7, 4]),
  )
  batch = jax.device_get(s.gather(idx))
  np.testing.assert_array_equal(batch.obs[0, 7], batch.obs[3, 0])
  np.testing.assert_array_equal(batch.obs[1, 9], batch.obs[4, 2])
  clean = datasets[0].chunk(1).obs[0, 12]
  assert not np.array_equal(batch.obs[0, 7, :15], clean)  # perturbed ...
  np.testing.assert_allclose(batch.obs[0, 7, :15], clean, atol=1.0)  # ... a little
  # ... exactly as the env would: key (seed, domain, stream id 3, step 300 + 12).
  want = obs_functions.apply(
    1, jnp.asarray(clean), jax.random.PRNGKey(3), specs.HOPPER, stream=3, step=312
  )
  np.testing.assert_allclose(batch.obs[0, 7], want, rtol=1e-6)
  # Other records get other noise.
  assert not np.array_equal(batch.obs[0, 6] - batch.obs[0, 7], batch.obs[3, 6] - batch.obs[3, 7])


def test_obs_fn_is_data_no_recompile(datasets, sampler):
  jitted = sampler_lib._assembler((0, 1, 2), 0, None)
  sampler.batch(0)
  before = jitted._cache_size()
  for name in ("mask_random", "add_distractor"):
    s = WindowSampler(datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn=name, seed=1)
    batch = jax.device_get(s.batch(0))
    np.testing.assert_array_equal(
      batch.obs_mask[1], specs.obs_mask(1, obs_functions.obs_fn_id(name))
    )
  assert jitted._cache_size() == before
  # add_distractor appends N(0, 1) dimensions to the walker rows.
  assert batch.obs_mask[1].sum() == 27 and np.abs(batch.obs[1, :, 24:]).max() < 10
  assert batch.obs[1, :, 24:].std() > 0.1


def test_determinism_and_exact_resume(datasets, sampler):
  other = WindowSampler(
    datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn="none", seed=0, prefetch=0
  )
  for i in (0, 7):
    jax.tree.map(np.testing.assert_array_equal, sampler.batch(i), other.batch(i))
  with sampler.batches(start=7) as it:
    assert it.position == 7
    got = [next(it) for _ in range(3)]
    assert it.position == 10
  for k, batch in enumerate(got):
    jax.tree.map(np.testing.assert_array_equal, batch, other.batch(7 + k))
  reseeded = WindowSampler(
    datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn="none", seed=1
  )
  assert not np.array_equal(reseeded.indices(7).start, sampler.indices(7).start)
  assert sampler.wait_seconds > 0


def test_prefetch_thread_errors_reach_the_consumer_and_close_joins(datasets):
  s = WindowSampler(
    datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn=0, seed=0, prefetch=2
  )
  real = s.batch

  def flaky(self, i):
    if i == 2:
      raise KeyError("disk gone at batch 2")
    return real(i)

  s.batch = types.MethodType(flaky, s)
  it = s.batches()
  next(it), next(it)
  with pytest.raises(KeyError, match="disk gone"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)
  with s:
    it2 = s.batches(start=5)
    next(it2)
  assert it2._thread is None and it2._stop.is_set()  # closed by the sampler's context
  assert not [t for t in threading.enumerate() if t.name == "WindowSampler-prefetch"]


def test_holdout_batch(datasets, sampler):
  batch = jax.device_get(sampler.holdout_batch(B, window=WINDOW, seed=0))
  sid, step = decode(batch.obs)
  np.testing.assert_array_equal(batch.domain, [0, 1, 2, 0, 1, 2])
  assert set(sid.ravel()) <= HELD_OUT
  assert batch.first[:, 0].all() and not batch.first[:, 1:].any()  # one whole episode
  # Short windows may start at any episode of the held-out stream, never past its end.
  starts = set()
  for seed in range(30):
    sid, step = decode(sampler.holdout_batch(B, window=WINDOW, seed=seed).obs)
    starts |= {(int(a), int(b) - 100 * int(a)) for a, b in zip(sid[:, 0], step[:, 0])}
  assert starts == {(4, 0), (4, 10), (4, 20), (7, 0), (7, 10), (13, 0), (13, 10), (22, 0),
                    (22, 10), (22, 20)}  # fmt: skip
  with pytest.raises(ValueError, match="long enough"):
    sampler.holdout_batch(B, window=31)


def test_errors(datasets):
  kw = dict(batch_size=B, obs_fn="none", seed=0)
  with pytest.raises(ValueError, match=r"window = context_len \+ seq_len = 21 .*20 records"):
    WindowSampler(datasets, window=21, context_len=K, **kw)
  with pytest.raises(ValueError, match=r"context_len must be in \[0, window = 10\) .*got 10"):
    WindowSampler(datasets, window=WINDOW, context_len=WINDOW, **kw)
  sampler = WindowSampler(datasets, window=WINDOW, context_len=K, **kw)
  bad = WindowIndex(np.array([0, 1, 3, 0, 1, 3]), np.zeros(6, np.int64), np.array([0] * 5 + [-5]))
  with pytest.raises(ValueError, match=r"row 5: window \[-5, 5\) leaves its stream"):
    sampler.gather(bad)
  with pytest.raises(ValueError, match="too few to hold out 3"):
    WindowSampler(datasets, window=WINDOW, context_len=K, holdout_streams=3, **kw)
  with pytest.raises(ValueError, match="smaller than the 3 domains"):
    WindowSampler(datasets, window=WINDOW, context_len=K, batch_size=2, obs_fn=0, seed=0)
  with pytest.raises(ValueError, match="unknown observation function"):
    WindowSampler(datasets, window=WINDOW, context_len=K, batch_size=B, obs_fn="blur", seed=0)
  fake_mesh = types.SimpleNamespace(shape={sharding.DATA_AXIS: 4})
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the mesh's 4 devices"):
    WindowSampler(datasets, window=WINDOW, context_len=K, mesh=fake_mesh, **kw)


def test_a_block_of_rows_equals_those_rows_of_the_whole_batch(datasets, sampler):
  # What one process of a multi-host run reads: its block may start at any row (so at any domain
  # of the cycle); it reads only those windows and assembles the same values.
  idx = sampler.indices(4)
  whole = jax.device_get(sampler.gather(idx))
  for rows in (slice(1, 5), slice(2, 6), slice(5, 6)):
    part = jax.device_get(sampler.gather_rows(idx, rows))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part), strict=True):
      np.testing.assert_array_equal(a[rows], b)
  np.testing.assert_array_equal(sampler_lib._group_rows(3, slice(4, 11), 0), [6, 9])
  np.testing.assert_array_equal(sampler_lib._row_order([2, 3, 2], offset=1), [2, 5, 0, 3, 6, 1, 4])


def test_one_device_mesh_shards_the_batch(datasets):
  mesh = sharding.make_mesh(1)
  hopper = [datasets[0]]
  s = WindowSampler(
    hopper, window=WINDOW, context_len=K, batch_size=2, obs_fn="none", seed=0, mesh=mesh
  )
  batch = s.batch(0)
  for leaf in jax.tree.leaves(batch):
    assert leaf.sharding.is_equivalent_to(sharding.data_sharding(mesh), leaf.ndim)
  np.testing.assert_array_equal(batch.domain, [0, 0])


def test_fit_normalizer_by_hand(datasets):
  # More records than the training streams hold: every training record, none held out.
  norm = fit_normalizer(datasets, "none", seed=0, num_records=10**6)
  by_id = records(datasets)
  train = {0: [0, 1, 2, 3, 5, 6], 1: [10, 11, 12], 2: [20, 21]}  # HELD_OUT excluded
  for d, streams in train.items():
    x = np.concatenate([by_id[s][1].obs[by_id[s][2]] for s in streams]).astype(np.float64)
    width = specs.DOMAINS[d].obs_dim
    np.testing.assert_allclose(norm.mean[d, :width], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std[d, :width], x.std(0), rtol=1e-5)
    np.testing.assert_array_equal(norm.mean[d, width:], 0)
    np.testing.assert_array_equal(norm.std[d, width:], 1)
  # A draw is a pure function of the seed.
  a, b = (fit_normalizer(datasets, "none", seed=s, num_records=25) for s in (0, 0))
  c = fit_normalizer(datasets, "none", seed=1, num_records=25)
  np.testing.assert_array_equal(a.mean, b.mean)
  assert not np.array_equal(a.mean, c.mean)
  with pytest.raises(ValueError, match=r"num_records \(data.normalizer_records\) must be > 0"):
    fit_normalizer(datasets, "none", seed=0, num_records=0)


def _drifting(path, chunks, start, total, rng):
  """A hopper dataset of `chunks` chunks of 5 streams × 400 records whose statistics drift along
  the data: record r of `total` (file order, from `start`) holds 5 + 4p + (0.5 + 2p)·N(0, 1) in
  every entry, p = r / total. Its last stream (held out) holds 1000."""
  writer = dataset_lib.DatasetWriter(path, "hopper", "mix", EPISODE_LENGTH)
  for c in range(chunks):
    ids = start // 400 + np.arange(5)
    arrays = make_chunk("hopper", ids, n_episodes=40)
    p = (start + np.arange(5 * 400).reshape(5, 400, 1)) / total
    arrays["obs"] = (5 + 4 * p + (0.5 + 2 * p) * rng.normal(size=(5, 400, 15))).astype(np.float32)
    if c == chunks - 1:
      arrays["obs"][-1] = 1000.0
    writer.append(**arrays)
    start += 5 * 400
  return writer.close()


def test_fit_normalizer_draws_uniformly_over_drifting_data(tmp_path):
  # METHOD.md Eq. 5: 12k records in 6 chunks of two datasets, 10.4k of them for training; the
  # fit sees 3k. A fit on the first records would see the early, narrow part only.
  rng = np.random.default_rng(0)
  datasets = [
    _drifting(tmp_path / "a", 4, 0, 12_000, rng),
    _drifting(tmp_path / "b", 2, 8_000, 12_000, rng),
  ]
  held_out = {(0, 19), (1, 9)}  # (dataset, stream): the last of each
  train = [
    np.asarray(ds.locate(s)[0].obs[ds.locate(s)[1]], np.float64)
    for k, ds in enumerate(datasets)
    for s in range(ds.num_streams)
    if (k, s) not in held_out
  ]
  x = np.concatenate(train)
  mean, std = x.mean(0), x.std(0)
  first = x[:3000]  # the first 3k training records, in stream order

  def close(m, sd):  # within 5% of the whole data's mean and std, and the mean within 5% of std
    return (
      np.all(np.abs(m - mean) <= 0.05 * np.abs(mean))
      and np.all(np.abs(m - mean) <= 0.05 * std)
      and np.all(np.abs(sd - std) <= 0.05 * std)
    )

  assert not close(first.mean(0), first.std(0))  # the check does tell the two fits apart
  norm = fit_normalizer(datasets, "none", seed=0, num_records=3000, holdout_streams=1)
  assert close(np.asarray(norm.mean[0, :15]), np.asarray(norm.std[0, :15])), (
    np.abs(norm.mean[0, :15] - mean).max(),
    np.abs(norm.std[0, :15] - std).max(),
  )


def test_empty_token_gets_a_gradient_from_sampler_batches(datasets, sampler):
  # METHOD.md Eq. 4: `empty` must be trained. The tiny model with K = 4, T = 6 (this module's
  # layout), on real sampler batches: one with windows that begin before their stream, and one
  # whose windows are all full (the only kind the sampler drew before), where `empty` is unused.
  config = config_lib.tiny()
  config.context_len, config.seq_len = K, WINDOW - K
  first = jax.device_get(sampler.batch(0))
  norm = normalizer_lib.fit(first.obs, first.domain, first.valid, first.obs_mask)  # numpy
  world_model = model_lib.make_world_model(config)
  init = jax.jit(lambda key: (world_model.init(key), losses.init_values(world_model.spec, key)))
  variables, values = init(jax.random.key(0))
  variables = {**variables, "normalizer": norm}
  loss = losses.make_loss(world_model)

  @jax.jit
  def grad_empty(variables, values, batch):  # d loss / d empty (METHOD.md Eq. 16's total)
    def objective(empty):
      params = variables["params"]
      params = {**params, "context_encoder": {**params["context_encoder"], "empty": empty}}
      target = {"v": values["v"]}
      return loss({**variables, "params": params}, values, target, batch, jax.random.key(1))[0]

    return jax.grad(objective)(variables["params"]["context_encoder"]["empty"])

  plans = [sampler.indices(i).start for i in range(100)]
  early = next(i for i, s in enumerate(plans) if (s < 0).any())
  full = next(i for i, s in enumerate(plans) if (s >= 0).all())
  g_early = np.asarray(grad_empty(variables, values, sampler.batch(early)))
  g_full = np.asarray(grad_empty(variables, values, sampler.batch(full)))
  assert np.isfinite(g_early).all() and np.abs(g_early).sum() > 1e-6, g_early
  assert not g_full.any()  # full windows never read `empty`
