"""MJX scenario throughput against MuJoCo C on the same randomised models.

  python -m benchmarks.envs                      # CPU: batch 4 and 32, 20 control steps
  python -m benchmarks.envs --batch 1024 8192 --steps 200   # GPU (prepared device script)

For every domain and batch size it measures MJX compile seconds and physics steps/s of the
jitted env step (random actions, rewards and observations included), and in the same run on
the same edited models: a single-thread `mj_step` loop and the multi-threaded
`mujoco.rollout`. Figures are printed and written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import mujoco
import numpy as np
from mujoco import rollout

from benchmarks import common
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import morphology, scenarios, specs


def _scenarios(domain: str, n: int):
  return scenarios.get_distribution("c").sample(np.random.default_rng(0), domain, n)


def bench_mjx(domain: str, batch: int, steps: int) -> dict:
  env = env_lib.make_env(domain)
  params = env.make_params(_scenarios(domain, batch))
  d_a = env.domain.act_dim

  @jax.jit
  def run(state, key):
    def body(s, k):
      a = jax.random.uniform(k, (batch, d_a), minval=-1.0, maxval=1.0)
      return env.step(params, s, a), None

    return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

  t0 = time.perf_counter()
  state = jax.block_until_ready(jax.jit(env.reset)(params, jax.random.PRNGKey(0)))
  reset_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = run.lower(state, jax.random.PRNGKey(1)).compile()
  compile_s = time.perf_counter() - t0
  state = jax.block_until_ready(compiled(state, jax.random.PRNGKey(1)))  # warm-up
  t0 = time.perf_counter()
  state = jax.block_until_ready(compiled(state, jax.random.PRNGKey(2)))
  elapsed = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  physics = batch * steps * env.domain.n_substeps
  return {
    "compile_s": compile_s,
    "reset_compile_and_run_s": reset_s,
    "control_steps_per_s": batch * steps / elapsed,
    "physics_steps_per_s": physics / elapsed,
    "divergences": int(np.asarray(state.diverged).sum()),
    "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
  }


def bench_c(domain: str, batch: int, steps: int, threads: int) -> dict:
  spec = specs.get_domain(domain)
  members = _scenarios(domain, batch)
  models = [
    env_lib._model(domain, s.alpha_len, s.alpha_size, "fixed", morphology.DEFAULT_SOLVER)
    for s in members
  ]
  nstep = steps * spec.n_substeps
  rng = np.random.default_rng(0)
  ctrl = rng.uniform(-1, 1, (batch, steps, spec.act_dim)).repeat(spec.n_substeps, axis=1)
  # single-thread mj_step loop
  datas = [mujoco.MjData(m) for m in models]
  t0 = time.perf_counter()
  for i, (m, d) in enumerate(zip(models, datas)):
    for k in range(nstep):
      d.ctrl[:] = ctrl[i, k]
      mujoco.mj_step(m, d)
  loop_s = time.perf_counter() - t0
  # multi-threaded rollout from the default initial state
  full = mujoco.mjtState.mjSTATE_FULLPHYSICS
  state0 = np.zeros((batch, mujoco.mj_stateSize(models[0], full)))
  for i, m in enumerate(models):
    d = mujoco.MjData(m)
    mujoco.mj_getState(m, d, state0[i], full)
  pool = [mujoco.MjData(models[0]) for _ in range(threads)]
  rollout.rollout(models, pool, state0, ctrl[:, :2], persistent_pool=True)  # warm-up
  t0 = time.perf_counter()
  rollout.rollout(models, pool, state0, ctrl, persistent_pool=True)
  roll_s = time.perf_counter() - t0
  return {
    "mj_step_loop_physics_steps_per_s": batch * nstep / loop_s,
    "rollout_physics_steps_per_s": batch * nstep / roll_s,
    "rollout_threads": threads,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes")
  parser.add_argument("--steps", type=int, default=None, help="control steps per measurement")
  parser.add_argument("--domains", nargs="+", default=list(specs.DOMAIN_NAMES))
  parser.add_argument("--c-batch-max", type=int, default=256, help="largest batch run in C")
  args = parser.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  batches = args.batch or ([4, 32] if on_cpu else [1024, 8192])
  steps = args.steps or (20 if on_cpu else 200)
  threads = os.cpu_count() or 1
  rows = []
  for domain in args.domains:
    for batch in batches:
      row = {"domain": domain, "batch": batch, "control_steps": steps}
      row["mjx"] = bench_mjx(domain, batch, steps)
      c_batch = min(batch, args.c_batch_max)  # C cost is linear in the batch: measure a slice
      row["c"] = {"batch": c_batch, **bench_c(domain, c_batch, steps, threads)}
      row["mjx_over_c_loop"] = (
        row["mjx"]["physics_steps_per_s"] / row["c"]["mj_step_loop_physics_steps_per_s"]
      )
      rows.append(row)
      print(
        f"{domain:8s} batch {batch:5d}: MJX {row['mjx']['physics_steps_per_s']:10.0f} phys/s"
        f" (compile {row['mjx']['compile_s']:5.1f} s) | C loop "
        f"{row['c']['mj_step_loop_physics_steps_per_s']:9.0f} | rollout×{threads} "
        f"{row['c']['rollout_physics_steps_per_s']:9.0f} | MJX/C-loop {row['mjx_over_c_loop']:.3f}"
      )
  common.write("envs", {"batches": batches, "control_steps": steps, "rows": rows})


if __name__ == "__main__":
  main()
