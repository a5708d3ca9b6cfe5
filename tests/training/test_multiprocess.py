"""The multi-host helpers with 2 real JAX processes × 2 CPU devices (`tests/distributed.py`).

Both processes start as one simulated Slurm step and join through `jax.distributed.initialize()`
(`sharding.initialize_distributed('auto')` reading Slurm's variables). Each prints what it saw as
one JSON line; the test checks the values, which are known by hand:
- the mesh spans 4 devices; process p holds rows [4p, 4p + 4) of an 8-row batch;
- blocks built per process join into one global array (0..7, sum 28) and `to_host` gives the
  whole array back on both;
- `from_primary` gives process 0's value everywhere; `max_over_processes` the largest;
- a signal that reaches only process 1 stops both at the same boundary (`StopFlag.reason`);
- the sampler reads only its own rows (the block starting at row 4 starts at the second domain
  of the cycle) and the joined batch equals the single-process batch bit for bit;
- only process 0 writes metrics.
"""

from __future__ import annotations

import json
import textwrap

from tests import distributed
from tests.data.conftest import write_dataset

SCRIPT = textwrap.dedent(
  """
  import glob, json, os, signal, sys
  from mrcom_jax.training import logs, sharding
  assert sharding.initialize_distributed("auto")
  import jax, numpy as np
  from mrcom_jax.data.dataset import Dataset
  from mrcom_jax.data.sampler import WindowSampler
  pid = jax.process_index()
  mesh = sharding.make_mesh()
  rows = sharding.process_rows(mesh, 8)
  out = dict(process=pid, count=jax.process_count(), devices=len(jax.devices()),
             local=len(jax.local_devices()), rows=[rows.start, rows.stop])
  block = jax.device_put(np.arange(rows.start, rows.stop, dtype=np.float32),
                         sharding.local_sharding(mesh))
  joined = sharding.global_batch({"x": block}, mesh, 8)
  out["joined"] = sharding.to_host(joined)["x"].tolist()
  total = jax.jit(lambda t: t["x"].sum(), out_shardings=sharding.replicated(mesh))(joined)
  out["sum"] = float(total)
  out["from_primary"] = sharding.from_primary(np.array([10.0 + pid])).tolist()
  out["max"] = sharding.max_over_processes(7 * pid)
  with logs.StopFlag() as stop:
    if pid == 1:
      os.kill(os.getpid(), signal.SIGUSR1)
    out["stop"] = stop.reason(0)
  datasets = [Dataset.open(p) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*")))]
  kw = dict(window=10, context_len=4, batch_size=8, obs_fn="add_gaussian", seed=0, prefetch=0)
  sampler = WindowSampler(datasets, mesh=mesh, **kw)
  read, gather_rows = [], sampler.gather_rows
  def spy(index, rows, window=None):
    read.append([rows.start, rows.stop])
    return gather_rows(index, rows, window)
  sampler.gather_rows = spy
  batch = sampler.batch(3)
  out["batch_devices"] = len(batch.obs.sharding.device_set)
  out["read"] = read
  whole = sharding.to_host(batch)
  ref = jax.device_get(WindowSampler(datasets, **kw).batch(3))
  out["batch_equal"] = all(np.array_equal(a, b) for a, b in
                           zip(jax.tree.leaves(whole), jax.tree.leaves(ref), strict=True))
  out["domains"] = whole.domain.tolist()
  writer = logs.MetricWriter(sys.argv[2], active=sharding.is_primary(), tensorboard=False)
  writer.write(1, {"process": pid})
  writer.close()
  print("RESULT " + json.dumps(out))
  """
)


def test_two_processes_share_one_mesh(tmp_path):
  data = tmp_path / "data"
  write_dataset(data / "h", "hopper", [([0, 1, 2], 2)])
  write_dataset(data / "w", "walker", [([10, 11, 12], 2)])
  write_dataset(data / "c", "cheetah", [([20, 21, 22], 2)])
  results = distributed.run_processes(
    ["-c", SCRIPT, str(data), str(tmp_path)], processes=2, devices=2, timeout=240
  )
  seen = []
  for r in results:
    assert r.returncode == 0, r.tail()
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.tail()
    seen.append(json.loads(line[-1].removeprefix("RESULT ")))
  for p, out in enumerate(seen):
    assert out["process"] == p and out["count"] == 2, out
    assert out["devices"] == 4 and out["local"] == 2, out
    assert out["rows"] == [4 * p, 4 * p + 4]
    assert out["joined"] == list(range(8)) and out["sum"] == 28.0
    assert out["from_primary"] == [10.0]
    assert out["max"] == 7
    assert out["stop"] == "SIGUSR1"
    assert out["read"] == [[4 * p, 4 * p + 4]]  # its own rows, nothing else
    assert out["batch_devices"] == 4 and out["batch_equal"], out
    assert out["domains"] == [0, 1, 2, 0, 1, 2, 0, 1]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(ln) for ln in lines] == [{"step": 1, "process": 0.0}]
