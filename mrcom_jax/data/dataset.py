"""Behaviour datasets on disk: a documented, versioned, chunked format (version 1).

A dataset holds the transitions of one (domain, training distribution, kind). It is a directory
of numpy arrays that are read memory-mapped, chunk by chunk, so no reader ever needs the whole
dataset in memory, and a writer that streams chunks to disk while a behaviour run goes on.

Format (version 1)
==================

```
<dir>/meta.json                 the index (below); the only file a reader trusts
<dir>/chunk_00000/obs.npy       [S, L, d_o] float32  clean observations o_t (never perturbed)
                 /action.npy    [S, L, d_a] float32  a_t taken at o_t; 0 at an episode's last record
                 /reward.npy    [S, L]      float32  r_t, the reward of s_t; 0 at an episode's first
                 /first.npy     [S, L]      bool     episode start
                 /last.npy      [S, L]      bool     episode end (truncation at episode_length)
                 /xi.npy        [S, 6]      float32  scenario descriptor ξ of each stream
                 /stream.npy    [S]         int32    global stream id (observation-function key)
                 /step0.npy     [S]         int32    stream step index of record 0 (same key)
<dir>/chunk_00001/...
```

- A **stream** is a run of consecutive whole episodes of one scenario in one env slot. Record j of
  a stream is the state the slot produced at step `step0 + j`; its observation function key is
  `(seed, domain, stream, step0 + j)` (`envs.obs_functions.step_key`), exactly as in the env.
  When collection drops a diverged episode, the slot's two remaining runs are two streams with
  the same id and different `step0`, so every record keeps its key.
- Every episode has `episode_length + 1` records (control steps + 1), so a stream of n episodes
  has `L = n · (episode_length + 1)` records; `first` is True exactly at multiples of
  `episode_length + 1` and `last` exactly one record before the next `first`.
- One chunk holds S streams of equal length L; different chunks may differ in S and L.
  Streams are numbered in chunk order, then row order ("stream order").
- `meta.json` fields:

  | field | what |
  |---|---|
  | `format` | `"mrcom-dataset"` |
  | `version` | `1` (a reader refuses a newer version) |
  | `domain` | `"hopper"`, `"walker"` or `"cheetah"` |
  | `kind` | `mix`, `medium`, `expert`, `random`, or `behaviour` (see below) |
  | `obs_dim`, `act_dim` | the domain's widths d_o, d_a |
  | `episode_length` | control steps per episode |
  | `complete` | False while a writer may append; readers refuse incomplete data unless asked |
  | `chunks` | `[{"name", "streams", "length"}]`, in order: the only chunks that exist |
  | `num_streams`, `num_records` | totals over `chunks` |
  | `info` | free-form JSON from the writer (scenario distribution, seed, policy snapshot, ...) |

- Kinds: `mix`, `medium`, `expert` and `random` are PROTOCOL.md's datasets; `behaviour` holds
  every stream a behaviour run generated, from which `select_streams` draws `mix`.
- Crash safety: a chunk is written into a temporary directory (`.tmp-*`) and renamed into place
  (`os.replace`) before `meta.json` is replaced atomically (temporary file + `os.replace`) to list
  it. A crash therefore leaves at worst an unreferenced directory, which readers ignore and
  `DatasetWriter.resume` removes. A resumed collection stage calls `truncate_to(n)` to drop the
  chunks written after its last checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from mrcom_jax.envs import specs

FORMAT = "mrcom-dataset"
VERSION = 1
KINDS = ("mix", "medium", "expert", "random", "behaviour")
META_FILE = "meta.json"
FIELDS = ("obs", "action", "reward", "first", "last", "xi", "stream", "step0")
_TMP_PREFIX = ".tmp-"
_CHUNK_RE = re.compile(r"^chunk_\d{5}$")
_MMAP_CACHE_SIZE = 64  # chunks whose memory maps a Dataset keeps open


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One chunk's arrays (memory-mapped when read from disk). Shapes as in the module docstring.

  Attributes:
    obs: [S, L, d_o] float32.
    action: [S, L, d_a] float32.
    reward: [S, L] float32.
    first: [S, L] bool.
    last: [S, L] bool.
    xi: [S, 6] float32.
    stream: [S] int32.
    step0: [S] int32.
  """

  obs: np.ndarray
  action: np.ndarray
  reward: np.ndarray
  first: np.ndarray
  last: np.ndarray
  xi: np.ndarray
  stream: np.ndarray
  step0: np.ndarray

  @property
  def num_streams(self) -> int:
    return self.obs.shape[0]

  @property
  def length(self) -> int:
    """Records per stream, L."""
    return self.obs.shape[1]


