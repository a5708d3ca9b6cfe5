"""Checkpoints: orbax `CheckpointManager` with validation, fallback and clear mismatch errors.

A checkpoint step holds two items:
  `state`: any pytree of arrays (the train state: parameters, optimiser states, normaliser,
    RNG key, step), saved with `StandardSave` (asynchronously by default);
  `meta`: a JSON dict (the data position, the resolved config, and a fingerprint: every state
    leaf's path, shape and dtype).

`Checkpointer.restore_latest(target)` walks the steps from the newest: a step whose files cannot
be read (a killed copy, a corrupted file) is skipped with a warning and the previous one is used;
a readable step whose fingerprint differs from `target` (e.g. another model size) raises
`CheckpointMismatchError` naming the differing leaves and config fields, because silently
starting afresh would lose the run. orbax writes each step into a temporary directory and renames
it when complete, so a partial save is never listed as a step.

Multi-process runs: every process calls `save` and `restore_latest` with its global arrays, as
orbax requires; orbax writes each replicated array once and coordinates the processes.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but was written by a differently shaped run."""


def fingerprint(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a pytree of arrays (or ShapeDtypeStructs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path)] = [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
  return out


def _short(e: Exception, limit: int = 300) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
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
    a, b = _flat(saved_config), _flat(config)
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
    """Saves `state` and `meta` (plus the state's fingerprint) as `step`; returns at once.

    The asynchronous write reads a device copy of `state`, so the caller may donate `state` to
    its next jitted step right away (the copy is freed when the write completes).
    """
    meta = dict(meta, fingerprint=fingerprint(state))
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_pack(state)), meta=ocp.args.JsonSave(meta)
      ),
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
    steps = [s for s in self.steps() if max_step is None or s <= max_step]
    for step in reversed(steps):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          "meta"
        ]
      except Exception as e:
        log.warning(
          "checkpoint step %d is unreadable (%s); trying the previous one", step, _short(e)
        )
        self._set_aside(step)
        continue
      saved = meta.get("fingerprint")
      if saved != current:
        raise CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} does not fit this run:\n"
          + describe_mismatch(saved or {}, current, meta.get("config"), config)
          + "\nUse a fresh --workdir, or rerun with the checkpoint's config."
        )
      try:
        state = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
      except Exception as e:
        log.warning(
          "checkpoint step %d is corrupted (%s); trying the previous one", step, _short(e)
        )
        self._set_aside(step)
        continue
      return step, _unpack(state, target), meta
    return None

  def _set_aside(self, step: int) -> None:
    """Moves a bad step to `corrupted_<step>` (kept for inspection) so the run can redo it."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupted_{step}")
    if jax.process_index() == 0 and os.path.isdir(src):  # one mover on a shared filesystem
      shutil.rmtree(dst, ignore_errors=True)
      os.replace(src, dst)
      log.warning("moved the bad checkpoint to %s", dst)
    self._manager.reload()

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
