"""Shared benchmark helpers: machine/version stamps and JSON output under benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata

import jax

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict:
  """The machine, accelerator and package versions a figure was measured on."""
  try:
    cpu = next(
      line.split(":", 1)[1].strip()
      for line in open("/proc/cpuinfo")
      if line.startswith("model name")
    )
  except (OSError, StopIteration):
    cpu = platform.processor()
  try:
    rev = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
  except OSError:
    rev = ""
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "mujoco", "mujoco-mjx", "dm_control", "numpy"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  return {
    "date": datetime.date.today().isoformat(),
    "hostname": platform.node(),
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "versions": versions,
    "git": rev,
  }


def write(name: str, payload: dict) -> str:
  """Writes `benchmarks/results/<name>_<backend>_<date>.json` and returns the path."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  info = machine()
  kind = info["devices"][0].replace(" ", "-") if info["backend"] != "cpu" else "cpu"
  path = os.path.join(RESULTS_DIR, f"{name}_{kind}_{info['date']}.json")
  with open(path, "w") as f:
    json.dump({"machine": info, **payload}, f, indent=1)
  print(f"wrote {path}")
  return path
