"""Pretraining windows from on-disk datasets: `WindowSampler` and `fit_normalizer`.

A batch has B rows of `window` = K + T (context_len + seq_len) consecutive slots of one stream
(`world_model.batch.Batch`). Row b belongs to domain `domain_ids[b % len(domain_ids)]` (METHOD.md:
the domains in equal shares), so every batch holds every domain. A window's first training step
(slot K) is drawn uniformly among all records of the domain's training streams that leave room
for the T training steps, so it may be any record of a stream, including its first K (METHOD.md
Eq. 4). Slots before the stream's first record hold no transition: `valid` is False there and
they hold zeros (the model reads them as the learned `empty` context token; they are only ever
context slots, so they carry no loss). Every other slot is a record, `valid` True; a window may
span episode boundaries inside the stream (its `first` flags mark them).

The observation function (PROTOCOL.md) is applied here, keyed by (experiment seed, domain,
stream id, step0 + record index) as in the env, so a record looks the same at every window
position. One jitted function per sampler layout does it (the row → domain assignment is static,
so each domain's rows use their static DomainSpec), pads observations to OBS_PAD and actions to
ACT_PAD, builds the masks and returns the Batch, sharded along 'data' when a mesh is given. The
function id is data: changing it does not recompile. Observations stay raw (unnormalised).

Several processes (multi-host): with a mesh over every process, each process reads from disk and
assembles only the rows its own devices hold (`sharding.process_rows`), and the blocks are joined
into one global array without moving data between hosts. Every process draws the same window
plan, so the batch is the single-process batch, row for row.

Determinism: the windows of batch i are a pure function of (seed, i), so `batches(start=i)`
resumes exactly from a checkpoint's data position i. A background thread gathers upcoming
batches from the memory maps, transfers and finalises them into a bounded queue; the time the
consumer spends waiting on it accumulates in `wait_seconds`.

Held out: the last `holdout_streams` streams of every dataset never appear in training batches
nor in the normaliser's fit; `holdout_batch` draws evaluation windows from them, each starting
at an episode's first record (all slots valid).

Normaliser (METHOD.md Eq. 5): `fit_normalizer` fits on records drawn uniformly, with a fixed
seed, over every training stream of each domain (not the first records, which come from the
earliest behaviour policy); it reads only the drawn records, chunk by chunk, in file order.

The online mode of PROTOCOL.md (regenerating `mix` in MJX during pretraining) would sit behind
this same interface; it is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mrcom_jax.data.dataset import Dataset
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.training import sharding
from mrcom_jax.world_model import normalizer as normalizer_lib
from mrcom_jax.world_model.batch import Batch

_TRAIN_TAG = 0x7A1  # separates the training draws' RNG stream from the held-out draws'
_HOLDOUT_TAG = 0x40D
_NORMALIZER_TAG = 0x2F5


@dataclasses.dataclass(frozen=True)
class WindowIndex:
  """Where each row's window lies. All fields are [B] int64 arrays.

  Attributes:
    dataset: index into the sampler's `datasets`.
    stream: stream index inside that dataset (stream order, not the global id).
    start: index inside the stream of the record at the window's first slot; negative when
      the window begins before the stream (its first −start slots are invalid).
  """

  dataset: np.ndarray
  stream: np.ndarray
  start: np.ndarray


def _perturb(spec: specs.DomainSpec, fn_id, seed_key, obs, stream, step):
  """Applies observation function `fn_id` to records of one domain.

  Args:
    spec: the static DomainSpec.
    fn_id: int32 scalar.
    seed_key: [2] uint32, `jax.random.PRNGKey(seed)`.
    obs: [N, d_o] float32 clean observations.
    stream: [N] int32 global stream ids.
    step: [N] int32 stream step indices.

  Returns:
    [N, OBS_PAD] float32.
  """
  sigma = obs_functions.obs_scale(spec.name)
  f = lambda o, s, k: obs_functions.apply(fn_id, o, seed_key, spec, stream=s, step=k, sigma=sigma)
  return jax.vmap(f)(obs, stream, step)


def _assemble(domain_ids: tuple[int, ...], offset: int, fn_id, seed_key, groups) -> Batch:
  """Finalises host-gathered windows into a Batch (traced inside jit).

  Args:
    domain_ids: static, the domains present, in row-cycle order.
    offset: static, the global index of the first row modulo len(domain_ids) (0 for a whole
      batch; a process's block of rows may start elsewhere).
    fn_id: int32 scalar observation-function id.
    seed_key: [2] uint32.
    groups: one dict per domain, its rows in batch order: obs [n, W, d_o], action [n, W, d_a],
      reward [n, W], first [n, W] bool, valid [n, W] bool, xi [n, 6], stream [n] int32,
      step0 [n] int32 (the step of slot 0, which may lie before the stream).

  Returns:
    A Batch of m = Σ n rows; row r belongs to domain_ids[(offset + r) % len(domain_ids)] and is
    that group's next row.
  """
  parts = []
  for d, g in zip(domain_ids, groups, strict=True):
    spec = specs.DOMAINS[d]
    n, w = g["reward"].shape
    step = g["step0"][:, None] + jnp.arange(w, dtype=jnp.int32)
    stream = jnp.broadcast_to(g["stream"][:, None], (n, w))
    obs = _perturb(
      spec,
      fn_id,
      seed_key,
      g["obs"].reshape(n * w, spec.obs_dim),
      stream.reshape(-1),
      step.reshape(-1),
    ).reshape(n, w, specs.OBS_PAD)
    parts.append(
      dict(
        obs=jnp.where(g["valid"][..., None], obs, 0.0),  # slots before the stream hold zeros
        action=specs.pad_action(g["action"]),
        reward=g["reward"],
        first=g["first"],
        valid=g["valid"],
        domain=jnp.full((n,), d, jnp.int32),
        obs_mask=jnp.broadcast_to(jnp.asarray(specs.obs_mask(d, fn_id)), (n, specs.OBS_PAD)),
        act_mask=jnp.broadcast_to(jnp.asarray(specs.act_mask(d)), (n, specs.ACT_PAD)),
        xi=g["xi"],
      )
    )
  sizes = [p["reward"].shape[0] for p in parts]
  order = _row_order(sizes, offset)
  fields = {k: jnp.concatenate([p[k] for p in parts])[order] for k in parts[0]}
  return Batch(**fields)


def _group_rows(num_groups: int, rows: slice, group: int) -> np.ndarray:
  """The global rows b in [rows.start, rows.stop) with b % num_groups == group, in order."""
  first = rows.start + (group - rows.start) % num_groups
  return np.arange(first, rows.stop, num_groups)


def _row_order(sizes: Sequence[int], offset: int = 0) -> np.ndarray:
  """Positions in the concatenated groups of the rows r = 0..m-1: row r is the next entry of
  group (offset + r) % G."""
  g, m = len(sizes), sum(sizes)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  rows = np.arange(m)
  group = (offset + rows) % g
  entry = (rows - (group - offset) % g) // g
  expected = [len(_group_rows(g, slice(offset, offset + m), j)) for j in range(g)]
  if list(sizes) != expected:
    raise ValueError(f"group sizes {sizes} do not follow the cyclic row assignment {expected}")
  return offsets[group] + entry


@functools.cache
def _assembler(domain_ids: tuple[int, ...], offset: int, mesh: Mesh | None):
  """The jitted `_assemble` of a layout (shapes retrace; the obs function id is data); its rows
  are split across `mesh`'s 'data' axis when given."""
  fn = functools.partial(_assemble, domain_ids, offset)
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(
    fn, in_shardings=sharding.replicated(mesh), out_shardings=sharding.data_sharding(mesh)
  )


@functools.cache
def _perturber(domain_id: int):
  return jax.jit(functools.partial(_perturb, specs.DOMAINS[domain_id]))


def _fn_id(obs_fn: int | str) -> int:
  if isinstance(obs_fn, str):
    return obs_functions.obs_fn_id(obs_fn)
  if not 0 <= int(obs_fn) < len(obs_functions.OBS_FUNCTIONS):
    raise ValueError(
      f"observation function id {obs_fn} not in [0, {len(obs_functions.OBS_FUNCTIONS)})"
    )
  return int(obs_fn)


class _Failure:
  def __init__(self, exc: BaseException):
    self.exc = exc


class BatchIterator:
  """Iterates batches start, start + 1, ... with a background prefetch thread.

  Attributes:
    position: the index of the next batch `next` returns (a checkpoint's data position).
  """

  def __init__(self, sampler: WindowSampler, start: int, prefetch: int):
    self._sampler = sampler
    self.position = start
    self._stop = threading.Event()
    self._queue: queue.Queue | None = None
    self._thread = None
    if prefetch > 0:
      self._queue = queue.Queue(maxsize=prefetch)
      self._thread = threading.Thread(
        target=self._produce, args=(start,), name="WindowSampler-prefetch", daemon=True
      )
      self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, i: int) -> None:
    try:
      while not self._stop.is_set():
        batch = jax.block_until_ready(self._sampler.batch(i))
        if not self._put(batch):
          return
        i += 1
    except BaseException as e:  # re-raised in the consumer
      self._put(_Failure(e))

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> Batch:
    if self._stop.is_set():
      raise StopIteration
    t0 = time.perf_counter()
    if self._queue is None:
      item = self._sampler.batch(self.position)
    else:
      while True:
        try:
          item = self._queue.get(timeout=0.1)
          break
        except queue.Empty:
          if not self._thread.is_alive():
            raise RuntimeError("the prefetch thread ended unexpectedly") from None
    self._sampler.wait_seconds += time.perf_counter() - t0
    if isinstance(item, _Failure):
      self.close()
      raise item.exc
    self.position += 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread (idempotent)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    self._sampler._iterators.discard(self)

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class WindowSampler:
  """Uniform windows of consecutive records from datasets of several domains.

  Attributes:
    datasets: the datasets, as given.
    domain_ids: the domains present, in id order; row b belongs to domain_ids[b % len].
    window: slots per row, K + T.
    context_len: K, the slots before a window's first training step.
    batch_size: B.
    obs_fn: the observation-function id (may be changed between batches: it is data).
    seed: the experiment seed (observation-function key and window draws).
    wait_seconds: total time consumers of `batches` spent waiting for data.
  """

  def __init__(
    self,
    datasets: Sequence[Dataset],
    *,
    window: int,
    context_len: int,
    batch_size: int,
    obs_fn: int | str,
    seed: int,
    mesh: Mesh | None = None,
    holdout_streams: int = 1,
    prefetch: int = 2,
  ):
    """Indexes the training and held-out streams; reads no records yet.

    Args:
      datasets: Datasets of one or more domains (several per domain allowed).
      window: K + T slots per row.
      context_len: K (world_model.context_len): a window's first training step, slot K, is any
        record of a stream that leaves room for the T training steps; the slots of its context
        that lie before the stream's first record are invalid (the model's `empty` token).
      batch_size: B, at least the number of domains present (and divisible by the mesh size).
      obs_fn: observation function name or id.
      seed: experiment seed ≥ 0.
      mesh: if given, batches are sharded along its 'data' axis; a mesh over several processes
        makes each process read only its own rows.
      holdout_streams: the last this many streams of each dataset are held out of training.
      prefetch: batches the background thread keeps ready (0: no thread).

    Raises:
      ValueError: no datasets, `window` longer than the shortest stream, a dataset with too few
        streams, or a batch size that does not fit the domains or the mesh.
    """
    self.datasets = list(datasets)
    if not self.datasets:
      raise ValueError("WindowSampler needs at least one dataset")
    if window < 1:
      raise ValueError(f"window (= context_len + seq_len) must be ≥ 1, got {window}")
    if not 0 <= context_len < window:
      raise ValueError(
        f"context_len must be in [0, window = {window}) (seq_len ≥ 1), got {context_len}"
      )
    if seed < 0:
      raise ValueError(f"seed must be ≥ 0, got {seed}")
    if holdout_streams < 0 or prefetch < 0:
      raise ValueError("holdout_streams and prefetch must be ≥ 0")
    self.window, self.batch_size, self.seed = int(window), int(batch_size), int(seed)
    self.context_len = int(context_len)
    self.obs_fn = _fn_id(obs_fn)
    self.mesh, self.prefetch, self.holdout_streams = mesh, prefetch, holdout_streams
    self.domain_ids = tuple(sorted({ds.spec.id for ds in self.datasets}))
    if batch_size < len(self.domain_ids):
      raise ValueError(
        f"batch_size {batch_size} is smaller than the {len(self.domain_ids)} domains present"
      )
    self._check_mesh(batch_size)
    shortest = min(self.datasets, key=lambda ds: ds.stream_lengths.min(initial=2**62))
    if shortest.num_streams == 0 or window > shortest.stream_lengths.min():
      length = shortest.stream_lengths.min() if shortest.num_streams else 0
      raise ValueError(
        f"window = context_len + seq_len = {window} exceeds the shortest stream "
        f"({length} records, in {shortest.path})"
      )
    for ds in self.datasets:
      if ds.num_streams <= holdout_streams:
        raise ValueError(
          f"{ds.path} has {ds.num_streams} streams: too few to hold out {holdout_streams}"
        )
    # Training windows per domain: (dataset, stream, count) with cumulative counts; a stream of
    # L records has L − T + 1 first training steps.
    self._train = {}
    self._holdout = {}
    for d in self.domain_ids:
      k_arr, s_arr, lengths = _training_streams(self.datasets, d, holdout_streams)
      if not len(k_arr):
        raise ValueError(f"no {specs.DOMAINS[d].name} stream is left for training windows")
      self._train[d] = (k_arr, s_arr, np.cumsum(lengths - (window - context_len) + 1))
      self._holdout[d] = [
        (k, s)
        for k, ds in enumerate(self.datasets)
        if ds.spec.id == d
        for s in range(ds.num_streams - holdout_streams, ds.num_streams)
      ]
    self._rows = {
      d: np.arange(j, batch_size, len(self.domain_ids)) for j, d in enumerate(self.domain_ids)
    }
    self._seed_key = np.asarray(jax.random.PRNGKey(self.seed))
    self._iterators: set[BatchIterator] = set()
    self.wait_seconds = 0.0

  def _check_mesh(self, n: int) -> None:
    if self.mesh is not None:
      devices = self.mesh.shape[sharding.DATA_AXIS]
      if n % devices:
        raise ValueError(f"batch size {n} is not divisible by the mesh's {devices} devices")

  @property
  def num_train_windows(self) -> dict[str, int]:
    """Training windows (first training steps) per domain name."""
    return {specs.DOMAINS[d].name: int(t[2][-1]) for d, t in self._train.items()}

  def indices(self, i: int) -> WindowIndex:
    """The windows of batch i: a pure function of (seed, i)."""
    if i < 0:
      raise ValueError(f"batch index must be ≥ 0, got {i}")
    rng = np.random.default_rng([_TRAIN_TAG, self.seed, i])
    b = self.batch_size
    index = WindowIndex(np.zeros(b, np.int64), np.zeros(b, np.int64), np.zeros(b, np.int64))
    for d in self.domain_ids:
      k_arr, s_arr, cum = self._train[d]
      rows = self._rows[d]
      u = rng.integers(0, cum[-1], size=len(rows))
      j = np.searchsorted(cum, u, side="right")
      index.dataset[rows] = k_arr[j]
      index.stream[rows] = s_arr[j]
      index.start[rows] = u - np.concatenate([[0], cum])[j] - self.context_len
    return index

  def gather(self, index: WindowIndex, window: int | None = None) -> Batch:
    """Reads the windows of `index` from the memory maps and finalises them into a Batch.

    Row b must belong to domain `domain_ids[b % len(domain_ids)]`; a window may begin up to
    `context_len` slots before its stream (those slots are invalid). With a mesh that spans several
    processes, each process reads only the rows its devices hold (`sharding.process_rows`) and
    the result is one global array sharded along 'data'.
    """
    window = self.window if window is None else window
    n = len(index.dataset)
    self._check_mesh(n)
    if self.mesh is None:
      return self.gather_rows(index, slice(0, n), window)
    local = self.gather_rows(index, sharding.process_rows(self.mesh, n), window)
    return sharding.global_batch(local, self.mesh, n)

  def gather_rows(self, index: WindowIndex, rows: slice, window: int | None = None) -> Batch:
    """Rows [rows.start, rows.stop) of the batch `index` describes, reading only those windows.

    Equal to those rows of the whole batch. Split across this process's devices when the sampler
    has a mesh (`sharding.local_sharding`), else on the default device.
    """
    window = self.window if window is None else window
    num_domains = len(self.domain_ids)
    groups = []
    for j, d in enumerate(self.domain_ids):
      spec = specs.DOMAINS[d]
      picked = _group_rows(num_domains, rows, j)
      m = len(picked)
      g = dict(
        obs=np.empty((m, window, spec.obs_dim), np.float32),
        action=np.empty((m, window, spec.act_dim), np.float32),
        reward=np.empty((m, window), np.float32),
        first=np.empty((m, window), bool),
        valid=np.empty((m, window), bool),
        xi=np.empty((m, specs.XI_DIM), np.float32),
        stream=np.empty((m,), np.int32),
        step0=np.empty((m,), np.int32),
      )
      for r, b in enumerate(picked):
        ds = self.datasets[index.dataset[b]]
        if ds.spec.id != d:
          raise ValueError(f"row {b} should hold {spec.name}, its dataset holds {ds.domain}")
        chunk, row = ds.locate(int(index.stream[b]))
        t0 = int(index.start[b])
        if not -self.context_len <= t0 <= chunk.length - window:
          raise ValueError(
            f"row {b}: window [{t0}, {t0 + window}) leaves its stream ({chunk.length}) "
            f"by more than context_len = {self.context_len} slots before it, or past its end"
          )
        pre, sl = max(-t0, 0), slice(max(t0, 0), t0 + window)  # pre: slots before the stream
        for name in ("obs", "action", "reward", "first"):
          g[name][r, :pre] = 0
          g[name][r, pre:] = getattr(chunk, name)[row, sl]
        g["valid"][r, :pre], g["valid"][r, pre:] = False, True
        g["xi"][r] = chunk.xi[row]
        g["stream"][r] = chunk.stream[row]
        g["step0"][r] = chunk.step0[row] + t0
      groups.append(g)
    mesh = None if self.mesh is None else self.mesh.local_mesh
    assemble = _assembler(self.domain_ids, rows.start % num_domains, mesh)
    return assemble(np.int32(self.obs_fn), self._seed_key, tuple(groups))

  def batch(self, i: int) -> Batch:
    """Batch i, synchronously (what `batches` yields at position i)."""
    return self.gather(self.indices(i))

  def batches(self, start: int = 0) -> BatchIterator:
    """An iterator over batches start, start + 1, ..., prefetched by a background thread."""
    it = BatchIterator(self, start, self.prefetch)
    self._iterators.add(it)
    return it

  def holdout_batch(self, n: int, window: int | None = None, seed: int = 0) -> Batch:
    """n windows from held-out streams, each starting at an episode's first record.

    Rows follow the training layout (row b belongs to domain_ids[b % len]); starts are drawn
    uniformly among the episode starts of the domain's held-out streams that leave room for
    `window` records. With window ≤ episode_length + 1 every window lies inside one episode.
    """
    window = self.window if window is None else window
    if n < len(self.domain_ids):
      raise ValueError(f"n = {n} is smaller than the {len(self.domain_ids)} domains present")
    if not self.holdout_streams:
      raise ValueError("this sampler holds out no streams (holdout_streams=0)")
    rng = np.random.default_rng([_HOLDOUT_TAG, seed])
    index = WindowIndex(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
    for j, d in enumerate(self.domain_ids):
      cands = []
      for k, s in self._holdout[d]:
        ds = self.datasets[k]
        starts = np.arange(0, ds.stream_lengths[s] - window + 1, ds.episode_length + 1)
        cands += [(k, s, t) for t in starts]
      if not cands:
        raise ValueError(
          f"no held-out {specs.DOMAINS[d].name} stream is long enough for window {window}"
        )
      rows = np.arange(j, n, len(self.domain_ids))
      pick = np.asarray(cands)[rng.integers(0, len(cands), size=len(rows))]
      index.dataset[rows], index.stream[rows], index.start[rows] = pick.T
    return self.gather(index, window)

  def close(self) -> None:
    """Stops every prefetch thread."""
    for it in list(self._iterators):
      it.close()

  def __enter__(self) -> WindowSampler:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _training_streams(datasets: Sequence[Dataset], domain_id: int, holdout_streams: int):
  """The training streams of one domain: every stream of its datasets but each one's last
  `holdout_streams`, in order (datasets as given, then stream order).

  Returns:
    (dataset index, stream index, records) of each stream: three [n] int64 arrays.
  """
  k_list, s_list = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for k, ds in enumerate(datasets):
    if ds.spec.id == domain_id:
      n_train = max(ds.num_streams - holdout_streams, 0)
      k_list.append(np.full(n_train, k, np.int64))
      s_list.append(np.arange(n_train, dtype=np.int64))
  k_arr, s_arr = np.concatenate(k_list), np.concatenate(s_list)
  lengths = np.array([datasets[k].stream_lengths[s] for k, s in zip(k_arr, s_arr)], np.int64)
  return k_arr, s_arr, lengths


def _read_records(datasets: Sequence[Dataset], k_arr, s_arr, lengths, picks):
  """Clean observations, global stream ids and stream steps of the given records.

  Args:
    datasets, k_arr, s_arr, lengths: as `_training_streams` returns them.
    picks: [n] sorted int64 indices into the concatenation of those streams' records.

  Returns:
    obs [n, d_o] float32, stream [n] int32, step [n] int32, in the order of `picks`. Each chunk
    is read once, with one fancy index over its picked (row, record) pairs, in file order.
  """
  ends = np.cumsum(lengths)
  j = np.searchsorted(ends, picks, side="right")  # the stream of each pick
  offset = picks - (ends - lengths)[j]
  chunk_of = np.array([datasets[k].stream_chunk[s] for k, s in zip(k_arr, s_arr)], np.int64)
  key = np.stack([k_arr[j], chunk_of[j]], 1)  # sorted, since streams are in file order
  cut = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
  obs, stream, step = [], [], []
  for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(picks)]):
    if lo == hi:
      continue
    ds = datasets[k_arr[j[lo]]]
    chunk = ds.chunk(int(chunk_of[j[lo]]))
    rows = ds.stream_row[s_arr[j[lo:hi]]]
    obs.append(np.asarray(chunk.obs[rows, offset[lo:hi]], np.float32))
    stream.append(np.asarray(chunk.stream[rows], np.int32))
    step.append((chunk.step0[rows] + offset[lo:hi]).astype(np.int32))
  return np.concatenate(obs), np.concatenate(stream), np.concatenate(step)


