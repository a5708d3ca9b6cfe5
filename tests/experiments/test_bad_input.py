"""Bad input fails before anything runs: every entry point (`collect`, `pretrain`, `adapt`) refuses
a bad field, value, device count, path or checkpoint with one message naming the field and the
value, before it writes, collects or compiles anything; on the command line that message is one
line, not a traceback (also for a field that does not exist, with the closest one suggested)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest
from absl import flags

from experiments import adapt, cli, collect, pretrain
from experiments.configs import collect as collect_presets
from mrcom_jax.training import checkpoint, logs
from tests.experiments.conftest import _override, adapt_config, pipeline_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = jax.device_count()
BACKENDS = ("auto", "mjx", "mujoco")


def _listing(root: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs) if root else []


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
  """A pretraining run as adaptation reads it before restoring anything: the smoke world model's
  config.json (`tiny()`, as `pipeline_config`), the data's metadata (provisional v_max, one list
  scenario per domain) and a checkpoint directory at the final update."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  c = pipeline_config()
  logs.write_json(os.path.join(workdir, "config.json"), c.to_dict())
  meta = os.path.join(workdir, "data", "metadata")
  os.makedirs(meta)
  logs.write_json(
    os.path.join(meta, "v_max.json"),
    {d: {"value": v, "source": "provisional (labelled)"} for d, v in
     collect_presets.get_config("smoke").v_max.provisional.items()},
  )  # fmt: skip
  scenario = {"alpha_len": 1.0, "alpha_size": 1.0, "beta": 0.6}
  logs.write_json(
    os.path.join(meta, "eval_lists.json"),
    {d: {"a": [{"domain": d, **scenario}]} for d in collect.DOMAINS},
  )
  os.makedirs(os.path.join(workdir, "checkpoints", str(c.train.num_updates)))
  return workdir


@pytest.fixture(scope="module")
def no_checkpoint(pretrained, tmp_path_factory) -> str:
  """The same run before its first checkpoint (config.json and metadata only)."""
  workdir = str(tmp_path_factory.mktemp("no_checkpoint"))
  for name in ("config.json", "data"):
    os.symlink(os.path.join(pretrained, name), os.path.join(workdir, name))
  return workdir


