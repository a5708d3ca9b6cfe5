"""World-model update benchmark: updates/s, compile time, parameters, memory, FLOP utilisation.

Measures one jitted, donating `train_step` (world model + values, METHOD.md Eq. 16) at the
paper's sizes (batch 32 × 64 steps, k = 20) on synthetic multi-domain data, and a large matmul
in the same run (float32 and bfloat16) as the reference for achieved FLOP/s. XLA's cost analysis
counts a scan body once, so FLOPs are counted on the update lowered with the posterior scan fully
unrolled, and checked against an analytic count of the model's matmuls.

  python -m benchmarks.world_model                 # paper sizes, a few updates (CPU: ~0.5 s each)
  python -m benchmarks.world_model --preset tiny --updates 50
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from mrcom_jax.world_model import config as config_lib
from mrcom_jax.world_model import synthetic, train


def analytic_flops(config) -> float:
  """Matmul FLOPs of one update: 3 × the forward pass (backward ≈ 2 × forward)."""
  s = config_lib.resolve(config)
  b, t, k = config.batch_size, config.seq_len, config.context_len
  e, h, st, d, u, f = s.embed, config.hidden, s.stoch, s.deter, s.aux, s.feat
  o, a = s.obs_dim, s.act_dim

  def mlp(d_in, d_out):  # two hidden layers of h
    return 2 * (d_in * h + h * h + h * d_out)

  per_step = (
    mlp(o, e)  # encoder e_i
    + 2 * a * e  # action embedding g_i
    + mlp(e + e + d + e, 2 * st)  # posterior z
    + 2 * 3 * ((st + e) * d + d * d)  # GRU
    + mlp(e + d + e, 2 * st) * (1 + s.use_meta_state)  # prior z, r_ψ
    + mlp(e, 2 * u)
    + mlp(2 * e, 2 * u)  # prior and posterior u
    + mlp(f, o)
    + mlp(f, 1)  # decoder, reward head
  )
  if s.use_context:
    q = s.qkv
    per_step += k * 2 * e * q * 2  # keys and values over the window
    per_step += 2 * e * q + 2 * 2 * k * q + 2 * q * e  # newest query, attention, output
    per_step += 2 * 2 * e * s.ff_mult * e  # feed-forward at the newest token
  if s.use_meta_value:
    per_step += 2 * mlp(f + s.xi_dim, 1) + 2 * mlp(st + d, 1) + 2 * 3 * ((st + e) * d + d * d)
  tokens = mlp(o + a + 2, e) * (k + t) if s.use_context else 0
  return 3.0 * b * (t * per_step + tokens)


def matmul_flops_per_s(n: int, dtype, repeats: int = 3) -> float:
  """FLOP/s of an n × n × n matmul in `dtype` (best of `repeats`)."""
  x = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="paper", choices=["paper", "tiny"])
  parser.add_argument("--updates", type=int, default=3)
  parser.add_argument("--matmul", type=int, default=0, help="reference size (0: by platform)")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  config = config_lib.get_config() if args.preset == "paper" else config_lib.tiny()
  backend = jax.default_backend()
  k, t, b = config.context_len, config.seq_len, config.batch_size
  system = synthetic.make_system(0)
  sample = jax.jit(lambda key: synthetic.sample_batch(system, key, b, k + t, p_short=0.1))
  batch = sample(jax.random.key(1))
  state = jax.jit(lambda key: train.init_train_state(config, key))(jax.random.key(0))
  n_model = sum(x.size for x in jax.tree.leaves(state.variables["params"]))
  n_values = sum(x.size for x in jax.tree.leaves(state.values))

  step = train.make_train_step(config)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()

  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  t3 = time.perf_counter()
  for _ in range(args.updates):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  per_update = (time.perf_counter() - t3) / args.updates

  scanned = lowered.cost_analysis()["flops"]
  unrolled_config = config_lib.get_config() if args.preset == "paper" else config_lib.tiny()
  unrolled_config.scan_unroll = t
  unrolled = (
    jax.jit(train.make_update(unrolled_config)).lower(state, batch).cost_analysis()["flops"]
  )
  analytic = analytic_flops(config)
  achieved = unrolled / per_update

  n = args.matmul or (8192 if backend == "gpu" else 2048)
  reference = {str(np.dtype(d).name): matmul_flops_per_s(n, d) for d in (jnp.float32, jnp.bfloat16)}
  stats = jax.devices()[0].memory_stats() or {}
  result = dict(
    preset=args.preset,
    batch=b,
    seq_len=t,
    context_len=k,
    updates_timed=args.updates,
    updates_per_s=1.0 / per_update,
    seconds_per_update=per_update,
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    params_world_model=int(n_model),
    params_values=int(n_values),
    memory=dict(
      temp_bytes=int(mem.temp_size_in_bytes),
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      device_peak_bytes=int(stats.get("peak_bytes_in_use", 0)) or None,
      host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    ),
    flops=dict(
      xla_scanned=scanned,
      xla_unrolled=unrolled,
      analytic_matmul=analytic,
      unrolled_over_analytic=unrolled / analytic,
      achieved_flops_per_s=achieved,
      matmul_size=n,
      matmul_flops_per_s=reference,
      fraction_of_matmul={d: achieved / r for d, r in reference.items()},
    ),
    final_loss=float(metrics["total"]),
    machine=dict(
      backend=backend,
      device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(),
      cpu_count=os.cpu_count(),
      processor=platform.processor() or platform.machine(),
      node=platform.node(),
    ),
    versions=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      flax=__import__("flax").__version__,
      optax=__import__("optax").__version__,
    ),
    config=config.to_dict(),
  )
  out = args.out or os.path.join(
    os.path.dirname(__file__), "results", f"world_model_{args.preset}_{backend}.json"
  )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2, default=str)
  print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2, default=str))


if __name__ == "__main__":
  main()
