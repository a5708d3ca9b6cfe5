"""Writes one sbatch script per sweep point, plus a collect job and a `submit.sh` chaining them.

  python -m launch.slurm.generate --entry=pretrain --seeds=0,1,2,3,4 --settings=a,c \
      --methods=mrcom,no_context --root=$SCRATCH/mrcom --out=launch/slurm/generated
  python -m launch.slurm.generate --entry=adapt --seeds=0,1,2,3,4 --settings=a,b,c,d \
      --methods=mrcom,no_rollouts --root=$SCRATCH/mrcom --out=launch/slurm/generated
  bash launch/slurm/generated/submit.sh

One node (default): one task with `--gpus` GPUs (pretraining is data-parallel over them; an
adaptation uses the first). Several nodes (`--nodes=N`, pretraining only): one JAX process per
GPU (`--ntasks-per-node=--gpus`, `--gpus-per-node=--gpus`) started by `srun`;
`experiments.pretrain` calls `jax.distributed.initialize()`, which reads Slurm's variables and
gives each process the GPU numbered by its SLURM_LOCALID. `--set key=value` adds a
config override to every point (e.g. `--set train.num_updates=2000`); `--set env.backend=mjx`
reaches the collect job too (the default, auto, is mjx on a GPU node and mujoco without one).
"""

from __future__ import annotations

import argparse
import os
import shlex
import string

from launch import sweep

TEMPLATE = os.path.join(os.path.dirname(__file__), "job.sbatch.tmpl")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def render(
  name: str,
  entry: str,
  args: list[str],
  root: str,
  *,
  nodes: int = 1,
  gpus: int = 1,
  cpus: int = 8,
  time: str = "24:00:00",
  grace: int = 300,
  partition: str = "",
  python: str = "python",
  repo: str = REPO,
  workdir: bool = True,
) -> str:
  """One sbatch script: `args` (without --workdir) run as `python -m experiments.<entry>`; with
  `workdir`, `--workdir=<root>/<job name>` is appended (the collect job takes no workdir)."""
  if nodes < 1 or gpus < 0:
    raise ValueError(f"nodes={nodes} must be ≥ 1 and gpus={gpus} ≥ 0")
  if nodes > 1 and gpus < 1:
    raise ValueError(f"nodes={nodes} needs gpus ≥ 1 per node: one JAX process runs per GPU")
  if nodes > 1 and entry != "pretrain":
    raise ValueError(
      f"{entry!r} runs on one device: only pretraining spans several nodes (use --nodes=1)"
    )
  multi = nodes > 1
  with open(TEMPLATE) as f:
    template = string.Template(f.read())
  body = "\n".join(f"  {shlex.quote(a)} \\" for a in args)
  extra = f"#SBATCH --partition={partition}" if partition else ""
  layout = (
    f"{nodes} nodes × {gpus} GPUs: one JAX process per GPU, joined by jax.distributed.initialize()"
    if multi
    else f"One node, one process, {gpus} GPU(s)."
  )
  return template.substitute(
    workdir_arg='--workdir="$WORKDIR" ' if workdir else "",
    name=name,
    entry=entry,
    nodes=nodes,
    tasks_per_node=gpus if multi else 1,
    # Every task sees all of its node's GPUs; jax.distributed.initialize() gives process
    # SLURM_LOCALID its own (binding one GPU per task would renumber it 0 in the task).
    gpu_line=f"#SBATCH --gpus-per-node={gpus}" if gpus else "",
    cpus_per_task=cpus,
    time=time,
    grace=grace,
    sbatch_extra=extra,
    layout=layout,
    repo=shlex.quote(repo),
    cache_dir=f"{root}/jax_cache",
    root=root,
    log_dir=f"{root}/slurm_logs",
    launcher="srun --kill-on-bad-exit=1" if multi else "",
    python=python,
    args=body,
  )


