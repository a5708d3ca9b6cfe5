"""`experiments.adapt` end to end, with world-model rollouts, on the shared pretraining run.

The session's `adapt_run` (tests/experiments/conftest.py) adapts two seeds to an explicit
cheetah target (β = 0.5, 250-step episodes) for 3,000 real steps with the smoke settings: 2 SAC
updates per step on batches of 50% real and 50% imagined data, rollout rounds every 250 steps
from 256 starts with H = 5, and a world model pretrained for 2,000 tiny updates.

Measured here (2-core CPU, the pretraining pipeline of these tests): random return 1.08 and 0.61;
evaluations every 500 steps peak at 3.7 and 4.9 (2,000 steps), mean 4.3, about 5× random; the
final evaluation (0.4, 1.3) is lower, as for plain SAC at this budget (tests/adaptation). The
test asserts that the return reaches 1.5× random (the best evaluation's mean over both seeds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import adapt, pretrain
from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.training import checkpoint, logs
from tests.experiments.conftest import adapt_config, pipeline_config

BACKEND = "mujoco" if jax.default_backend() == "cpu" else "mjx"  # what 'auto' resolves to


def test_adapts_with_rollouts_and_reports(adapt_run):
  results = adapt_run.results
  rows = results["rows"]
  assert results["variant"] == "mrcom" and [r["seed"] for r in rows] == [0, 1]
  for r in rows:
    assert r["domain"] == "cheetah" and r["label"] == "explicit" and r["real_steps"] == 3000
    assert r["scenario"] == {"domain": "cheetah", "alpha_len": 1.0, "alpha_size": 1.0, "beta": 0.5}
    assert r["random_source"] == "measured" and r["reference_return"] is None
    assert r["score"] is None  # an explicit target has no specialist
    assert r["curve"]["steps"] == [500, 1000, 1500, 2000, 2500, 3000]
    # what it adapted: the pretraining run's final checkpoint, seed and observation function
    assert (r["world_model_step"], r["pretrain_seed"], r["obs_fn"]) == (2000, 0, "none")
    assert r["env_backend"] == BACKEND  # the default, auto, resolved
  random_mean = np.mean([r["random_return"] for r in rows])
  curve = np.mean([r["curve"]["returns"] for r in rows], axis=0)
  print(f"random {random_mean:.2f}, evaluations {np.round(curve, 2)}")
  assert random_mean > 0 and curve.max() >= 1.5 * random_mean
  w = adapt_run.workdir
  on_disk = json.load(open(os.path.join(w, "results.json")))
  assert on_disk["rows"] == json.loads(json.dumps(rows))
  assert on_disk["config"]["adapt"]["rollout"]["horizon"] == 5
  assert os.path.getsize(os.path.join(w, "learning_curves.png")) > 10_000
  metrics = logs.read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert [m["step"] for m in metrics] == list(range(250, 3001, 250))
  assert all("model/imagined_reward" in m and "sac/critic_loss" in m for m in metrics)
  assert "eval_return/cheetah" in metrics[1] and metrics[-1]["real_steps_per_s"] > 0
  info = json.load(open(os.path.join(w, "run_info.json")))["invocations"][-1]
  assert info["world_model_step"] == info["world_model_final_step"] == 2000
  assert (info["pretrain_seed"], info["obs_fn"], info["obs_seed"]) == (0, "none", 0)
  assert info["env_backend"] == BACKEND and on_disk["config"]["env"]["backend"] == "auto"
  assert all(env.backend == BACKEND for env in adapt_run.program.envs)


def test_rollouts_prompt_and_schedule(adapt_run):
  """The imagined transitions, the prompt and the update schedule, on the run's own program."""
  program, params = adapt_run.program, adapt_run.params
  spec, k = program.spec, program.spec.context_len
  assert (spec.horizon, spec.rollout_starts, spec.updates_per_step) == (5, 256, 2)
  state = program.prompt(program.init(params), params)
  s = jax.device_get(state.stream)
  # the prompt: k consecutive expert records from step 200 (min(200, 250 − k)) of one episode
  assert s.obs[:, :k, :17].any(axis=-1).all() and not s.first[:, :k].any()
  assert np.abs(s.action[:, :k]).max() > 0 and int(state.records) == k
  assert int(params.prompt_start) == 200 and program.real_steps(state) == 0
  # real steps 1..250: one round
  state, out = program.run(state, params, program_lib.AdaptMode.TRAIN)
  assert int(state.rounds) == 1 and int(state.model_size) == 256 * 5
  assert np.asarray(out.model["rounds"]).sum() == 1 and np.asarray(out.model["rounds"])[-1] == 1
  m = jax.device_get(state.model)
  filled = slice(0, 256 * 5)
  assert np.all(m.obs[:, filled, 17:] == 0) and np.all(m.next_obs[:, filled, 17:] == 0)
  assert np.abs(m.next_obs[:, filled, :17]).max() > 0 and np.all(np.isfinite(m.reward))
  assert np.all(np.abs(m.action[:, filled]) <= 1) and np.abs(m.action[:, filled]).max() > 0
  # a start's next observation is the following step's observation (rows are start-major)
  rows = m.obs[:, filled].reshape(2, 256, 5, -1)
  np.testing.assert_array_equal(
    rows[:, :, 1:], m.next_obs[:, filled].reshape(2, 256, 5, -1)[:, :, :-1]
  )
  # 2 updates at every real step once update_after = 64 transitions exist
  np.testing.assert_array_equal(np.asarray(state.sac.step), 2 * (250 - 64))


