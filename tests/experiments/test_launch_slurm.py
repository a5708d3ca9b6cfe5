"""Slurm launch scripts: every generated script is valid bash, runs a command its entry point
accepts, and resumes when run again with the same job (as a requeued job does)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from launch import sweep
from launch.slurm import generate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script_args(path: str) -> list[str]:
  """The entry point's arguments as the script passes them (quoted lines ending in '\\')."""
  text = open(path).read()
  body = text.split(" -m experiments.", 1)[1].split("--workdir=", 1)[0]
  lines = [line.strip().rstrip("\\").strip() for line in body.splitlines()[1:]]
  return [__import__("shlex").split(line)[0] for line in lines if line]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("slurm")
  root = "/scratch/mrcom"
  pre = sweep.points("pretrain", [0, 1], ["a", "c"], ["mrcom", "no_context"], root)
  ada = sweep.points("adapt", [0], ["a", "d"], ["mrcom", "no_rollouts", "no_context"], root)
  single = generate.write_sweep(pre + ada, str(out / "single"))
  multi = generate.write_sweep(pre, str(out / "multi"), nodes=2, gpus=4)
  return pre, ada, single, multi


def test_scripts_are_valid_bash_with_the_points_commands(generated):
  pre, ada, single, multi = generated
  assert len(pre) == 8 and len(ada) == 6 and len(single) == 8 + 6 + 2
  for path in single + multi:
    out = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert out.returncode == 0, (path, out.stderr)
  for p, path in zip(pre + ada, single[1:-1]):
    assert os.path.basename(path) == f"{p.name}.sbatch"
    assert _script_args(path) == p.args()[:-1]
    text = open(path).read()
    assert f"#SBATCH --job-name={p.name}" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@300" in text and "trap on_usr1 USR1" in text
  two_nodes = open(multi[1]).read()
  assert "#SBATCH --nodes=2" in two_nodes and "#SBATCH --ntasks-per-node=4" in two_nodes
  assert "#SBATCH --gpus-per-node=4" in two_nodes and "srun --kill-on-bad-exit=1" in two_nodes
  submit = open(single[-1]).read()
  # each adaptation waits for its own pretraining run (no_rollouts reuses mrcom's)
  ids = {os.path.basename(p)[:-7]: i for i, p in enumerate(single[1:-1])}
  line = next(x for x in submit.splitlines() if "adapt-d-mix-none-all-no_rollouts-s0.sbatch" in x)
  assert f"afterok:$collect:$job{ids['pretrain-wide-mix-none-all-mrcom-s0']} " in line
  assert "#SBATCH --gpus-per-node=1" in open(single[1]).read()  # one task, all the node's GPUs
  cpu_only = generate.write_sweep(pre[:1], os.path.dirname(single[0]) + "_cpu", gpus=0)
  assert "--gpus" not in open(cpu_only[1]).read()
  with pytest.raises(ValueError, match="needs gpus ≥ 1 per node"):
    generate.write_sweep(pre, os.path.dirname(single[0]) + "_x", nodes=2, gpus=0)
  with pytest.raises(ValueError, match="only pretraining spans several nodes"):
    generate.write_sweep(ada, str(generated[2][0]) + "_x", nodes=2)
  with pytest.raises(ValueError, match="adaptation control"):
    sweep.points("pretrain", [0], ["a"], ["no_rollouts"], "/r")


@pytest.mark.parametrize("entry", sweep.ENTRIES)
def test_every_generated_argument_list_is_accepted(generated, entry, monkeypatch):
  monkeypatch.chdir(REPO)
  pre, ada, _, _ = generated
  for p in pre if entry == "pretrain" else ada:
    config, workdir = sweep.check_args(entry, p.args())
    assert workdir == p.workdir
    if entry == "pretrain":
      assert config.seed == p.seed and config.data.distribution == p.distribution
    else:
      assert tuple(config.seeds) == (p.seed,) and config.target.setting == p.setting
      assert config.pretrain.workdir.endswith(f"-{p.pretrain_method}-s{p.seed}")
      assert config.adapt.model_rollouts == (p.method != "no_rollouts")
      assert config.adapt.prompt == (p.method not in ("own_context", "no_context"))
    if p.method == "no_context":
      assert config.world_model.no_context
  bad = pre[0].args() if entry == "pretrain" else ada[0].args()
  with pytest.raises(Exception, match="bogus"):
    sweep.check_args(entry, [*bad[:-1], "--config.bogus=1", bad[-1]])


