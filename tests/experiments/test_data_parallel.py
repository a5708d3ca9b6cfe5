"""Pretraining on 4 fake CPU devices agrees with 1 device (PROTOCOL.md, "Equality in tests").

Both runs happen in one subprocess (XLA_FLAGS must force 4 host devices before JAX starts), on
the pipeline's datasets, with batch 8 (divisible by 4): `pretrain` with `train.num_devices=1`
and `=4`, each stopped after 20 updates (a checkpoint) and resumed to 100.
- After 20 updates every parameter array agrees within 1e-5 relative, ‖a − b‖ / ‖a‖
  (measured: 2e-7).
- Over 100 updates the runs are compared as whole runs: the logged losses of every 10-update
  chunk agree within 1%, and the parameters within 1e-2 relative. Measured: parameters differ by
  3e-4 after 50 updates and 1e-3 after 100, with or without free bits. Sums split over devices add
  in another order; Adam's normalised step turns those last-bit differences in near-zero
  gradients into full-size steps, so bitwise agreement over 100 updates is not a property of
  float32 training, data parallel or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
  """
  import os, sys
  import jax, numpy as np
  from experiments import pretrain
  from mrcom_jax.training import logs
  from tests.experiments.conftest import pipeline_config
  assert len(jax.devices()) == 4, jax.devices()
  data, out = sys.argv[1], sys.argv[2]
  params, losses = {}, {}
  leaves = lambda run: [np.asarray(x) for x in jax.tree.leaves(
    jax.device_get(run.state.variables["params"]))]
  for n in (1, 4):
    workdir = os.path.join(out, f"devices{n}")
    os.makedirs(workdir)
    os.symlink(data, os.path.join(workdir, "data"))
    c = pipeline_config(**{"train.num_devices": n, "train.num_updates": 100, "train.chunk": 10,
                           "train.checkpoint_every": 10, "world_model.batch_size": 8})
    early = pretrain.pretrain(c, workdir, stop_after=20, verbose=False)
    late = pretrain.pretrain(c, workdir, verbose=False)
    if n == 4:
      leaf = jax.tree.leaves(late.state.variables["params"])[0]
      assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
    params[n] = (leaves(early), leaves(late))
    rows = logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(10, 101, 10)), rows
    losses[n] = np.array([r["total"] for r in rows])
  rel = lambda xs, ys: max(
    float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)) for a, b in zip(xs, ys))
  at20, at100 = rel(params[1][0], params[4][0]), rel(params[1][1], params[4][1])
  loss_gap = float(np.max(np.abs(losses[1] - losses[4]) / np.abs(losses[1])))
  print(f"RELATIVE at 20: {at20:.2e}  at 100: {at100:.2e}  loss gap: {loss_gap:.2e}")
  assert at20 < 1e-5, at20
  assert at100 < 1e-2, at100
  assert loss_gap < 1e-2, loss_gap
  """
)


def test_four_devices_match_one_device(pipeline, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT, pipeline.data_dir, str(tmp_path)],
    capture_output=True, text=True, timeout=900, cwd=root, env=env,
  )  # fmt: skip
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "RELATIVE at 20" in out.stdout