def test_stop_and_resume_equals_the_uninterrupted_run(adapt_run, adapt_pretrained, tmp_path):
  c = adapt_config(adapt_pretrained)
  workdir = str(tmp_path / "resumed")
  stopped = adapt.adapt(c, workdir, stop_after=1000, verbose=False)
  assert stopped.stopped_by == "stop_after" and stopped.real_steps == 1000
  resumed = adapt.adapt(c, workdir, verbose=False)
  assert resumed.results["rows"] == adapt_run.results["rows"]
  same = zip(
    jax.tree.leaves(jax.device_get(resumed.state)), jax.tree.leaves(jax.device_get(adapt_run.state))
  )
  assert all(np.array_equal(a, b) for a, b in same)
  steps = [m["step"] for m in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == list(range(250, 3001, 250))


def test_a_run_resumes_only_on_its_own_backend(adapt_run, adapt_pretrained, tmp_path):
  """The finished run's workdir, rerun on the other backend: refused in one line naming both
  (its checkpoints hold env states of its own backend), before anything is written."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(adapt_run.workdir, workdir)
  other = {"mjx": "mujoco", "mujoco": "mjx"}[BACKEND]
  c = adapt_config(adapt_pretrained, **{"env.backend": other})
  files = lambda: (sorted(os.listdir(workdir)), open(os.path.join(workdir, "run_info.json")).read())
  before = files()
  with pytest.raises(ValueError) as e:
    adapt.adapt(c, workdir, verbose=False)
  assert str(e.value) == (
    f"{workdir} adapted on the {BACKEND!r} simulation backend and this run asks for {other!r} "
    f"(config.env.backend={other!r}): its checkpoints hold {BACKEND} env states; resume it "
    f"with --config.env.backend={BACKEND}, or adapt into a new --workdir"
  )
  assert files() == before
  adapt.check_inputs(adapt_config(adapt_pretrained), workdir)  # its own backend: fine


def test_a_checkpoint_of_another_model_size_names_the_field(adapt_pretrained, tmp_path):
  c = adapt_config(adapt_pretrained, **{"world_model.deter": 48})
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=r"config\.world_model\.deter: checkpoint 32, this run 48",
  ):
    adapt.adapt(c, str(tmp_path / "w"), verbose=False)


@pytest.mark.parametrize(
  "overrides, error, message",
  [
    ({"target.domain": "ant"}, ValueError, "target domain 'ant' is unknown"),
    (
      {"eval.every": 300},
      ValueError,
      r"config.eval.every=300 must be a positive multiple of run.chunk=250",
    ),
    (
      {"adapt.real_steps": 1000, "run.chunk": 300},
      ValueError,
      "config.adapt.real_steps=1000 must be a multiple",
    ),
    ({"target.obs_fn": "blur"}, ValueError, "config.target.obs_fn='blur'"),
    (
      {"adapt.finetune_world_model": True, "adapt.model_rollouts": False},
      ValueError,
      "finetune_world_model=True needs config.adapt.model_rollouts=True",
    ),
    ({"target.domain": "", "target.setting": "z"}, ValueError, "config.target.setting='z'"),
    ({"target.domain": "", "target.setting": "b"}, ValueError, "has no evaluation list for hopper"),
    (
      {"pretrain.workdir": "/nonexistent/run"},
      FileNotFoundError,
      "no pretraining run at /nonexistent/run",
    ),
  ],
)
def test_bad_input_gets_a_clear_error(adapt_pretrained, tmp_path, overrides, error, message):
  with pytest.raises(error, match=message):
    adapt.adapt(adapt_config(adapt_pretrained, **overrides), str(tmp_path / "w"), verbose=False)


def test_another_observation_function_or_seed_is_refused(adapt_pretrained, tmp_path):
  """The observation function and its seed are the world model's (PROTOCOL.md): repeating them
  is accepted, another request is refused before anything is written, naming both."""
  pre = adapt.open_pretrained(adapt_config(adapt_pretrained))
  same = {"target.obs_fn": "none", "target.obs_seed": 0}
  assert adapt.observation(adapt_config(adapt_pretrained, **same), pre) == ("none", 0)
  for overrides, asked in [
    ({"target.obs_fn": "mask_fixed"}, r"config\.target\.obs_fn='mask_fixed'"),
    ({"target.obs_seed": 1}, r"config\.target\.obs_seed=1"),
  ]:
    c = adapt_config(adapt_pretrained, **overrides)
    with pytest.raises(ValueError, match=asked + r".*data\.obs_fn='none' keyed by seed=0"):
      adapt.adapt(c, str(tmp_path / "w"), verbose=False)
    assert not os.path.exists(tmp_path / "w")


def test_an_unfinished_pretraining_run_is_refused_unless_allowed(adapt_pretrained, tmp_path):
  """A pretraining run stopped at update 1000 of 2000 (its final save set aside): refused, unless
  pretrain.allow_partial, and then the step used is the one restored."""
  partial = str(tmp_path / "partial")
  shutil.copytree(adapt_pretrained, partial, symlinks=True)
  shutil.rmtree(os.path.join(partial, "checkpoints", "2000"))
  c = adapt_config(partial)
  with pytest.raises(ValueError, match=r"update 1000 of train\.num_updates=2000.*allow_partial"):
    adapt.adapt(c, str(tmp_path / "w"), verbose=False)
  assert not os.path.exists(tmp_path / "w")
  pre = adapt.open_pretrained(c)
  with pytest.raises(ValueError, match="has not finished"):
    adapt.load_world_model(c, pre)  # the restored step is checked too
  step, state = adapt.load_world_model(
    adapt_config(partial, **{"pretrain.allow_partial": True}), pre
  )
  assert step == 1000 and int(state.step) == 1000


def test_metadata_returns_of_another_episode_length_are_refused(adapt_pretrained, tmp_path):
  """R_rand and R_ref in the metadata are returns of 50-step episodes (the pipeline's
  collection): list targets with 250-step episodes are refused; at 50 steps they pass."""
  lists = {"target.domain": "", "target.setting": "a"}
  c = adapt_config(adapt_pretrained, **lists)  # target.episode_length = 250
  with pytest.raises(ValueError, match=r"episode_length=250 but the random_returns of hopper "
                     r"a/0 .* 50-step episodes.*--config\.target\.episode_length=50"):  # fmt: skip
    adapt.adapt(c, str(tmp_path / "w"), verbose=False)
  assert not os.path.exists(tmp_path / "w")
  c = adapt_config(adapt_pretrained, **lists, **{"target.episode_length": 50})
  adapt.check_pretrained(c, adapt.open_pretrained(c))


@pytest.fixture(scope="module")
def mask_fixed_runs(pipeline, tmp_path_factory) -> dict[int, str]:
  """Pretraining runs of seeds 0 and 1 on `mask_fixed` (the pipeline's data, one chunk of 50
  updates): their workdirs."""
  runs = {}
  for seed in (0, 1):
    workdir = str(tmp_path_factory.mktemp(f"mask_fixed_s{seed}"))
    os.symlink(pipeline.data_dir, os.path.join(workdir, "data"))
    c = pipeline_config(**{"seed": seed, "data.obs_fn": "mask_fixed", "train.num_updates": 50,
                           "train.checkpoint_every": 50})  # fmt: skip
    pretrain.pretrain(c, workdir, verbose=False)
    runs[seed] = workdir
  return runs


def test_mask_fixed_adapts_with_its_pretraining_runs_masked_dimensions(adapt_run, mask_fixed_runs):
  """Both pairs (adaptation seeds 0, 1) of an adaptation of pretraining seed s observe through
  the mask that pretraining saw: the dimensions its normaliser found constant (std floored at
  1e-3, fitted on the sampler's records) are the zeros of the program's observations."""
  program, cheetah = adapt_run.program, specs.get_domain("cheetah")
  seen = {}
  for seed, workdir in mask_fixed_runs.items():
    c = adapt_config(workdir)
    pre = adapt.open_pretrained(c)
    assert adapt.observation(c, pre) == ("mask_fixed", seed)
    step, wm_state = adapt.load_world_model(c, pre)
    assert step == 50
    std = np.asarray(wm_state.variables["normalizer"].std)[cheetah.id, : cheetah.obs_dim]
    pretrained = np.flatnonzero(std <= 1.01e-3)
    expected = np.sort(np.asarray(obs_functions.fixed_mask_dims(jax.random.PRNGKey(seed), cheetah)))
    np.testing.assert_array_equal(pretrained, expected)
    pairs = adapt.make_pairs(c, adapt.resolve_targets(c, pre))
    params = adapt.program_params(c, pre, program, pairs, wm_state)  # the run's shapes: no compile
    state, _ = program.run(program.init(params), params, program_lib.AdaptMode.EVAL)
    obs = np.asarray(state.envs[0].obs)[:, : cheetah.obs_dim]  # [2 pairs, 17]
    for p in range(len(pairs)):
      np.testing.assert_array_equal(np.flatnonzero(obs[p] == 0), pretrained)
    seen[seed] = tuple(pretrained)
  assert seen[0] != seen[1]  # the seeds mask different dimensions: the test tells them apart


def test_list_targets_and_pair_keys(adapt_pretrained):
  """Targets from setting (a)'s evaluation list; a pair's key depends on itself only."""
  c = adapt_config(adapt_pretrained, **{"target.domain": "", "target.setting": "a"})
  pre = adapt.open_pretrained(c)
  targets = adapt.resolve_targets(c, pre)
  lists = pre.metadata["eval_lists"]
  assert list(targets) == ["hopper", "walker", "cheetah"]
  for domain, ts in targets.items():
    assert [t.label for t in ts] == ["a/0"]
    assert ts[0].scenario.__dict__ == lists[domain]["a"][0]
  pairs = adapt.make_pairs(c, targets)
  assert [(p.domain, p.seed) for p in pairs] == [(d, s) for d in targets for s in (0, 1)]
  keys = [adapt.pair_key(p) for p in pairs]
  assert len({tuple(k) for k in keys}) == 6
  np.testing.assert_array_equal(
    adapt.pair_key(pairs[5]),
    adapt.pair_key(adapt.make_pairs(c, {"cheetah": targets["cheetah"]})[1]),
  )


def test_nan_names_the_term_the_step_and_the_checkpoint():
  sac = {name: np.ones((250, 2)) for name in program_lib.SAC_METRICS}
  sac["critic_loss"][17, 1] = np.nan
  out = program_lib.ChunkOut(
    reward=None, first=None, last=None, episode_return=None, sac=sac,
    model={"rounds": np.zeros(250)},
  )  # fmt: skip
  with pytest.raises(adapt.NonFiniteLossError) as e:
    adapt._check_finite(out, 1000, 250, 750, "/w/checkpoints")
  message = str(e.value)
  assert "'critic_loss' became nan at real step 768" in message
  assert "real step 750) is kept in /w/checkpoints" in message and "resumes" in message


def test_cli_unknown_field_and_preset_and_help():
  cli = lambda *args: subprocess.run(
    [sys.executable, "-m", "experiments.adapt", *args], capture_output=True, text=True,
    timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )  # fmt: skip
  out = cli("--config=experiments/configs/adapt.py:smoke", "--config.adapt.bogus=1")
  assert out.returncode != 0 and "bogus" in out.stderr
  out = cli("--config=experiments/configs/adapt.py:tiny")
  assert out.returncode != 0 and "unknown preset 'tiny'" in out.stderr
  out = cli("--help")
  assert "--workdir" in out.stdout and "--config" in out.stdout


@pytest.mark.slow
def test_world_model_fine_tuning_switch(adapt_pretrained, tmp_path):
  """Each pair fine-tunes its own copy before every round (5 updates in the smoke preset), and
  the run is reported as its own row. Its own program: about 2 minutes to compile on 2 cores."""
  c = adapt_config(
    adapt_pretrained, **{"adapt.finetune_world_model": True, "adapt.real_steps": 1000}
  )
  run = adapt.adapt(c, str(tmp_path / "ft"), verbose=False)
  assert run.results["variant"] == "finetuned_world_model"
  ws = run.state.world_model
  np.testing.assert_array_equal(np.asarray(ws.step), 2000 + 4 * 5)  # pretrained 2000, 4 rounds
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[3])
  assert not np.array_equal(leaf(ws.variables["params"])[0], leaf(ws.variables["params"])[1])
  metrics = logs.read_jsonl(os.path.join(run.workdir, "metrics.jsonl"))
  assert all(np.isfinite(m["model/finetune_loss"]) for m in metrics)