# (overrides, the message's field and value, its fix: the phrase telling what to pass instead)
DISTRIBUTIONS = "('narrow', 'wide', 'narrow_beta0.8', 'wide_beta0.8', 'fixed')"
KINDS = "('mix', 'medium', 'expert', 'random')"
OBS_FNS = "('none', 'add_gaussian', 'add_distractor', 'mask_random', 'mask_fixed')"
SETTINGS = "['a', 'b', 'c', 'd', 'a@0.8', 'b@0.8', 'c@0.8', 'd@0.8', 'fixed']"
COLLECT = [
  ({"behaviour.num_envs": 0}, "config.collect.behaviour.num_envs=0", "must be ≥ 1"),
  ({"specialist.env_steps": -5}, "config.collect.specialist.env_steps=-5", "must be ≥ 1"),
  ({"chunk": 10}, "config.collect.chunk=10", "must divide episode_length + 1 = 1001"),
  ({"episode_length": 0}, "config.collect.episode_length=0", "must be ≥ 1"),
  ({"distributions": ("narrow", "medium")}, "config.collect.distributions has 'medium'",
   f"choose from {DISTRIBUTIONS}"),
  ({"datasets.kinds": ("mix", "best")}, "config.collect.datasets.kinds has 'best'",
   f"choose from {KINDS}"),
  ({"domains": ("ant",)}, "config.collect.domains has unknown domain 'ant'",
   "choose from ('hopper', 'walker', 'cheetah')"),
  ({"mass_rule": "heavy"}, "config.collect.mass_rule='heavy'",
   "must be one of ('fixed', 'density')"),
  ({"evaluation.settings": ("e",)}, "config.collect.evaluation.settings has 'e'",
   f"choose from {SETTINGS}"),
  ({"gate.threshold": 1.5}, "config.collect.gate.threshold=1.5", "must be in [0, 1]"),
  ({"behaviour.sac.lr": 0.0}, "config.collect.behaviour.sac.lr=0.0", "must be > 0"),
  ({"env.backend": "gpu"}, "config.collect.env.backend='gpu'", f"must be one of {BACKENDS}"),
]  # fmt: skip
PRETRAIN = [
  ({"world_model.deter": -3}, "config.world_model.deter=-3",
   "must be an integer ≥ 1 (the paper's value is 128)"),
  ({"world_model.embed": 0}, "config.world_model.embed=0",
   "must be an integer ≥ 1 (the paper's value is 128)"),
  ({"world_model.stoch": 0}, "config.world_model.stoch=0",
   "must be an integer ≥ 1 (the paper's value is 128)"),
  ({"world_model.context_len": 0}, "config.world_model.context_len=0",
   "must be an integer ≥ 1 (the paper's value is 20)"),
  ({"world_model.model_opt.lr": 0.0}, "config.world_model.model_opt.lr=0.0",
   "must be > 0 (the paper's value is 0.0001)"),
  ({"world_model.discount": 1.0}, "config.world_model.discount=1.0",
   "must be in [0, 1) (the paper's value is 0.99)"),
  ({"world_model.free_bits": -1.0}, "config.world_model.free_bits=-1.0",
   "must be ≥ 0 (the paper's value is 1.0)"),
  ({"train.num_devices": DEVICES + 2}, f"num_devices={DEVICES + 2} but this machine has {DEVICES}",
   f"set it to at most {DEVICES} (0 = all of them)"),
  ({"train.num_devices": -1}, "config.train.num_devices=-1", "must be ≥ 0"),
  ({"train.num_updates": 0}, "config.train.num_updates=0", "must be > 0"),
  ({"train.chunk": 0}, "config.train.chunk=0", "must be > 0"),
  ({"train.checkpoint_every": 75}, "config.train.checkpoint_every=75",
   "must be a positive multiple of train.chunk=50"),
  ({"seed": -1}, "config.seed=-1", "must be ≥ 0"),
  ({"data.obs_fn": "blur"}, "config.data.obs_fn='blur'", f"choose one of {OBS_FNS}"),
  ({"data.kind": "best"}, "config.data.kind='best'", f"choose one of {KINDS}"),
  ({"data.distribution": "medium"}, "config.data.distribution='medium'",
   f"choose one of {DISTRIBUTIONS}"),
  ({"data.domains": ("hopper", "hopper")}, "config.data.domains=('hopper', 'hopper') has a",
   "list each once"),
  ({"data.distribution": "narrow_beta0.8"}, "config.data.distribution='narrow_beta0.8' has no",
   "is not in config.collect.distributions=('narrow',); add it there"),
  ({"data.kind": "expert"}, "config.data.kind='expert' has no data",
   "is not in config.collect.datasets.kinds=('mix',); add it there"),
  ({"data.normalizer_records": 0}, "config.data.normalizer_records=0", "must be > 0"),
  ({"collect.behaviour.num_envs": 0}, "config.collect.behaviour.num_envs=0", "must be ≥ 1"),
  ({"env.backend": "cuda"}, "config.env.backend='cuda'", f"must be one of {BACKENDS}"),
  ({"collect.env.backend": "MJX"}, "config.env.backend='MJX'", f"must be one of {BACKENDS}"),
]  # fmt: skip
ADAPT = [
  ({"pretrain.workdir": "/nonexistent/run"}, "no pretraining run at /nonexistent/run",
   "run `python -m experiments.pretrain --workdir=/nonexistent/run` first, or point "
   "--config.pretrain.workdir at an existing run"),
  ({"pretrain.workdir": "NO_CHECKPOINT"}, "has no checkpoint in",
   "run `python -m experiments.pretrain --workdir=NO_CHECKPOINT` to the end first"),
  ({"world_model.deter": 48}, "config.world_model.deter: checkpoint 32, this run 48",
   "pass --config.world_model.deter=32, or point config.pretrain.workdir at a run of this world "
   "model"),
  ({"world_model.no_context": True}, "config.world_model.no_context: checkpoint False, this run",
   "pass --config.world_model.no_context=False, or point config.pretrain.workdir at a run"),
  ({"world_model.deter": -3}, "config.world_model.deter=-3",
   "must be an integer ≥ 1 (the paper's value is 128)"),
  ({"target.domain": "", "target.setting": "e"}, "config.target.setting='e'",
   f"choose one of {SETTINGS}"),
  ({"target.obs_fn": "blur"}, "config.target.obs_fn='blur'", f"choose one of {OBS_FNS}"),
  ({"target.beta": 1.5}, "config.target.beta=1.5", "must be in (0, 1]"),
  ({"target.alpha_len": 0.0}, "config.target.alpha_len=0.0", "must be > 0"),
  ({"target.domain": "ant"}, "target domain 'ant' is unknown",
   "choose from ('hopper', 'walker', 'cheetah')"),
  ({"target.episode_length": 0}, "config.target.episode_length=0", "must be > 0"),
  ({"seeds": ()}, "config.seeds=()", "needs at least one seed"),
  ({"seeds": (0, 0)}, "config.seeds=(0, 0) has a seed twice", "list each once"),
  ({"adapt.real_steps": 0}, "config.adapt.real_steps=0", "must be > 0"),
  ({"adapt.real_ratio": 1.5}, "config.adapt.real_ratio=1.5", "must be in [0, 1]"),
  ({"adapt.rollout.horizon": 0}, "config.adapt.rollout.horizon=0", "(H) must be > 0"),
  ({"adapt.sac.discount": 1.0}, "config.adapt.sac.discount=1.0", "must be in [0, 1)"),
  ({"adapt.sac.hidden": 0}, "config.adapt.sac.hidden=0", "must be > 0"),
  ({"eval.every": 300}, "config.eval.every=300", "must be a positive multiple of run.chunk=250"),
  ({"env.backend": "warp"}, "config.env.backend='warp'", f"must be one of {BACKENDS}"),
]  # fmt: skip


