"""Checkpoints: orbax `CheckpointManager` with validation, fallback and clear mismatch errors.

A checkpoint step holds two items:
  `state`: any pytree of arrays (the train state: parameters, optimiser states, normaliser,
    RNG key, step), saved with `StandardSave` (asynchronously by default);
  `meta`: a JSON dict (the data position, the resolved config, a fingerprint: every state
    leaf's path, shape and dtype, and `digests`: the SHA-256 of every saved leaf's bytes,
    computed on the host from the values handed to orbax).

`Checkpointer.restore_latest(target)` walks the steps from the newest. A step is corrupted when
its files cannot be read (a killed copy, a truncated file), when a restored leaf's bytes differ
from its digest (flipped bytes: the files read back as wrong values without any error from
orbax or TensorStore), or when a restored floating leaf is not finite; a corrupted step is moved
to `corrupted_<step>` with one warning line (the libraries' tracebacks go to the DEBUG log) and
the previous one is tried. A readable step whose fingerprint differs from `target` (e.g.
another model size) raises `CheckpointMismatchError` naming the differing leaves and config
fields, because silently starting afresh would lose the run. orbax writes each step into a
temporary directory and renames it when complete, so a partial save is never listed as a step.
Steps written before digests existed are checked for finiteness only.

Multi-process runs: every process calls `save` and `restore_latest` with its global arrays, as
orbax requires; orbax writes each replicated array once and coordinates the processes, process 0
writes `meta`. Each process digests and verifies the leaves it holds whole (a replicated leaf's
local copy); a leaf no process holds whole is checked for finiteness only. The processes agree
on every verdict, so all of them fall back together.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but was written by a differently shaped run."""


