"""Pretraining and collection throughput: updates/s, transitions/s, data wait, SAC env steps/s.

  python -m benchmarks.pretrain                     # CPU-sized (a few minutes on 2 cores)
  python -m benchmarks.pretrain --num_envs 256 --sizes tiny,paper --updates 200   # a GPU

1. Collection, on each simulation backend (`--backends`; PROTOCOL.md "Simulation backends"):
   the behaviour-SAC runner program of each domain (`mrcom_jax.agents.runner`) at the smoke
   collection recipe (4 envs, 64-unit SAC, one update per iteration), TRAIN mode with updates
   and RANDOM mode without: env steps/s after compilation, and the compile time.
2. Data: the RANDOM-mode records of step 1 are written as `mix` datasets (the on-disk format of
   `mrcom_jax.data`), so the sampler reads real MJX data from disk through its memory maps.
3. Pretraining: `WindowSampler` (prefetch thread) feeding the jitted world-model update on a mesh
   of every local device, at the smoke ('tiny') and paper sizes: updates/s, transitions/s
   (B·T per update), the fraction of wall time the update loop waited for data, compile time and
   peak memory. Per-update time extrapolates to the 100k-update budget.
Writes benchmarks/results/pretrain_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.data import sampler as sampler_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import scenarios
from mrcom_jax.training import sharding
from mrcom_jax.world_model import config as wm_config
from mrcom_jax.world_model import train as train_lib

DOMAINS = ("hopper", "walker", "cheetah")
EPISODE = 100  # control steps per benchmark episode (101 records)


def _peak_memory() -> dict:
  out = {"host_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  return out


def bench_collection(
  domain: str, backend: str, num_envs: int, chunks: int, updates_per_iter: int, data_dir
):
  """Env steps/s of the runner with and without SAC updates; writes the random records."""
  env = env_lib.make_env(domain, backend=backend)
  config = runner_lib.RunnerConfig(
    domain=domain, num_envs=num_envs, num_agents=1, chunk=EPISODE + 1,
    replay_capacity=num_envs * (EPISODE + 1) * (chunks + 1), updates_per_iter=updates_per_iter,
    sac=sac_lib.SACConfig(hidden=(64, 64), batch_size=64),
  )  # fmt: skip
  runner = runner_lib.make_runner(env, config)
  members = scenarios.get_distribution("a").sample(np.random.default_rng(0), domain, num_envs)
  params = env.make_params(members, episode_length=EPISODE)
  out = {}
  writer = dataset_lib.DatasetWriter(
    os.path.join(data_dir, domain), domain, "mix", episode_length=EPISODE
  )
  for name in ("random", "train"):
    mode = runner_lib.MODES[name]
    state = runner.init(params, jax.random.PRNGKey(0))
    controls = runner_lib.make_controls(mode, random_steps=0)
    t0 = time.perf_counter()
    state, rec = runner.run(state, params, controls)
    jax.block_until_ready(rec)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(chunks):
      state, rec = runner.run(state, params, controls)
      rec = jax.device_get(rec)
      if mode == runner_lib.RunnerMode.RANDOM:
        sw = lambda x: np.swapaxes(np.asarray(x), 0, 1)
        writer.append(
          sw(rec.obs), sw(rec.action), sw(rec.reward), sw(rec.first), sw(rec.last),
          np.asarray(params.xi), np.arange(i * num_envs, (i + 1) * num_envs, dtype=np.int32),
          np.zeros(num_envs, np.int32),
        )  # fmt: skip
    elapsed = time.perf_counter() - t0
    steps = chunks * (EPISODE + 1) * num_envs
    out[name] = {
      "env_steps_per_s": steps / elapsed,
      "first_call_s (compile + 1 chunk)": compile_s,
      "updates_per_iteration": updates_per_iter if mode == runner_lib.RunnerMode.TRAIN else 0,
    }
    print(f"{domain:8s} {backend:6s} {name:6s} {num_envs:4d} envs: "
          f"{steps / elapsed:9.0f} env steps/s (first call {compile_s:.1f} s)")  # fmt: skip
  writer.close()
  return out


def bench_pretrain(datasets, size: str, updates: int) -> dict:
  config = wm_config.tiny() if size == "tiny" else wm_config.get_config()
  mesh = sharding.make_mesh()
  n_dev = mesh.shape[sharding.DATA_AXIS]
  config.batch_size = -(-config.batch_size // n_dev) * n_dev
  window = config.context_len + config.seq_len
  sampler = sampler_lib.WindowSampler(
    datasets, window=window, context_len=config.context_len, batch_size=config.batch_size,
    obs_fn="none", seed=0, mesh=mesh, holdout_streams=1, prefetch=4,
  )  # fmt: skip
  normalizer = sampler_lib.fit_normalizer(datasets, "none", 0)
  state = sharding.replicate(
    train_lib.init_train_state(config, jax.random.PRNGKey(0), normalizer), mesh
  )
  step = train_lib.make_train_step(config, mesh)
  with sampler.batches() as it:
    t0 = time.perf_counter()
    state, metrics = step(state, next(it))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    wait0 = sampler.wait_seconds
    t0 = time.perf_counter()
    for _ in range(updates):
      state, metrics = step(state, next(it))
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    wait = sampler.wait_seconds - wait0
  sampler.close()
  per_update = elapsed / updates
  result = {
    "batch_size": config.batch_size,
    "seq_len": config.seq_len,
    "context_len": config.context_len,
    "devices": n_dev,
    "updates_per_s": 1 / per_update,
    "transitions_per_s": config.batch_size * config.seq_len / per_update,
    "data_wait_fraction": wait / elapsed,
    "first_update_s (compile)": compile_s,
    "extrapolated_100k_updates_h": 100_000 * per_update / 3600,
    **_peak_memory(),
  }
  print(f"pretrain {size:5s}: {result['updates_per_s']:.1f} updates/s, "
        f"{result['transitions_per_s']:.0f} transitions/s, data wait "
        f"{100 * result['data_wait_fraction']:.1f}%, compile {compile_s:.1f} s, "
        f"100k updates ≈ {result['extrapolated_100k_updates_h']:.2f} h")  # fmt: skip
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_envs", type=int, default=4, help="envs per domain (collection)")
  parser.add_argument("--chunks", type=int, default=3, help="timed 101-step chunks per mode")
  parser.add_argument("--updates_per_iter", type=int, default=1, help="SAC updates/iteration")
  parser.add_argument("--sizes", default="tiny,paper", help="world-model sizes: tiny,paper")
  parser.add_argument("--updates", type=int, default=30, help="timed world-model updates")
  parser.add_argument("--domains", default=",".join(DOMAINS))
  parser.add_argument("--backends", default="mjx,mujoco", help="simulation backends (collection)")
  args = parser.parse_args()
  backends = args.backends.split(",")
  for b in backends:
    env_lib.resolve_backend(b)
  payload = {"args": vars(args), "collection": {}, "pretrain": {}}
  with tempfile.TemporaryDirectory() as data_dir:
    for backend in backends:
      payload["collection"][backend] = {
        domain: bench_collection(
          domain, backend, args.num_envs, args.chunks, args.updates_per_iter,
          os.path.join(data_dir, backend),
        )
        for domain in args.domains.split(",")
      }  # fmt: skip
    if len(backends) > 1:
      payload["collection_speedup_mujoco_over_mjx"] = (
        {
          d: {
            mode: payload["collection"]["mujoco"][d][mode]["env_steps_per_s"]
            / payload["collection"]["mjx"][d][mode]["env_steps_per_s"]
            for mode in ("random", "train")
          }
          for d in args.domains.split(",")
        }
        if {"mjx", "mujoco"} <= set(backends)
        else {}
      )
      print(
        "mujoco / mjx collection env steps/s:", payload.get("collection_speedup_mujoco_over_mjx")
      )
    datasets = [
      dataset_lib.Dataset.open(os.path.join(data_dir, backends[-1], d))
      for d in args.domains.split(",")
    ]
    for size in args.sizes.split(","):
      payload["pretrain"][size] = bench_pretrain(datasets, size, args.updates)
  common.write("pretrain", payload)


if __name__ == "__main__":
  main()