def test_a_stopped_job_resumes_when_run_again(pipeline, tmp_path):
  """The generated script, run by hand twice under one job name: SIGUSR1 (Slurm's warning)
  makes the run checkpoint and stop; the second run resumes from that checkpoint."""
  root = str(tmp_path / "runs")
  os.makedirs(root)
  os.symlink(pipeline.data_dir, os.path.join(root, "data"))
  extra = {"train.num_updates": 400, "train.chunk": 50, "train.checkpoint_every": 50,
           "data.prefetch": 2}  # fmt: skip
  (point,) = sweep.points("pretrain", [0], ["a"], ["mrcom"], root, preset="smoke", extra=extra)
  path = generate.write_sweep([point], str(tmp_path / "scripts"), python=sys.executable)[1]
  env = dict(os.environ, SLURM_JOB_NAME=point.name, PYTHONUNBUFFERED="1")
  env.pop("SLURM_JOB_ID", None)
  checkpoints = os.path.join(point.workdir, "checkpoints")
  first = subprocess.Popen(
    ["bash", path], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  deadline = time.time() + 600
  while not (os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))):
    assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
    time.sleep(0.5)
  first.send_signal(signal.SIGUSR1)  # to the batch script, as `--signal=B:USR1` does
  log1, _ = first.communicate(timeout=600)
  assert first.returncode == 0, log1[-3000:]
  assert "not under Slurm: run this script again to resume" in log1
  stopped = int(re.search(r"stopped by SIGUSR1 at update (\d+)", log1).group(1))
  assert 50 <= stopped < 400
  second = subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
  assert f"resuming from the checkpoint at update {stopped}" in second.stdout + second.stderr
  steps = [json.loads(line)["step"] for line in open(os.path.join(point.workdir, "metrics.jsonl"))]
  assert steps == list(range(50, 401, 50))


def test_set_overrides_reach_every_script_as_text(tmp_path, capsys):
  assert sweep.parse_overrides(["train.num_updates=2000", "adapt.prompt=False", "a.b=x=y"]) == {
    "train.num_updates": "2000", "adapt.prompt": "False", "a.b": "x=y"
  }  # fmt: skip
  for bad in ("train.num_updates", "=3"):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
      sweep.parse_overrides([bad])
  out = tmp_path / "gen"
  generate.main(["--entry=pretrain", "--seeds=0", "--settings=a", "--root=/r", f"--out={out}",
                 "--set", "train.num_updates=2000"])  # fmt: skip
  script = open(out / "pretrain-narrow-mix-none-all-mrcom-s0.sbatch").read()
  assert "--config.train.num_updates=2000 \\" in script and '--workdir="$WORKDIR" &' in script
  assert "--workdir" not in open(out / "collect.sbatch").read()
  with pytest.raises(SystemExit):
    generate.main(["--entry=pretrain", "--root=/r", f"--out={out}", "--set", "oops"])
  assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("entry", sweep.ENTRIES)
def test_a_pinned_backend_reaches_every_script(entry, tmp_path, monkeypatch):
  """No override: the configs' `auto` (mjx on a GPU node). `--set env.backend=mujoco`: every
  point's arguments and the collect job's set it, and each entry point's parser accepts them
  (pretraining's `env.backend` is its collection's)."""
  monkeypatch.chdir(REPO)
  args = [f"--entry={entry}", "--seeds=0", "--settings=a", "--root=/r"]
  generate.main([*args, f"--out={tmp_path / 'auto'}"])
  assert "backend" not in "".join(p.read_text() for p in (tmp_path / "auto").iterdir())
  generate.main([*args, f"--out={tmp_path / 'pinned'}", "--set", "env.backend=mujoco"])
  scripts = {p.name: p.read_text() for p in (tmp_path / "pinned").glob("*.sbatch")}
  assert len(scripts) == 2 and all("--config.env.backend=mujoco \\" in t for t in scripts.values())
  (point,) = sweep.points(entry, [0], ["a"], ["mrcom"], "/r", extra={"env.backend": "mujoco"})
  config, _ = sweep.check_args(entry, point.args())
  assert config.env.backend == "mujoco"
  if entry == "pretrain":
    assert config.collect.env.backend == "mujoco"
  assert sweep.collect_args("/r", backend="mjx") == [
    "--config=experiments/configs/collect.py", "--config.env.backend=mjx", "--data_dir=/r/data"
  ]  # fmt: skip
  bad = [*point.args()[:-1], "--config.env.backend=gpu", point.args()[-1]]
  with pytest.raises(ValueError, match=r"config.env.backend='gpu' must be one of"):
    sweep.check_args(entry, bad)