def fingerprint(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a pytree of arrays (or ShapeDtypeStructs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path)] = [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
  return out


def _short(e: Exception, limit: int = 200) -> str:
  """One line: the exception's type and the start of its first line (TensorStore's messages
  continue with pages of specs)."""
  first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  text = f"{type(e).__name__}: {first}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _host_copy(x) -> np.ndarray | None:
  """A leaf's values on this host, or None when this process holds no whole copy of it."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return None
  return np.asarray(x)


def _digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data).hexdigest()


def digests(flat: dict) -> dict[str, str | None]:
  """{key: SHA-256 of the leaf's bytes} of a packed state (None: not held whole here)."""
  out = {}
  for key, x in flat.items():
    a = _host_copy(x)
    out[key] = None if a is None else _digest(a)
  return out


def _not_finite(x) -> bool:
  """Whether a floating leaf holds a NaN or an Inf (on the shards this process holds)."""
  if not jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
    return False
  shards = [x] if not isinstance(x, jax.Array) else [s.data for s in x.addressable_shards]
  return any(not np.isfinite(np.asarray(s)).all() for s in shards)


def _verify(flat: dict, saved: dict | None, names: dict[str, str]) -> str | None:
  """Why a restored packed state is corrupted, or None: a leaf whose bytes differ from its saved
  digest, or a floating leaf that is not finite."""
  for key, x in flat.items():
    want = (saved or {}).get(key)
    if want is not None:
      a = _host_copy(x)
      if a is not None and _digest(a) != want:
        return f"leaf {names.get(key, key)} does not match its digest"
    if _not_finite(x):
      return f"leaf {names.get(key, key)} is not finite"
  return None


def _agree(problem: str | None, what: str) -> str | None:
  """The processes' common verdict: corrupted when any process found it so."""
  if jax.process_count() == 1:
    return problem
  bad = np.max(multihost_utils.process_allgather(np.int32(problem is not None)))
  return problem or (f"corrupted on another process ({what})" if bad else None)


class _ToDebug(logging.Filter):
  """Sends the libraries' records (orbax/absl, asyncio) to this module's DEBUG log instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    log.debug("[%s] %s", record.name, record.getMessage(), exc_info=record.exc_info)
    return False


def _unraisable_to_debug(u) -> None:
  exc_info = (u.exc_type, u.exc_value, u.exc_traceback) if u.exc_value is not None else None
  log.debug("%s %r", u.err_msg or "Exception ignored in", u.object, exc_info=exc_info)


class _Attempt:
  failed = False


@contextlib.contextmanager
def _quiet_libraries():
  """While a step is tried: the pages that orbax and TensorStore write about a bad file go to
  the DEBUG log; the one line that `restore_latest` writes says what happened.

  Besides their log records, a failed read leaves the reads of the other leaves abandoned as
  coroutines whose exceptions Python prints, with their tracebacks and TensorStore specs, when
  they are garbage collected; they are collected here, under a hook that logs them at DEBUG.
  """
  loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio")]
  quiet, hook, attempt = _ToDebug(), sys.unraisablehook, _Attempt()
  for lg in loggers:
    lg.addFilter(quiet)
  sys.unraisablehook = _unraisable_to_debug
  try:
    yield attempt
  finally:
    try:
      if attempt.failed:
        gc.collect()
    finally:
      sys.unraisablehook = hook
      for lg in loggers:
        lg.removeFilter(quiet)


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {dotted field: value} ('model_opt.lr')."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def describe_mismatch(saved: dict, current: dict, saved_config=None, config=None) -> str:
  """A message naming the leaves (and config fields) that differ between two fingerprints."""
  lines = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if a != b:
      a_s = "absent" if a is None else f"{tuple(a[0])} {a[1]}"
      b_s = "absent" if b is None else f"{tuple(b[0])} {b[1]}"
      lines.append(f"  {key}: checkpoint {a_s}, this run {b_s}")
  if len(lines) > 8:
    lines = [*lines[:8], f"  ... and {len(lines) - 8} more leaves"]
  if saved_config is not None and config is not None:
    # A run that reads part of another's checkpoint (adaptation restores a pretraining run's
    # world model) passes only that part: compare the top-level sections it names.
    saved_config = {k: v for k, v in saved_config.items() if k in config}
    a, b = flat_config(saved_config), flat_config(config)
    fields = [
      f"  config.{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}"
      for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k)
    ]
    if fields:
      lines += ["differing config fields:", *fields[:12]]
  return "\n".join(lines)


def _pack(tree) -> dict:
  """The non-empty leaves as a flat dict {'00000': leaf, ...} (orbax rejects zero-size arrays,
  which mjx.Data has); `fingerprint` guards the structure, so leaf order is enough."""
  leaves = jax.tree.leaves(tree)
  return {f"{i:05d}": x for i, x in enumerate(leaves) if np.prod(np.shape(x)) > 0}


def _unpack(flat: dict, target):
  """`target`'s structure with the saved leaves; zero-size leaves are rebuilt empty."""
  leaves, treedef = jax.tree.flatten(target)
  out = [
    flat[f"{i:05d}"] if f"{i:05d}" in flat else jax.numpy.zeros(x.shape, x.dtype)
    for i, x in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, out)


class Checkpointer:
  """Periodic, asynchronous orbax checkpoints of one run (`max_to_keep` newest kept)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
      item_names=("state", "meta"),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Saves `state` and `meta` (plus the state's fingerprint and leaf digests) as `step`.

    The leaves are digested on the host before this returns (one device-to-host copy of the
    state); the write itself is asynchronous and reads a device copy of `state`, so the caller
    may donate `state` to its next jitted step right away (the copy is freed when the write
    completes).
    """
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    flat = _pack(state)
    meta = dict(meta, fingerprint=fingerprint(state), digests=digests(flat))
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore_latest(self, target, config: dict | None = None, max_step: int | None = None):
    """The newest readable checkpoint shaped like `target`: (step, state, meta), or None.

    Args:
      target: a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings) like the state.
      config: this run's resolved config (a dict), used to name differing fields on mismatch.
      max_step: if given, only steps ≤ max_step are considered (e.g. to compare two runs at
        one step).

    Raises:
      CheckpointMismatchError: the newest readable checkpoint has a different fingerprint.
    """
    self._manager.reload()
    current = fingerprint(target)
    abstract = _pack(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
    paths = jax.tree_util.tree_flatten_with_path(target)[0]
    names = {f"{i:05d}": jax.tree_util.keystr(p) for i, (p, _) in enumerate(paths)}  # as _pack
    steps = [s for s in self.steps() if max_step is None or s <= max_step]
    for step in reversed(steps):
      meta, problem = None, None
      with _quiet_libraries() as attempt:
        try:
          meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
          meta = meta["meta"]
        except Exception as e:
          log.debug("reading the meta of checkpoint step %d failed", step, exc_info=True)
          problem, attempt.failed = f"its meta is unreadable: {_short(e)}", True
      problem = _agree(problem, "meta")
      if problem is None:
        saved = meta.get("fingerprint")
        if saved != current:
          raise CheckpointMismatchError(
            f"the checkpoint at {self.directory}/{step} does not fit this run:\n"
            + describe_mismatch(saved or {}, current, meta.get("config"), config)
            + "\nUse a fresh --workdir, or rerun with the checkpoint's config."
          )
        with _quiet_libraries() as attempt:
          try:
            state = self._manager.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
            problem = _verify(state, meta.get("digests"), names)
          except Exception as e:
            log.debug("restoring checkpoint step %d failed", step, exc_info=True)
            problem, attempt.failed = _short(e), True
        problem = _agree(problem, "state")
      if problem is None:
        return step, _unpack(state, target), meta
      log.warning(
        "checkpoint step %d is corrupted (%s); moved it to %s; trying the previous one",
        step,
        problem,
        self._set_aside(step),
      )
    return None

  def _set_aside(self, step: int) -> str:
    """Moves a bad step to `corrupted_<step>` (kept for inspection) so the run can redo it;
    returns where it went."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupted_{step}")
    if jax.process_index() == 0 and os.path.isdir(src):  # one mover on a shared filesystem
      shutil.rmtree(dst, ignore_errors=True)
      os.replace(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    self._manager.reload()
    return dst

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
