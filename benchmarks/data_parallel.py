"""The data-parallel world-model update: shard_map with one all-reduce against XLA's partitioning.

  python -m benchmarks.data_parallel                          # 4 CPU devices, tiny size
  python -m benchmarks.data_parallel --sizes tiny,paper --batch 32 --updates 5   # 2-core CPU
  python -m benchmarks.data_parallel --sizes tiny,paper --batch 64 --updates 50    # a GPU node

Both programs take a batch sharded along 'data' and a replicated state, and give the same
numbers; they differ in where the gradients are reduced:
- `partitioned`: `jax.jit` of the plain update with input/output shardings (XLA's SPMD
  partitioner inserts the reductions; it reduces the recurrent cell's gradients inside the
  backward scan, once per time step);
- `shard_map`: `world_model.train.make_train_step(config, mesh)`, each device's share of the
  loss and gradients, then one all-reduce.
For each: compile seconds, all-reduce ops in the compiled program and how many sit inside loop
bodies, milliseconds per update (median over `--updates` after a warm-up), and the largest
relative parameter difference between the two after those updates. On CPU the devices are
`--devices` host devices of one process (`JAX_NUM_CPU_DEVICES`), so the collectives are
in-process; on GPUs they are NCCL's.
Writes benchmarks/results/data_parallel_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--devices", type=int, default=4, help="CPU host devices (CPU only)")
  parser.add_argument("--sizes", default="tiny", help="comma-separated: tiny, paper")
  parser.add_argument("--batch", type=int, default=16, help="batch size B (multiple of devices)")
  parser.add_argument("--updates", type=int, default=20, help="timed updates per program")
  return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "jax" not in sys.modules:  # host devices must be set before JAX starts
  os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(ARGS.devices))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from mrcom_jax.training import sharding  # noqa: E402
from mrcom_jax.world_model import config as wm_config  # noqa: E402
from mrcom_jax.world_model import normalizer as normalizer_lib  # noqa: E402
from mrcom_jax.world_model import synthetic  # noqa: E402
from mrcom_jax.world_model import train as train_lib  # noqa: E402


def all_reduces(hlo: str) -> tuple[int, int]:
  """(all-reduce ops, those inside a computation other than the entry) of compiled HLO text."""
  total = in_loops = 0
  computation = ""
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      computation = line
    if re.search(r" all-reduce(-start)?\(", line):
      total += 1
      in_loops += not computation.startswith("ENTRY")
  return total, in_loops


def bench(size: str, batch_size: int, updates: int) -> dict:
  config = wm_config.tiny() if size == "tiny" else wm_config.get_config()
  config.unlock()
  config.batch_size = batch_size
  config.lock()
  mesh = sharding.make_mesh()
  rep, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  window = config.context_len + config.seq_len
  batch = synthetic.sample_batch(synthetic.make_system(), jax.random.PRNGKey(1), batch_size, window)
  batch = sharding.shard_batch(jax.device_get(batch), mesh)
  init = train_lib.init_train_state(
    config, jax.random.PRNGKey(0), normalizer_lib.Normalizer.identity()
  )
  programs = {
    "partitioned": jax.jit(
      train_lib.make_update(config), in_shardings=(rep, data), out_shardings=(rep, rep)
    ),
    "shard_map": train_lib.make_train_step(config, mesh, donate=False),
  }
  out, params = {}, {}
  for name, step in programs.items():
    state = sharding.replicate(init, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    total, in_loops = all_reduces(compiled.as_text())
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(updates):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    params[name] = [np.asarray(x) for x in jax.tree.leaves(state.variables["params"])]
    out[name] = {
      "compile_s": round(compile_s, 2),
      "all_reduce_ops": total,
      "all_reduce_ops_in_loops": in_loops,
      "ms_per_update": round(1e3 * float(np.median(times)), 3),
    }
    print(f"{size:6s} {name:12s} {out[name]}")
  out["relative_param_difference"] = max(
    float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12))
    for a, b in zip(params["partitioned"], params["shard_map"], strict=True)
  )
  out["speedup"] = round(out["partitioned"]["ms_per_update"] / out["shard_map"]["ms_per_update"], 2)
  print(f"{size:6s} speed-up {out['speedup']}×, parameters differ by "
        f"{out['relative_param_difference']:.1e} after {updates + 1} updates")  # fmt: skip
  return out


def main() -> None:
  args = ARGS or _parse()
  jax.config.update("jax_enable_compilation_cache", False)  # compile_s is a real compile
  results = {
    "devices": len(jax.devices()),
    "sizes": {s: bench(s, args.batch, args.updates) for s in args.sizes.split(",")},
  }
  common.write("data_parallel", {"args": vars(args), "results": results})


if __name__ == "__main__":
  main()