def write_sweep(points: list[sweep.Point], out: str, **job) -> list[str]:
  """Writes `<out>/<name>.sbatch` per point, `collect.sbatch` and `submit.sh`; returns paths."""
  os.makedirs(out, exist_ok=True)
  root = points[0].root
  paths = []
  collect = os.path.join(out, "collect.sbatch")
  collect_job = dict(job, nodes=1)
  with open(collect, "w") as f:
    backend = dict(points[0].extra).get("env.backend", "")  # `--set env.backend=...`
    args = sweep.collect_args(root, points[0].preset, backend)
    f.write(render("collect", "collect", args, root, workdir=False, **collect_job))
  for p in points:
    path = os.path.join(out, f"{p.name}.sbatch")
    args = p.args()[:-1]  # the script derives --workdir from the job
    with open(path, "w") as f:
      f.write(render(p.name, p.entry, args, p.root, **job))
    paths.append(path)
  lines = [
    "#!/bin/bash",
    "# Submits the sweep: the shared data first, then every point after it (and each",
    "# adaptation after its pretraining run when that is part of the sweep).",
    "set -euo pipefail",
    'cd "$(dirname "$0")"',
    "collect=$(sbatch --parsable collect.sbatch)",
  ]
  ids = {}
  for i, p in enumerate(points):
    dep = "$collect"
    if p.entry == "adapt":
      pre = p.pretrain_point.name
      if pre in ids:
        dep += f":${ids[pre]}"
    ids[p.name] = f"job{i}"
    lines.append(f"job{i}=$(sbatch --parsable --dependency=afterok:{dep} {p.name}.sbatch)")
  lines.append('echo "submitted the collect job $collect and ' + str(len(points)) + ' points"')
  with open(os.path.join(out, "submit.sh"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return [collect, *paths, os.path.join(out, "submit.sh")]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--entry", choices=sweep.ENTRIES, required=True)
  parser.add_argument("--preset", default="default", help="the config file's preset")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--settings", default="a")
  parser.add_argument("--methods", default="mrcom")
  parser.add_argument("--obs_fns", default="none", help="observation functions (Table 3)")
  parser.add_argument("--kinds", default="mix", help="dataset kinds (Table 5)")
  parser.add_argument("--domains", default=sweep.ALL_DOMAINS,
                      help="a model per listed domain (Table 4; '': one for all)")  # fmt: skip
  parser.add_argument("--table", default="", choices=("", *sweep.TABLES),
                      help="a table's settings, obs functions, kinds and domains")  # fmt: skip
  parser.add_argument("--root", required=True, help="runs root (workdirs, data, logs, cache)")
  parser.add_argument("--out", default="launch/slurm/generated")
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus", type=int, default=1, help="GPUs per node")
  parser.add_argument("--cpus", type=int, default=8, help="CPUs per task")
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--grace", type=int, default=300, help="seconds of warning before a stop")
  parser.add_argument("--partition", default="")
  parser.add_argument("--python", default="python", help="the interpreter on the nodes")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every point")  # fmt: skip
  a = parser.parse_args(argv)
  try:
    extra = sweep.parse_overrides(a.set)
  except ValueError as e:
    parser.error(str(e))
  seeds, methods = [int(s) for s in a.seeds.split(",")], a.methods.split(",")
  try:
    if a.table:
      points = sweep.table_points(a.table, a.entry, seeds, a.root, a.preset, extra, methods)
    else:
      points = sweep.points(
        a.entry, seeds, a.settings.split(","), methods, a.root, a.preset, extra,
        a.obs_fns.split(","), a.kinds.split(","), a.domains.split(","),
      )  # fmt: skip
  except ValueError as e:
    parser.error(str(e))
  paths = write_sweep(
    points, a.out, nodes=a.nodes, gpus=a.gpus, cpus=a.cpus, time=a.time, grace=a.grace,
    partition=a.partition, python=a.python,
  )  # fmt: skip
  print(f"wrote {len(paths)} files to {a.out}; submit with: bash {a.out}/submit.sh")


if __name__ == "__main__":
  main()