def episode_pattern(length: int, episode_length: int) -> tuple[np.ndarray, np.ndarray]:
  """The `first` and `last` flags of a stream of `length` records: two [length] bool arrays."""
  j = np.arange(length) % (episode_length + 1)
  return j == 0, j == episode_length


def chunk_shapes(spec: specs.DomainSpec, streams: int, length: int) -> dict[str, tuple]:
  """The shape of every field of a chunk of `streams` streams of `length` records."""
  return {
    "obs": (streams, length, spec.obs_dim),
    "action": (streams, length, spec.act_dim),
    "reward": (streams, length),
    "first": (streams, length),
    "last": (streams, length),
    "xi": (streams, specs.XI_DIM),
    "stream": (streams,),
    "step0": (streams,),
  }


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = os.path.join(os.path.dirname(path), f"{_TMP_PREFIX}{uuid.uuid4().hex}.json")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path}: no dataset here (missing {META_FILE})")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path}: not valid JSON ({e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise ValueError(f"{meta_path}: format is {got!r}, expected {FORMAT!r}")
  version = meta.get("version")
  if not isinstance(version, int) or version > VERSION:
    raise ValueError(
      f"{meta_path}: format version {version!r} is newer than this reader's ({VERSION}); "
      "update mrcom_jax"
    )
  return meta


class Dataset:
  """A read-only view of a dataset directory; arrays are memory-mapped chunk by chunk.

  Attributes:
    path: the directory.
    meta: the parsed meta.json.
    domain: the domain name; `spec` its DomainSpec.
    stream_lengths: [num_streams] int64 records per stream, in stream order.
    stream_chunk, stream_row: [num_streams] int64, where each stream lives.
  """

  def __init__(self, path: str, meta: dict):
    self.path = os.fspath(path)
    self.meta = meta
    self.spec = specs.get_domain(meta["domain"])
    chunks = meta["chunks"]
    self.stream_chunk = np.concatenate(
      [np.full(c["streams"], i, np.int64) for i, c in enumerate(chunks)] + [np.zeros(0, np.int64)]
    )
    self.stream_row = np.concatenate(
      [np.arange(c["streams"], dtype=np.int64) for c in chunks] + [np.zeros(0, np.int64)]
    )
    self.stream_lengths = np.concatenate(
      [np.full(c["streams"], c["length"], np.int64) for c in chunks] + [np.zeros(0, np.int64)]
    )
    self._cache: collections.OrderedDict[int, Chunk] = collections.OrderedDict()
    self._lock = threading.Lock()  # the sampler's prefetch thread reads chunks too

  @classmethod
  def open(cls, path: str | os.PathLike, allow_incomplete: bool = False) -> Dataset:
    """Opens a dataset directory.

    Raises:
      FileNotFoundError: no meta.json (the message names the file).
      ValueError: wrong format, a newer version, or an incomplete dataset (unless
        `allow_incomplete`, e.g. to inspect a collection that is still running).
    """
    path = os.fspath(path)
    meta = _read_meta(path)
    if not meta.get("complete", False) and not allow_incomplete:
      raise ValueError(
        f"{os.path.join(path, META_FILE)}: dataset is incomplete (its writer has not closed it); "
        "pass allow_incomplete=True to read the chunks written so far"
      )
    return cls(path, meta)

  @property
  def domain(self) -> str:
    return self.meta["domain"]

  @property
  def kind(self) -> str:
    return self.meta["kind"]

  @property
  def episode_length(self) -> int:
    return self.meta["episode_length"]

  @property
  def info(self) -> dict:
    return self.meta.get("info", {})

  @property
  def num_chunks(self) -> int:
    return len(self.meta["chunks"])

  @property
  def num_streams(self) -> int:
    return len(self.stream_lengths)

  @property
  def num_records(self) -> int:
    return int(self.stream_lengths.sum())

  @property
  def num_episodes(self) -> int:
    return self.num_records // (self.episode_length + 1)

  def chunk(self, i: int) -> Chunk:
    """Chunk i's arrays, memory-mapped read-only (np.load(mmap_mode='r'))."""
    if not 0 <= i < self.num_chunks:
      raise IndexError(f"{self.path}: chunk {i} out of range [0, {self.num_chunks})")
    with self._lock:
      if i in self._cache:
        self._cache.move_to_end(i)
        return self._cache[i]
      chunk = self._load_chunk(i)
      self._cache[i] = chunk
      if len(self._cache) > _MMAP_CACHE_SIZE:
        self._cache.popitem(last=False)
      return chunk

  def _load_chunk(self, i: int) -> Chunk:
    entry = self.meta["chunks"][i]
    d = os.path.join(self.path, entry["name"])
    arrays = {}
    for name in FIELDS:
      f = os.path.join(d, f"{name}.npy")
      if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: listed in {META_FILE} but missing")
      arrays[name] = np.load(f, mmap_mode="r")
    chunk = Chunk(**arrays)
    s, length = entry["streams"], entry["length"]
    for name, shape in chunk_shapes(self.spec, s, length).items():
      if arrays[name].shape != shape:
        raise ValueError(f"{d}/{name}.npy: shape {arrays[name].shape}, {META_FILE} says {shape}")
    return chunk

  def __iter__(self) -> Iterator[Chunk]:
    """The chunks in order."""
    for i in range(self.num_chunks):
      yield self.chunk(i)

  def locate(self, stream: int) -> tuple[Chunk, int]:
    """(chunk, row) of a stream, by its index in stream order (not its global id)."""
    return self.chunk(int(self.stream_chunk[stream])), int(self.stream_row[stream])

  def episode_returns(self, block: int = 64) -> np.ndarray:
    """Sum of reward over each episode: [num_episodes] float64, in stream order.

    Read chunk by chunk, `block` streams at a time, so memory stays bounded.
    """
    e = self.episode_length + 1
    out = []
    for chunk in self:
      for lo in range(0, chunk.num_streams, block):
        r = np.asarray(chunk.reward[lo : lo + block], np.float64)
        out.append(r.reshape(r.shape[0], -1, e).sum(-1).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)

  def __repr__(self) -> str:
    return (
      f"Dataset({self.path!r}, domain={self.domain}, kind={self.kind}, "
      f"streams={self.num_streams}, records={self.num_records})"
    )