def fit_normalizer(
  datasets: Sequence[Dataset],
  obs_fn: int | str,
  seed: int,
  num_records: int = 50_000,
  *,
  holdout_streams: int = 1,
) -> normalizer_lib.Normalizer:
  """The per-domain normaliser (METHOD.md Eq. 5), fitted on records drawn uniformly over the
  training data of each domain.

  For each domain, `num_records` records (all of them if there are fewer) are drawn without
  replacement, uniformly over the records of its training streams (each dataset's last
  `holdout_streams` streams are held out, as in `WindowSampler`), from an RNG fixed by (seed,
  domain). Only the drawn records are read (sorted, chunk by chunk). The observation function
  is applied to them (the model sees perturbed observations, keyed as in the sampler) before
  `world_model.normalizer.fit`.

  Args:
    datasets: datasets of one or more domains.
    obs_fn: observation function name or id.
    seed: experiment seed (observation-function key and the draw).
    num_records: records per domain, > 0.
    holdout_streams: the streams each dataset holds out (the sampler's `holdout_streams`).

  Returns:
    A Normalizer (frozen: nothing updates it afterwards).
  """
  if num_records < 1:
    raise ValueError(f"num_records (data.normalizer_records) must be > 0, got {num_records}")
  if holdout_streams < 0:
    raise ValueError(f"holdout_streams must be ≥ 0, got {holdout_streams}")
  fn_id = np.int32(_fn_id(obs_fn))
  seed_key = np.asarray(jax.random.PRNGKey(seed))
  per_domain = {}
  for d in sorted({ds.spec.id for ds in datasets}):
    k_arr, s_arr, lengths = _training_streams(datasets, d, holdout_streams)
    total = int(lengths.sum())
    if not total:
      continue
    rng = np.random.default_rng([_NORMALIZER_TAG, seed, d])
    picks = np.sort(rng.choice(total, size=min(num_records, total), replace=False))
    obs, stream, step = _read_records(datasets, k_arr, s_arr, lengths, picks)
    # Padded to a power of two (≥ 4096) so that few record counts compile the perturber.
    n, size = len(picks), max(4096, 1 << (len(picks) - 1).bit_length())
    obs, stream, step = (
      np.pad(x, [(0, size - n)] + [(0, 0)] * (x.ndim - 1)) for x in (obs, stream, step)
    )
    per_domain[d] = np.asarray(_perturber(d)(fn_id, seed_key, obs, stream, step))[:n]
  if not per_domain:
    return normalizer_lib.Normalizer.identity()
  ids = list(per_domain)
  length = max(len(x) for x in per_domain.values())
  obs = np.zeros((len(ids), length, specs.OBS_PAD), np.float32)
  valid = np.zeros((len(ids), length), bool)
  for r, d in enumerate(ids):
    obs[r, : len(per_domain[d])] = per_domain[d]
    valid[r, : len(per_domain[d])] = True
  obs_mask = np.stack([specs.obs_mask(d, int(fn_id)) for d in ids])
  return normalizer_lib.fit(obs, np.asarray(ids), valid, obs_mask)