def _one_line_with_its_fix(error: Exception, message: str, fix: str) -> None:
  """The refusal names the field and value (`message`) and the fix, on one line."""
  text = str(error)
  assert message in text and fix in text, (text, fix)
  assert "\n" not in text, text


@pytest.mark.parametrize("overrides, message, fix", COLLECT)
def test_collect_refuses(overrides, message, fix, tmp_path):
  cc = collect_presets.get_config("smoke")
  cc.unlock()
  cc = _override(cc, overrides)
  root = str(tmp_path / "data")
  with pytest.raises(ValueError) as e:
    collect.run(cc, root)
  _one_line_with_its_fix(e.value, message, fix)
  assert not os.path.exists(root)


@pytest.mark.parametrize("overrides, message, fix", PRETRAIN)
def test_pretrain_refuses(overrides, message, fix, tmp_path):
  workdir, data = str(tmp_path / "run"), str(tmp_path / "data")
  c = pipeline_config(**{"data.dir": data, **overrides})
  with pytest.raises(ValueError) as e:
    pretrain.pretrain(c, workdir, verbose=False)
  _one_line_with_its_fix(e.value, message, fix)
  assert not os.path.exists(workdir) and not os.path.exists(data)


@pytest.mark.parametrize("overrides, message, fix", ADAPT)
def test_adapt_refuses(overrides, message, fix, pretrained, no_checkpoint, tmp_path):
  if overrides.get("pretrain.workdir") == "NO_CHECKPOINT":
    overrides = {**overrides, "pretrain.workdir": no_checkpoint}
    fix = fix.replace("NO_CHECKPOINT", no_checkpoint)
  before = _listing(pretrained)
  c = adapt_config(pretrained, **overrides)
  workdir = str(tmp_path / "adapt")
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    adapt.adapt(c, workdir, verbose=False)
  _one_line_with_its_fix(e.value, message, fix)
  assert not os.path.exists(workdir) and _listing(pretrained) == before
  if ": checkpoint " in message:  # another world model: refused from config.json, no restore
    assert isinstance(e.value, checkpoint.CheckpointMismatchError)


