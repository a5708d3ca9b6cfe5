"""Runs a Python script as several local JAX processes, the way `srun` starts them under Slurm.

Each process gets the variables Slurm's `srun` sets for one task (SLURM_JOB_ID, SLURM_STEP_NODELIST,
SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), so `jax.distributed.initialize()` with no arguments
finds the coordinator on this machine exactly as on a cluster; JAX derives the coordinator's port
from the job id, which is chosen so that the port is free. The node list is 127.0.0.1 and the
coordinator binds there too (JAX_COORDINATOR_BIND_ADDRESS), so hosts without IPv6 work.
`JAX_NUM_CPU_DEVICES` gives each process its own CPU devices; collectives between processes go
through gloo on loopback.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SLURM_PORTS = 2**12  # JAX's Slurm coordinator port: 65535 - 2**12 + 1 + job_id % 2**12


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str

  def tail(self, n: int = 3000) -> str:
    return self.stdout[-n:] + "\n--- stderr ---\n" + self.stderr[-n:]


def coordinator_port(job_id: int) -> int:
  """The coordinator port JAX's Slurm cluster derives from a job id."""
  return 65535 - _SLURM_PORTS + 1 + job_id % _SLURM_PORTS


def free_slurm_job_id() -> int:
  """A job id whose coordinator port is free on 127.0.0.1 now."""
  for _ in range(100):
    job = random.randrange(1, 1000) * _SLURM_PORTS + random.randrange(_SLURM_PORTS)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind(("127.0.0.1", coordinator_port(job)))
      except OSError:
        continue
    return job
  raise RuntimeError("no free port in JAX's Slurm coordinator range")


def process_env(devices: int, **extra: str) -> dict[str, str]:
  """This environment without Slurm's variables or forced host devices, with `devices` CPU
  devices for one JAX process."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), **extra)
  return env


def run(args: list[str], devices: int, timeout: float) -> Result:
  """`python *args` as one process with `devices` CPU devices."""
  out = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    env=process_env(devices),
  )  # fmt: skip
  return Result(out.returncode, out.stdout, out.stderr)


def run_processes(args: list[str], processes: int, devices: int, timeout: float) -> list[Result]:
  """`python *args` as `processes` tasks of one simulated Slurm step, `devices` CPU devices each.

  Returns every process's result, in process order. On a timeout all of them are killed.
  """
  job = free_slurm_job_id()
  procs, files = [], []
  for i in range(processes):
    env = process_env(
      devices,
      SLURM_JOB_ID=str(job),
      SLURM_STEP_NODELIST="127.0.0.1",
      JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{coordinator_port(job)}",
      SLURM_NTASKS=str(processes),
      SLURM_PROCID=str(i),
      SLURM_LOCALID=str(i),
      SLURM_STEP_NUM_NODES="1",
    )
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    files.append((out, err))
    procs.append(
      subprocess.Popen(
        [sys.executable, *args], stdout=out, stderr=err, text=True, cwd=ROOT, env=env
      )
    )
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  results = []
  for p, (out, err) in zip(procs, files, strict=True):
    out.seek(0)
    err.seek(0)
    results.append(Result(p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results