class DatasetWriter:
  """Streams chunks of whole streams to a dataset directory.

  Create a new dataset with `DatasetWriter(path, domain, kind, episode_length, info)`, or continue
  an incomplete one with `DatasetWriter.resume(path)`. Each `append` writes one chunk atomically
  and then the new meta.json; `close` marks the dataset complete.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    domain: str,
    kind: str,
    episode_length: int = specs.EPISODE_LENGTH,
    info: dict | None = None,
  ):
    """Creates a new, empty, incomplete dataset at `path`.

    Raises:
      FileExistsError: `path` already holds a dataset (use `resume`).
      ValueError: unknown domain or kind, or `info` is not JSON-serialisable.
    """
    path = os.fspath(path)
    spec = specs.get_domain(domain)
    if kind not in KINDS:
      raise ValueError(f"unknown dataset kind {kind!r}: choose one of {KINDS}")
    if episode_length < 1:
      raise ValueError(f"episode_length must be ≥ 1, got {episode_length}")
    if os.path.exists(os.path.join(path, META_FILE)):
      raise FileExistsError(
        f"{os.path.join(path, META_FILE)} exists: use DatasetWriter.resume to continue it"
      )
    info = dict(info or {})
    _check_json(info)
    os.makedirs(path, exist_ok=True)
    meta = {
      "format": FORMAT,
      "version": VERSION,
      "domain": spec.name,
      "kind": kind,
      "obs_dim": spec.obs_dim,
      "act_dim": spec.act_dim,
      "episode_length": int(episode_length),
      "complete": False,
      "chunks": [],
      "num_streams": 0,
      "num_records": 0,
      "info": info,
    }
    self._init(path, meta)
    self._write_meta()

  def _init(self, path: str, meta: dict) -> None:
    self.path = path
    self.meta = meta
    self.spec = specs.get_domain(meta["domain"])
    self._closed = False

  @classmethod
  def resume(cls, path: str | os.PathLike, truncate_to: int | None = None) -> DatasetWriter:
    """Continues an incomplete dataset; removes unreferenced (crash-left) chunk directories.

    Args:
      path: the dataset directory.
      truncate_to: if given, keep only the first `truncate_to` chunks (see `truncate_to`).

    Raises:
      ValueError: the dataset is already complete.
    """
    path = os.fspath(path)
    meta = _read_meta(path)
    if meta.get("complete", False):
      raise ValueError(f"{os.path.join(path, META_FILE)}: dataset is complete; cannot resume it")
    self = cls.__new__(cls)
    self._init(path, meta)
    if truncate_to is not None:
      self.truncate_to(truncate_to)
    self._remove_unreferenced()
    return self

  @property
  def num_chunks(self) -> int:
    return len(self.meta["chunks"])

  @property
  def num_streams(self) -> int:
    return self.meta["num_streams"]

  @property
  def num_records(self) -> int:
    return self.meta["num_records"]

  def _write_meta(self) -> None:
    _write_json_atomic(os.path.join(self.path, META_FILE), self.meta)

  def _remove_unreferenced(self) -> None:
    referenced = {c["name"] for c in self.meta["chunks"]}
    for name in os.listdir(self.path):
      if name.startswith(_TMP_PREFIX) or (_CHUNK_RE.match(name) and name not in referenced):
        full = os.path.join(self.path, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)

  def truncate_to(self, num_chunks: int) -> None:
    """Drops every chunk after the first `num_chunks` (meta.json first, then the files)."""
    self._check_open()
    if not 0 <= num_chunks <= self.num_chunks:
      raise ValueError(f"cannot truncate {self.num_chunks} chunks to {num_chunks}")
    kept = self.meta["chunks"][:num_chunks]
    self.meta["chunks"] = kept
    self.meta["num_streams"] = sum(c["streams"] for c in kept)
    self.meta["num_records"] = sum(c["streams"] * c["length"] for c in kept)
    self._write_meta()
    self._remove_unreferenced()

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"{self.path}: writer is closed")

  def append(self, obs, action, reward, first, last, xi, stream, step0) -> None:
    """Validates and writes one chunk of S streams of L records (shapes as the module docstring).

    Float fields are stored as float32, ids as int32. Actions at `last` records are stored as 0
    (the env ignores them).

    Raises:
      ValueError: a wrong shape or dtype, a non-finite value, a `first`/`last` pattern that is not
        whole episodes of `episode_length + 1` records, a nonzero reward at `first`, or a ξ whose
        domain one-hot is not this dataset's domain.
    """
    self._check_open()
    spec, e = self.spec, self.meta["episode_length"]
    arrays = dict(
      obs=obs, action=action, reward=reward, first=first, last=last, xi=xi, stream=stream,
      step0=step0,
    )  # fmt: skip
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if arrays["obs"].ndim != 3:
      raise ValueError(f"obs must be [S, L, {spec.obs_dim}], got shape {arrays['obs'].shape}")
    s, length = arrays["obs"].shape[:2]
    for name, shape in chunk_shapes(spec, s, length).items():
      if arrays[name].shape != shape:
        raise ValueError(f"{name} must have shape {shape} ({spec.name}), got {arrays[name].shape}")
    for name in ("obs", "action", "reward", "xi"):
      if not np.issubdtype(arrays[name].dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {arrays[name].dtype}")
      arrays[name] = arrays[name].astype(np.float32)
      if not np.isfinite(arrays[name]).all():
        raise ValueError(f"{name} holds non-finite values")
    for name in ("first", "last"):
      if arrays[name].dtype != np.bool_:
        raise ValueError(f"{name} must be bool, got {arrays[name].dtype}")
    for name in ("stream", "step0"):
      if not np.issubdtype(arrays[name].dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got {arrays[name].dtype}")
      a = arrays[name]
      if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} must lie in [0, 2^31), got [{a.min()}, {a.max()}]")
      arrays[name] = a.astype(np.int32)
    if s == 0 or length == 0:
      raise ValueError(f"a chunk needs at least one stream and record, got S={s}, L={length}")
    if length % (e + 1):
      raise ValueError(
        f"stream length {length} is not a whole number of episodes of episode_length + 1 = "
        f"{e + 1} records"
      )
    want_first, want_last = episode_pattern(length, e)
    for name, want in (("first", want_first), ("last", want_last)):
      bad = np.argwhere(arrays[name] != want[None])
      if bad.size:
        srow, j = bad[0]
        raise ValueError(
          f"{name} flags break the episode pattern (first at multiples of episode_length + 1 = "
          f"{e + 1}, last one record before): stream row {srow}, record {j} is "
          f"{bool(arrays[name][srow, j])}"
        )
    if np.any(arrays["reward"][:, want_first] != 0):
      raise ValueError("reward must be 0 at an episode's first record (r_t is the reward of s_t)")
    onehot = arrays["xi"][:, : specs.NUM_DOMAINS]
    if not np.array_equal(
      onehot, np.broadcast_to(np.eye(specs.NUM_DOMAINS)[spec.id], onehot.shape)
    ):
      raise ValueError(f"xi's domain one-hot does not say {spec.name} (id {spec.id})")
    arrays["action"][:, want_last] = 0.0

    name = f"chunk_{self.num_chunks:05d}"
    final = os.path.join(self.path, name)
    tmp = os.path.join(self.path, f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    for field in FIELDS:
      with open(os.path.join(tmp, f"{field}.npy"), "wb") as f:
        np.save(f, arrays[field])
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # unreferenced leftover of a crash: never listed in meta.json
      shutil.rmtree(final)
    os.replace(tmp, final)
    self.meta["chunks"].append({"name": name, "streams": int(s), "length": int(length)})
    self.meta["num_streams"] += int(s)
    self.meta["num_records"] += int(s * length)
    self._write_meta()

  def close(self, info_update: dict | None = None) -> Dataset:
    """Marks the dataset complete (merging `info_update` into `info`) and opens it for reading."""
    self._check_open()
    if info_update:
      _check_json(info_update)
      self.meta["info"].update(info_update)
    self.meta["complete"] = True
    self._write_meta()
    self._closed = True
    return Dataset.open(self.path)

  def __enter__(self) -> DatasetWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Closes (complete) on a normal exit; leaves the dataset incomplete after an exception."""
    if exc_type is None and not self._closed:
      self.close()


