"""Run records: the workdir's provenance files, metrics (TensorBoard + JSONL) and stop signals.

- `write_run_info(workdir, config)` keeps the resolved config, the command line, the package
  versions, the devices and the git revision (`run_info.json`, `config.json`).
- `MetricWriter` writes scalars to TensorBoard (tensorboardX) and to `metrics.jsonl`; on resume it
  drops the JSONL lines past the restored step, so the file reads as one uninterrupted run.
- `StopFlag` turns SIGTERM / SIGUSR1 (Slurm's pre-emption warning) into a flag the training loop
  polls at chunk boundaries: it saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys

import jax
import numpy as np

from mrcom_jax.training import sharding

PACKAGES = (
  "jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "mujoco", "mujoco-mjx",
  "dm_control", "numpy", "ml_collections", "tensorboardX",
)  # fmt: skip


def quiet_libraries() -> None:
  """Silences orbax's and absl's per-save INFO lines unless `--verbosity` was given."""
  from absl import flags
  from absl import logging as absl_logging

  if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def versions() -> dict[str, str | None]:
  """Installed versions of the packages a result depends on."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_revision(path: str | None = None) -> str | None:
  """`git describe --always --dirty` of the source tree, or None outside a git checkout."""
  path = path or os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(
      ["git", "describe", "--always", "--dirty", "--abbrev=12"],
      cwd=path, capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def write_json(path: str, payload) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray | jax.Array):
    return np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_run_info(workdir: str, config, extra: dict | None = None) -> dict:
  """Writes `config.json` (resolved) and appends this invocation to `run_info.json`."""
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), config.to_dict())
  path = os.path.join(workdir, "run_info.json")
  history = []
  if os.path.exists(path):
    with open(path) as f:
      history = json.load(f).get("invocations", [])
  entry = {
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "host": platform.node(),
    "git": git_revision(),
    "versions": versions(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "process_count": jax.process_count(),
    **(extra or {}),
  }
  history.append(entry)
  write_json(path, {"invocations": history})
  return entry


class MetricWriter:
  """Scalars to TensorBoard and `metrics.jsonl` (one JSON object per logged step).

  In a multi-process run only process 0 writes: elsewhere (`active=False`) `write` does nothing
  and no file is opened, so the processes never interleave lines.
  """

  def __init__(
    self, workdir: str, resume_step: int = 0, tensorboard: bool = True, active: bool = True
  ):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.active = active
    self._file = self._tb = None
    if not active:
      return
    if os.path.exists(self.path):
      _truncate_jsonl(self.path, resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step or None)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_jsonl(path: str, resume_step: int) -> None:
  """Keeps the lines with step ≤ resume_step (a resumed run rewrites the later ones)."""
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  keep = []
  for ln in lines:
    try:
      if json.loads(ln)["step"] <= resume_step:
        keep.append(ln)
    except (json.JSONDecodeError, KeyError):
      continue  # a line cut by a kill
  with open(path, "w") as f:
    f.writelines(keep)


def read_jsonl(path: str) -> list[dict]:
  """The rows of a `metrics.jsonl` file."""
  with open(path) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


class StopFlag:
  """Set by SIGTERM or SIGUSR1; the loop saves a checkpoint and exits at the next boundary."""

  SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __bool__(self) -> bool:
    return self.signal is not None

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum

  def __enter__(self):
    for s in self.SIGNALS:
      try:
        self._previous[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread (e.g. called from a test worker thread)
        pass
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal is not None else "none"

  def reason(self, step: int, stop_after: int | None = None) -> str | None:
    """Why a training loop stops after `step`: 'stop_after' (a planned stop, as tests use),
    the signal's name, or None to go on.

    With several processes every one must call this at the same step: they agree, so a signal
    that reached one process stops all of them at the same boundary (else the others would
    wait forever in the next collective).
    """
    if stop_after is not None and step >= stop_after:
      return "stop_after"
    code = sharding.max_over_processes(self.signal or 0)
    return signal.Signals(code).name if code else None