def test_the_fixtures_are_good_input(pretrained, tmp_path):
  """Each refusal above is for its one bad field: the same configs without it pass the checks."""
  collect.check_inputs(collect_presets.get_config("smoke"), str(tmp_path / "data" / "new"))
  c = pipeline_config(**{"data.dir": str(tmp_path / "data")})
  pretrain.check_inputs(c, str(tmp_path / "run"))
  adapt.check_inputs(adapt_config(pretrained))
  adapt.check_inputs(adapt_config(pretrained, **{"target.domain": "", "target.setting": "a"}))
  # the plain-SAC control loads no world model: another model's run is fine for it
  adapt.check_inputs(
    adapt_config(pretrained, **{"world_model.deter": 48, "adapt.model_rollouts": False})
  )
  assert not os.listdir(tmp_path)


def _run(*args, cwd):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config.world_model.deterr=3"],
      "error: --config.world_model.deterr: config.world_model has no field 'deterr'; did you "
      "mean --config.world_model.deter?",
    ),
    (
      ["--config.env.backend=gpu"],
      "error: config.env.backend='gpu' must be one of ('auto', 'mjx', 'mujoco')",
    ),
    (
      ["--config.train.num_devices=1000"],  # checked after joining a multi-host run, if any
      f"error: config.train.num_devices=1000 but this machine has {DEVICES} "
      f"{jax.default_backend()} device(s): set it to at most {DEVICES} (0 = all of them)",
    ),
  ],
)
def test_the_command_line_says_one_line_without_a_traceback(args, message, tmp_path):
  workdir = tmp_path / "run"
  out = _run(
    "experiments.pretrain", "--config=experiments/configs/meta.py:smoke", *args,
    f"--workdir={workdir}", cwd=REPO,
  )  # fmt: skip
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == message, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and not workdir.exists()


def test_an_unknown_preset_is_one_line_naming_the_presets():
  # ml_collections folds the config file's traceback into the flag error; only its last line is
  # the user's mistake.
  argv = ["prog", "--config=experiments/configs/meta.py:tiny"]
  with pytest.raises(cli.BadInput) as e:
    cli.parse(pretrain.define_flags, flags.FlagValues(), argv)
  message = str(e.value)
  assert "\n" not in message and "Traceback" not in message
  assert message.endswith("ValueError: unknown preset 'tiny' for meta.py: choose one of "
                          "('default', 'smoke', 'hopper', 'walker', 'cheetah')")  # fmt: skip


def _bad_paths(tmp_path) -> dict[str, str]:
  """Data directories collection cannot make: a file, and a path below a file."""
  (tmp_path / "file").write_text("not a directory")
  return {"a file": str(tmp_path / "file"), "below a file": str(tmp_path / "file" / "data")}


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_collect_refuses_a_data_dir_it_cannot_make(where, tmp_path):
  root = _bad_paths(tmp_path)[where]
  before = _listing(str(tmp_path))
  with pytest.raises(ValueError) as e:
    collect.run(collect_presets.get_config("smoke"), root)
  message = str(e.value)
  assert message == (f"data directory {root!r}: {tmp_path / 'file'} exists and is not a directory; "
                     "pass a directory that exists or can be made")  # fmt: skip
  assert _listing(str(tmp_path)) == before and (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.parametrize("case", ["unknown field", "data_dir below a file"])
def test_collect_on_the_command_line_says_one_line_without_a_traceback(case, tmp_path):
  root = _bad_paths(tmp_path)["below a file"] if "data_dir" in case else str(tmp_path / "data")
  args, message = {
    "unknown field": (
      ["--config.behaviour.num_env=3"],
      "error: --config.behaviour.num_env: config.behaviour has no field 'num_env'; did you mean "
      "--config.behaviour.num_envs?",
    ),
    "data_dir below a file": (
      [],
      f"error: data directory {root!r}: {tmp_path / 'file'} exists and is not a directory; pass a "
      "directory that exists or can be made",
    ),
  }[case]
  before = _listing(str(tmp_path))
  out = _run(
    "experiments.collect", "--config=experiments/configs/collect.py:smoke", *args,
    f"--data_dir={root}", cwd=REPO,
  )  # fmt: skip
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == message, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and _listing(str(tmp_path)) == before