def _check_json(info: dict) -> None:
  try:
    json.dumps(info)
  except TypeError as e:
    raise ValueError(f"info must be JSON-serialisable: {e}") from e


def select_streams(
  src: Dataset,
  dst: str | os.PathLike,
  max_records: int,
  rng: np.random.Generator | int,
  kind: str = "mix",
  info: dict | None = None,
) -> Dataset:
  """Builds a dataset of whole streams drawn uniformly (without replacement) from `src`.

  Streams are visited in a uniformly random order and taken while the total stays within
  `max_records` (1M per domain at paper scale); a stream that would overflow it ends the
  selection. The chosen streams are copied chunk by chunk (one output chunk per source chunk that
  contributes, rows in source order), so memory stays bounded by one source chunk's selection.
  An incomplete `dst` left by an interrupted selection is started again; a complete one raises
  FileExistsError.

  Args:
    src: the source dataset (e.g. the behaviour run's `behaviour` dataset).
    dst: the new dataset's directory.
    max_records: the most records to take.
    rng: a numpy Generator or an int seed.
    kind: the new dataset's kind.
    info: merged over `src.info` (with `source`, `max_records` and `selected_streams` added).

  Returns:
    The new, complete Dataset.
  """
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  order = rng.permutation(src.num_streams)
  total = np.cumsum(src.stream_lengths[order])
  chosen = np.sort(order[: int(np.searchsorted(total, max_records, side="right"))])
  dst = os.fspath(dst)
  if os.path.exists(os.path.join(dst, META_FILE)):
    if _read_meta(dst).get("complete", False):
      raise FileExistsError(f"{os.path.join(dst, META_FILE)}: a complete dataset is already there")
    writer = DatasetWriter.resume(dst, truncate_to=0)
    if (writer.meta["domain"], writer.meta["episode_length"]) != (src.domain, src.episode_length):
      raise ValueError(f"{dst}: an unrelated incomplete dataset is in the way")
    writer.meta["kind"] = kind
  else:
    writer = DatasetWriter(dst, src.domain, kind, src.episode_length)
  writer.meta["info"] = {**src.info, **(info or {})}
  for c in range(src.num_chunks):
    rows = src.stream_row[chosen[src.stream_chunk[chosen] == c]]
    if rows.size:
      chunk = src.chunk(c)
      writer.append(**{f: np.asarray(getattr(chunk, f)[rows]) for f in FIELDS})
  return writer.close(
    {
      "source": os.path.abspath(src.path),
      "max_records": int(max_records),
      "selected_streams": [int(s) for s in chosen],
    }
  )
