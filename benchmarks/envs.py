"""Env throughput on both backends against raw MuJoCo C, on the same randomised models.

  python -m benchmarks.envs                      # CPU: batches 4–256, both backends, raw C
  python -m benchmarks.envs --batch 1024 8192 --steps 200 --backends mjx   # GPU (device script)

For every domain and batch size, in one run on the same edited models (setting (c) scenarios):
- `mjx` and `mujoco` backends: the jitted env step in a `lax.scan` (random actions, rewards,
  observations and episode logic included): compile seconds, control (env) steps/s and physics
  steps/s.
- raw MuJoCo C from the same reset states, no JAX: `mujoco.rollout` (persistent pool, one
  thread per core) as one long open-loop rollout (the physics ceiling), and called once per
  control step from the last state, as a host-side env loop would (a policy acts between
  control steps); and a single-thread `mj_step` loop.
The callback's overhead is the ratio `mujoco` backend / raw rollout, reported against both raw
figures. Figures are printed and written as JSON under benchmarks/results/.
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
from mrcom_jax.envs import host, scenarios, specs


def _members(domain: str, n: int):
  return scenarios.get_distribution("c").sample(np.random.default_rng(0), domain, n)


def bench_env(domain: str, backend: str, batch: int, steps: int) -> dict:
  """The jitted env step of `backend` in a scan of `steps` control steps."""
  env = env_lib.make_env(domain, backend=backend)
  params = env.make_params(_members(domain, batch))
  d_a = env.domain.act_dim

  @jax.jit
  def run(state, key):
    def body(s, k):
      a = jax.random.uniform(k, (batch, d_a), minval=-1.0, maxval=1.0)
      return env.step(params, s, a), None

    return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

  state = jax.block_until_ready(jax.jit(env.reset)(params, jax.random.PRNGKey(0)))
  t0 = time.perf_counter()
  compiled = run.lower(state, jax.random.PRNGKey(1)).compile()
  compile_s = time.perf_counter() - t0
  state = jax.block_until_ready(compiled(state, jax.random.PRNGKey(1)))  # warm-up
  times = []
  for rep in range(2):
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(state, jax.random.PRNGKey(2 + rep)))
    times.append(time.perf_counter() - t0)
  elapsed = min(times)
  return {
    "compile_s": compile_s,
    "control_steps_per_s": batch * steps / elapsed,
    "physics_steps_per_s": batch * steps * env.domain.n_substeps / elapsed,
    "divergences": int(np.asarray(state.diverged).sum()),
  }


def bench_raw(domain: str, batch: int, steps: int, threads: int) -> dict:
  """Raw MuJoCo C on the `mujoco` backend's own compiled models, from the env's reset states."""
  spec = specs.get_domain(domain)
  env = env_lib.make_env(domain, backend="mujoco")
  params = env.make_params(_members(domain, batch))
  models = [host.model(h) for h in np.asarray(params.model)]
  reset = jax.jit(env.reset)(params, jax.random.PRNGKey(0))  # as bench_env starts
  exact = np.array(reset.data.exact).view(np.float64).reshape(batch, -1)
  m = models[0]
  warm_at = mujoco.mj_stateSize(m, host.STATE_SPEC & (mujoco.mjtState.mjSTATE_WARMSTART - 1))
  state0 = np.delete(exact, np.s_[warm_at : warm_at + m.nv], axis=1)  # mjSTATE_FULLPHYSICS
  warm0 = exact[:, warm_at : warm_at + m.nv]
  assert state0.shape[1] == mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_FULLPHYSICS)
  nsub = spec.n_substeps
  nstep = steps * nsub
  ctrl = np.random.default_rng(0).uniform(-1, 1, (batch, steps, 1, spec.act_dim))
  ctrl = np.ascontiguousarray(np.broadcast_to(ctrl, (batch, steps, nsub, spec.act_dim)))
  pool = [mujoco.MjData(models[0]) for _ in range(threads)]
  rollout.rollout(models, pool, state0, ctrl[:, 0], persistent_pool=True)  # starts the pool

  t0 = time.perf_counter()
  rollout.rollout(
    models,
    pool,
    state0,
    ctrl.reshape(batch, nstep, -1),
    initial_warmstart=warm0,
    persistent_pool=True,
  )
  long_s = time.perf_counter() - t0

  state = state0.copy()
  out = np.zeros((batch, nsub, state0.shape[1]))
  t0 = time.perf_counter()
  for k in range(steps):  # a control step at a time, continuing from the last state
    rollout.rollout(
      models,
      pool,
      state,
      ctrl[:, k],
      nstep=nsub,
      state=out,
      skip_checks=True,
      persistent_pool=True,
    )
    state[:] = out[:, -1]
  per_step_s = time.perf_counter() - t0

  loop_steps = min(steps, 50)
  datas = [mujoco.MjData(m) for m in models]
  for m, d, row in zip(models, datas, exact):
    mujoco.mj_setState(m, d, row, host.STATE_SPEC)
  t0 = time.perf_counter()
  for i, (m, d) in enumerate(zip(models, datas)):
    for k in range(loop_steps):
      d.ctrl[:] = ctrl[i, k, 0]
      mujoco.mj_step(m, d, nsub)
  loop_s = time.perf_counter() - t0
  return {
    "rollout_threads": threads,
    "rollout_long_physics_steps_per_s": batch * nstep / long_s,
    "rollout_per_control_step_physics_steps_per_s": batch * nstep / per_step_s,
    "mj_step_loop_physics_steps_per_s": batch * loop_steps * nsub / loop_s,
  }


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes")
  parser.add_argument("--steps", type=int, default=None, help="control steps per measurement")
  parser.add_argument("--domains", nargs="+", default=list(specs.DOMAIN_NAMES))
  parser.add_argument("--backends", nargs="+", default=list(env_lib.BACKENDS[1:]))
  parser.add_argument("--mjx-steps", type=int, default=None, help="control steps on mjx")
  args = parser.parse_args()
  for b in args.backends:
    env_lib.resolve_backend(b)
  on_cpu = jax.default_backend() == "cpu"
  batches = args.batch or ([4, 16, 64, 256] if on_cpu else [1024, 8192])
  steps = args.steps or (100 if on_cpu else 200)
  mjx_steps = args.mjx_steps or (10 if on_cpu else steps)
  threads = os.cpu_count() or 1
  rows = []
  for domain in args.domains:
    for batch in batches:
      row = {"domain": domain, "batch": batch}
      for backend in args.backends:
        n = mjx_steps if backend == "mjx" else steps
        row[backend] = {"control_steps": n, **bench_env(domain, backend, batch, n)}
      if on_cpu:
        row["raw"] = {"control_steps": steps, **bench_raw(domain, batch, steps, threads)}
        if "mujoco" in row:
          cb = row["mujoco"]["physics_steps_per_s"]
          row["callback_over_rollout_long"] = cb / row["raw"]["rollout_long_physics_steps_per_s"]
          row["callback_over_rollout_per_control_step"] = (
            cb / row["raw"]["rollout_per_control_step_physics_steps_per_s"]
          )
      rows.append(row)
      line = f"{domain:8s} batch {batch:4d}:"
      for backend in args.backends:
        r = row[backend]
        line += (
          f" {backend} {r['physics_steps_per_s']:8.0f} phys/s (compile {r['compile_s']:4.1f} s) |"
        )
      if "raw" in row:
        r = row["raw"]
        line += (
          f" rollout long {r['rollout_long_physics_steps_per_s']:7.0f}, per control step "
          f"{r['rollout_per_control_step_physics_steps_per_s']:7.0f} | mj_step loop "
          f"{r['mj_step_loop_physics_steps_per_s']:6.0f}"
        )
      if "callback_over_rollout_long" in row:
        line += (
          f" | callback/rollout {row['callback_over_rollout_long']:.2f} (long), "
          f"{row['callback_over_rollout_per_control_step']:.2f} (per control step)"
        )
      print(line, flush=True)
  common.write("envs", {"batches": batches, "control_steps": steps, "rows": rows})


if __name__ == "__main__":
  main()
