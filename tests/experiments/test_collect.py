"""Collection stages (experiments.collect) on the pipeline's programs: resume, v_max, datasets."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import collect
from mrcom_jax.agents import runner as runner_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.envs import scenarios as scen
from mrcom_jax.training import checkpoint as checkpoint_lib
from tests.envs import inject
from tests.experiments.conftest import EPISODE, _override, pipeline_config


class StopAfter:
  """A stop flag that turns on after `n` checks (the job checks it before every chunk)."""

  name = "SIGTERM"

  def __init__(self, n: int):
    self.n = n

  def __bool__(self) -> bool:
    self.n -= 1
    return self.n < 0


def _job(cc, writer):
  n = cc.behaviour.num_envs
  dist = collect.training_distribution("narrow")
  return collect.Job(
    name="resume test", domain="cheetah", rc=collect.recipe(cc, "behaviour"), periods=3,
    period_episodes=1, random_steps=100, xi_gate=1.0, writer=writer,
    scenarios=functools.partial(collect._draw_period, cc, dist, "cheetah", n, (9,)),
  )  # fmt: skip


def test_collection_stage_resumes_bitwise_after_a_kill(pipeline, tmp_path):
  cc = pipeline.config.collect
  runs = {}
  for name, stops in (("straight", [None]), ("killed", [StopAfter(1), None])):
    workdir = str(tmp_path / name)
    path = os.path.join(workdir, "stream")
    for stop in stops:  # the kill lands inside period 2 (period 1 is checkpointed)
      writer = collect.open_writer(path, "cheetah", "behaviour", cc.episode_length, {})
      try:
        result = collect.run_job(cc, _job(cc, writer), 8.0, workdir, stop=stop, seed=3)
      except collect.StageStopped:
        assert writer.num_chunks == 1
        continue
      writer.close()
    runs[name] = (jax.device_get(result.pop("final_state")), result, dataset_lib.Dataset.open(path))
  (s1, r1, d1), (s2, r2, d2) = runs["straight"], runs["killed"]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
  assert r1 == r2 and len(r1["snapshots"]) == 3
  assert d1.num_chunks == d2.num_chunks == 3
  for i in range(3):
    for field in ("obs", "action", "reward", "first", "last", "xi", "stream"):
      np.testing.assert_array_equal(getattr(d1.chunk(i), field), getattr(d2.chunk(i), field))


class NaNAt:
  """A runner whose `run` number `at` (1-based) starts from a NaN joint velocity of `member`
  (`tests/envs/inject.nan_qvel`: the state the simulation continues from, on either backend)."""

  def __init__(self, runner, at: int, member: int):
    self.runner, self.at, self.member, self.calls = runner, at, member, 0

  def __getattr__(self, name):
    return getattr(self.runner, name)

  def run(self, state, params, controls):
    self.calls += 1
    if self.calls == self.at:
      data = inject.nan_qvel(state.env.data, self.member)
      state = state.replace(env=state.env.replace(data=data))
    return self.runner.run(state, params, controls)


def test_a_job_or_dataset_resumes_only_on_its_own_backend(pipeline, tmp_path):
  """A job stopped after its first period, rerun on the other backend: its stream and its
  checkpoints (env states of the backend it started on) are refused, each in one line naming
  both backends and the fix, before a runner is built for the other backend or a file changes."""
  cc = pipeline.config.collect
  backend = collect.resolved_backend(cc)
  other = {"mjx": "mujoco", "mujoco": "mjx"}[backend]
  switched = _override(copy.deepcopy(cc).unlock(), {"env.backend": other})
  workdir = str(tmp_path / "job")
  path = os.path.join(workdir, "stream")
  writer = collect.open_writer(path, "cheetah", "behaviour", cc.episode_length,
                               {"backend": backend})  # fmt: skip
  with pytest.raises(collect.StageStopped):
    collect.run_job(cc, _job(cc, writer), 8.0, workdir, stop=StopAfter(1), seed=3)
  with open(os.path.join(workdir, collect.BACKEND_FILE)) as f:
    assert json.load(f) == {"backend": backend}
  assert dataset_lib.Dataset.open(path, allow_incomplete=True).info["backend"] == backend
  before, built = _listing(workdir), collect._runner.cache_info().currsize
  fix = f"resume it with --config.env.backend={backend}, or remove "
  with pytest.raises(collect.BackendSwitch) as e:
    collect.open_writer(path, "cheetah", "behaviour", cc.episode_length, {"backend": other})
  message = str(e.value)
  assert message.startswith(f"{path} was started on the {backend!r} simulation backend and this "
                            f"run asks for {other!r}") and fix in message  # fmt: skip
  with pytest.raises(collect.BackendSwitch) as e:
    collect.run_job(switched, _job(switched, None), 8.0, workdir, seed=3)
  message = str(e.value)
  assert message.startswith(f"{workdir} was started on the {backend!r}") and fix in message
  assert "\n" not in message and isinstance(e.value, ValueError)
  assert _listing(workdir) == before and collect._runner.cache_info().currsize == built


def _listing(root: str) -> dict[str, int]:
  """Every file under `root` with its modification time (ns)."""
  return {
    os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, fs in os.walk(root)
    for f in fs
  }


def test_a_diverged_episode_is_dropped_and_the_stage_completes(tmp_path, monkeypatch):
  """A NaN joint velocity a third into member 2's period-1 episode (3 chunks of 17 records per
  episode; the 5th chunk starts from it) diverges that episode: the stage completes, reports one
  dropped episode, and writes every other episode as whole streams. Backend-neutral: the NaN is
  injected into the env state, on the configured (default) backend."""
  cc = pipeline_config(**{"collect.chunk": 17}).collect
  real, runners = collect.get_runner, []

  def get_runner(*args):
    runners.append(NaNAt(real(*args), at=5, member=2))
    return runners[-1]

  monkeypatch.setattr(collect, "get_runner", get_runner)
  path = str(tmp_path / "stream")
  writer = collect.open_writer(path, "cheetah", "behaviour", cc.episode_length, {})
  job = dataclasses.replace(_job(cc, writer), periods=2)
  result = collect.run_job(cc, job, 8.0, str(tmp_path), seed=3)
  writer.close({"dropped_episodes": result["dropped_episodes"]})
  assert result["dropped_episodes"] == 1 and [r.calls for r in runners] == [6]
  assert len(result["returns"][1][0]) == 3  # period 1: 3 of the 4 slots' episodes
  ds = dataset_lib.Dataset.open(path)
  assert ds.info["dropped_episodes"] == 1
  assert [c.num_streams for c in ds] == [4, 3] and ds.num_episodes == 7
  np.testing.assert_array_equal(ds.chunk(1).stream, [4, 5, 7])  # slot 2 of period 1 is gone
  assert all(np.isfinite(np.asarray(c.obs)).all() for c in ds)


def test_a_dropped_episode_splits_its_stream(tmp_path):
  """_write_period writes a slot's runs of kept episodes as streams, with their step0 and ξ."""
  e, episodes, n = 4, 3, 3  # records per episode, episodes per period, slots
  rng = np.random.default_rng(0)
  j = np.arange(e * episodes) % e
  first = np.broadcast_to((j == 0)[:, None], (e * episodes, n)).copy()
  cat = {
    "obs": rng.normal(size=(e * episodes, n, 17)).astype(np.float32),
    "action": rng.uniform(-1, 1, size=(e * episodes, n, 6)).astype(np.float32),
    "reward": np.where(first, 0.0, rng.uniform(size=(e * episodes, n))).astype(np.float32),
    "first": first,
    "last": np.broadcast_to((j == e - 1)[:, None], (e * episodes, n)).copy(),
  }
  xi = np.tile([0.0, 0.0, 1.0, 1.0, 1.0, 0.5], (n, 1)).astype(np.float32)
  xi[:, 5] = [0.5, 0.6, 0.7]
  kept = np.ones((episodes, n), bool)
  kept[1, 0] = False  # slot 0 loses its middle episode
  kept[:, 2] = False  # slot 2 loses all three
  writer = dataset_lib.DatasetWriter(tmp_path / "d", "cheetah", "behaviour", episode_length=e - 1)
  collect._write_period(writer, cat, xi, period=2, kept=kept)
  ds = writer.close()
  (short, long_) = list(ds)
  np.testing.assert_array_equal(short.stream, [6, 6])  # period 2 · 3 slots + slot 0, twice
  np.testing.assert_array_equal(short.step0, [0, 2 * e])
  np.testing.assert_array_equal(short.obs[1], cat["obs"][2 * e :, 0])
  np.testing.assert_array_equal(short.xi[:, 5], [0.5, 0.5])
  np.testing.assert_array_equal(long_.stream, [7])
  np.testing.assert_array_equal(long_.obs[0], cat["obs"][:, 1])
  assert ds.num_episodes == 5


PROVISIONAL = {"cheetah": {"value": 8.0, "source": "provisional (labelled)"}}


def _same_chunks(a: dataset_lib.Dataset, b: dataset_lib.Dataset) -> None:
  assert a.num_chunks == b.num_chunks
  for i in range(a.num_chunks):
    for field in dataset_lib.FIELDS:
      np.testing.assert_array_equal(getattr(a.chunk(i), field), getattr(b.chunk(i), field))


def test_the_behaviour_stage_drops_a_diverged_episode_and_its_rerun_drops_it_again(
  tmp_path, monkeypatch
):
  """Through `stage_behaviour` (one period of 2 episodes, 6 chunks of 17 records): a NaN joint
  velocity in member 2's first episode (its 2nd chunk) diverges it; the stage completes, and its
  result.json and stream info report `dropped_episodes == 1`. Stopped after the divergence (before
  any checkpoint) and rerun, the stage replays the divergence exactly, as a deterministic one
  would recur, and drops it again: the same result.json and stream, one dropped episode, not two.
  A third call is skipped."""
  cc = pipeline_config(**{"collect.chunk": 17}).collect
  assert collect.num_periods(cc, cc.behaviour.num_envs, cc.behaviour.env_steps) == 1
  real, runners = collect.get_runner, []

  def get_runner(*args):
    runners.append(NaNAt(real(*args), at=2, member=2))
    return runners[-1]

  monkeypatch.setattr(collect, "get_runner", get_runner)
  gate = {"cheetah": {"shrink": 0.0}}

  def stage(root: str, stop=None):
    collect.stage_behaviour(cc, root, ("cheetah",), PROVISIONAL, gate, stop)
    workdir = os.path.join(root, "behaviour", "narrow", "cheetah")
    with open(os.path.join(workdir, "result.json")) as f:
      return json.load(f), dataset_lib.Dataset.open(os.path.join(workdir, "stream"))

  result, ds = stage(str(tmp_path / "straight"))
  assert [r.calls for r in runners] == [6]
  assert result["dropped_episodes"] == 1 and ds.info["dropped_episodes"] == 1
  ((returns,),) = result["returns"]
  assert len(returns) == 7 and result["chunks"] == 2  # 8 episodes, one dropped
  assert [c.num_streams for c in ds] == [1, 3] and ds.num_episodes == 7
  np.testing.assert_array_equal(ds.chunk(0).stream, [2])  # slot 2 keeps its 2nd episode only
  np.testing.assert_array_equal(ds.chunk(0).step0, [cc.episode_length + 1])
  np.testing.assert_array_equal(ds.chunk(1).stream, [0, 1, 3])
  assert all(np.isfinite(np.asarray(c.obs)).all() for c in ds)

  root = str(tmp_path / "killed")
  workdir = os.path.join(root, "behaviour", "narrow", "cheetah")
  with pytest.raises(collect.StageStopped):  # stopped before chunk 5, after the divergence
    stage(root, StopAfter(4))
  partial = dataset_lib.Dataset.open(os.path.join(workdir, "stream"), allow_incomplete=True)
  assert partial.num_chunks == 0
  assert not os.path.exists(os.path.join(workdir, "result.json"))
  again, ds_again = stage(root)
  assert [r.calls for r in runners] == [6, 4, 6]
  assert again == result and ds_again.info == ds.info
  _same_chunks(ds, ds_again)
  assert stage(root)[0] == result and len(runners) == 3  # finished: skipped, nothing built


class Killed(Exception):
  """A kill between a period's dataset writes and its checkpoint."""


def test_a_job_resumes_after_periods_that_dropped_episodes(tmp_path, monkeypatch):
  """3 periods of 2 episodes (6 chunks of 17 records): a dropped episode splits its slot's
  stream, so periods 0 and 1 (a NaN in member 2's episode 0, then in member 0's episode 1) write
  2 chunks each and the writer's count (5 in all) is not the period count. A kill after period 1's
  writes and before its checkpoint leaves 4 chunks on disk and period 0's checkpoint (2 chunks);
  the resume truncates to those 2, replays period 1 (its divergence recurs, as a deterministic
  one would) and ends with the uninterrupted run's result, dataset and state, bitwise.

  (The NaN goes into the state the simulation continues from, so its member is held on that
  non-finite state until the episode ends; a checkpoint taken meanwhile would be set aside as
  corrupted at restore. Period 0's divergence is in episode 0, so the checkpoint resumed from
  holds finite states, as after a real divergence, held on its last finite state.)"""
  cc = pipeline_config(**{"collect.chunk": 17}).collect
  real, runners, nans = collect.get_runner, [], []

  def get_runner(*args):
    runner = real(*args)
    for at, member in nans:
      runner = NaNAt(runner, at, member)
    runners.append(runner)
    return runner

  save, kill_at = checkpoint_lib.Checkpointer.save, {"step": None}

  def killing_save(self, step, state, meta):
    if step == kill_at["step"]:
      raise Killed
    return save(self, step, state, meta)

  monkeypatch.setattr(collect, "get_runner", get_runner)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", killing_save)
  runs = {}
  for name in ("straight", "killed"):
    workdir = str(tmp_path / name)
    path = os.path.join(workdir, "stream")

    def job(path=path):
      writer = collect.open_writer(path, "cheetah", "behaviour", cc.episode_length, {})
      return writer, dataclasses.replace(_job(cc, writer), periods=3, period_episodes=2)

    nans[:] = [(2, 2), (11, 0)]  # period 0 chunk 2 (episode 0); period 1 chunk 5 (episode 1)
    if name == "killed":
      kill_at["step"] = 2  # period 1's checkpoint
      writer, killed = job()
      with pytest.raises(Killed):
        collect.run_job(cc, killed, 8.0, workdir, seed=3)
      assert writer.num_chunks == 4
      kill_at["step"], nans[:] = None, [(5, 0)]  # the resume's 5th call is period 1's 5th
    writer, j = job()
    result = collect.run_job(cc, j, 8.0, workdir, seed=3)
    writer.close({"dropped_episodes": result["dropped_episodes"]})
    runs[name] = (jax.device_get(result.pop("final_state")), result, dataset_lib.Dataset.open(path))
  assert [r.calls for r in runners] == [18, 12, 12]
  (s1, r1, d1), (s2, r2, d2) = runs["straight"], runs["killed"]
  assert r1["dropped_episodes"] == 2 and r1["chunks"] == 5
  assert [c.num_streams for c in d1] == [1, 3, 1, 3, 4]
  np.testing.assert_array_equal(d1.chunk(0).stream, [2])  # slot 2's episode 1 of period 0
  np.testing.assert_array_equal(d1.chunk(0).step0, [cc.episode_length + 1])
  np.testing.assert_array_equal(d1.chunk(2).stream, [4])  # slot 0's episode 0 of period 1
  np.testing.assert_array_equal(d1.chunk(2).step0, [0])
  assert r2 == r1 and d2.info["dropped_episodes"] == 2
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
  _same_chunks(d1, d2)


def test_v_max_is_the_deterministic_mean_speed_of_its_window(tmp_path):
  """v_max is the mean v_x over control steps 200–999 (here from L // 5 = 10 to 49) of the
  trained expert's deterministic episodes: recomputed from a replay of its checkpointed state."""
  cc = pipeline_config(**{"collect.v_max.measure": True}).collect
  meta = collect.stage_v_max(cc, str(tmp_path), ("cheetah",), stop=None)
  v = meta["cheetah"]
  assert v["source"] == "measured" and v["dropped_episodes"] == 0
  runner = collect.get_runner(cc, "cheetah", collect.recipe(cc, "behaviour"))
  members = [scen.Scenario("cheetah", 1.0, 1.0, 1.0)] * cc.behaviour.num_envs
  params = collect.make_params(cc, "cheetah", members, 1.0, "suite")
  like = runner.init(params, jax.random.PRNGKey(0))
  workdir = os.path.join(tmp_path, "v_max", "cheetah", "checkpoints")
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    _, state, _ = ckpt.restore_latest(like)  # the expert after training
  controls = runner_lib.make_controls("deterministic")
  speed = []
  for _ in range(3):  # ⌈10 episodes / 4 slots⌉ = 3 whole episodes per slot (one chunk each)
    state, out = runner.run(state, params, controls)
    speed.append(np.asarray(out.speed))
  speed = np.concatenate(speed)  # [153, 4]
  t = np.arange(speed.shape[0]) % (EPISODE + 1)
  np.testing.assert_allclose(v["value"], speed[(t >= 10) & (t < EPISODE)].mean(), rtol=1e-5)
  assert not np.isclose(v["value"], speed.mean(), rtol=1e-3)  # the window matters here
  again = collect.stage_v_max(cc, str(tmp_path), ("cheetah",), stop=None)
  assert again == meta  # a finished stage is skipped


def test_medium_expert_random_datasets(pipeline, tmp_path):
  root = str(tmp_path / "data")
  shutil.copytree(pipeline.data_dir, root)
  c = pipeline_config(
    **{
      "collect.datasets.kinds": ("mix", "medium", "expert", "random"),
      "collect.datasets.records": 408,
    }
  )
  v_max = collect.read_metadata(root, "v_max")
  gate = collect.read_metadata(root, "gate")
  collect.stage_datasets(c.collect, root, ("cheetah",), v_max, gate, stop=None)
  result = {}
  for kind in ("medium", "expert", "random"):
    ds = dataset_lib.Dataset.open(collect.dataset_path(root, "narrow", "cheetah", kind))
    assert ds.kind == kind and ds.num_records == 408 and ds.episode_length == 50
    result[kind] = ds
  expert = result["expert"].info["snapshot"]
  medium = result["medium"].info["snapshot"]
  assert expert["period"] >= medium["period"]
  # medium: the first snapshot whose deterministic evaluation (ξ on, ≥ eval_episodes episodes on
  # the training distribution) reaches half the final one's, recorded in the stage's metadata.
  evaluated = collect.read_metadata(root, "snapshot_returns")["narrow/cheetah"]
  final = evaluated[str(expert["period"])]["deterministic_return"]
  assert expert["deterministic_return"] == medium["final_return"] == final
  assert all(e["episodes"] >= c.collect.datasets.eval_episodes for e in evaluated.values())
  passing = [int(p) for p, e in evaluated.items() if e["deterministic_return"] >= 0.5 * final]
  assert medium["period"] == min(passing)
  # The datasets' actions are the snapshot's ξ-conditioned policy's: u = atanh(a) standardised by
  # the policy's mean and σ at (o_t, ξ) is N(0, 1), so its mean square is 1 (± 0.03 for these
  # 400 × 6 draws). Replayed with the ξ gate at 0 the same statistic is 4.8 (measured), so the
  # bound [0.8, 1.25] fails for a blind replay. (The returns themselves cannot be compared this
  # tightly: 8 stochastic 50-step episodes of a barely trained actor spread 0.01–0.9 around a
  # deterministic evaluation of 0.56, on other scenarios.)
  for kind in ("medium", "expert"):
    with_xi, blind = (np.mean(_policy_z(c.collect, result[kind], g) ** 2) for g in (1.0, 0.0))
    assert 0.8 < with_xi < 1.25 and blind > 1.5, (kind, with_xi, blind)
  actions = np.asarray(result["random"].chunk(0).action)
  last = np.asarray(result["random"].chunk(0).last)
  assert np.abs(actions[~last]).max() <= 1 and actions[~last].std() > 0.5  # uniform in [-1, 1]


def _policy_z(cc, ds, xi_gate: float) -> np.ndarray:
  """(atanh(a_t) − μ) / σ of every non-last record under the dataset's snapshot actor."""
  actor = collect.load_actor(ds.info["snapshot"]["path"], collect._actor_like(cc, "cheetah"))
  module = sac_lib.actor_module(collect.recipe(cc, "behaviour").sac, 6)
  zs = []
  for chunk in ds:
    obs, last = np.asarray(chunk.obs), np.asarray(chunk.last)
    xi = np.broadcast_to(np.asarray(chunk.xi)[:, None], (*obs.shape[:2], 6))
    mean, log_std = module.apply(actor, sac_lib.network_input(obs, xi, xi_gate))
    u = np.arctanh(np.clip(np.asarray(chunk.action), -1 + 1e-6, 1 - 1e-6))
    zs.append(((u - np.asarray(mean)) / np.exp(np.asarray(log_std)))[~last])
  return np.concatenate(zs)


def test_evaluation_lists_are_fixed_and_follow_settings(tmp_path):
  c = pipeline_config(**{"collect.evaluation.settings": (), "collect.evaluation.scenarios": 5})
  gate = {"hopper": {"shrink": 0.0}}
  lists = collect.stage_lists(c.collect, str(tmp_path / "a"), ("hopper",), gate)
  again = collect.stage_lists(c.collect, str(tmp_path / "b"), ("hopper",), gate)
  assert lists == again and list(lists["hopper"]) == ["a", "b"]
  for s in lists["hopper"]["b"]:  # setting (b): α in [0.6, 0.8) ∪ (1.2, 1.4], β outside [0.5, 0.8]
    for a in (s["alpha_len"], s["alpha_size"]):
      assert 0.6 <= a < 0.8 or 1.2 < a <= 1.4
    assert 0.3 <= s["beta"] < 0.5 or 0.8 < s["beta"] <= 1.0
  for s in lists["hopper"]["a"]:
    assert 0.8 <= s["alpha_len"] <= 1.2 and 0.5 <= s["beta"] <= 0.8


def test_gate_shrink_cannot_invert_setting_d():
  """The gate's step is checked up front, and a shrink that would empty (d)'s [0.4, 0.6) ring
  is an error naming that interval, not an inverted range drawn from silently."""
  assert collect.max_gate_shrink() == pytest.approx(0.2)
  c = pipeline_config(**{"collect.gate.enabled": True, "collect.gate.shrink": 0.25})
  with pytest.raises(ValueError, match=r"config.collect.gate.shrink=0.25 must lie in \(0, 0.2\)"):
    collect.validate(c.collect)
  with pytest.raises(ValueError, match=r"invert setting \(d\)'s α interval \[0.4, 0.6\]"):
    collect.evaluation_distribution("d", shrink=0.2)
  with pytest.raises(ValueError, match=r"'wide' \(training\)'s α interval \[0.6, 1.4\]"):
    collect.training_distribution("wide", shrink=0.4)
  e = collect.evaluation_distribution("d", shrink=0.15)  # the gate's last step at 0.05
  np.testing.assert_allclose(e.alpha, [(0.55, 0.6), (1.4, 1.45)])


def test_gate_shrink_narrows_wide_ranges():
  d = collect.training_distribution("wide", shrink=0.1)
  np.testing.assert_allclose(d.alpha, [(0.7, 1.3)])
  e = collect.evaluation_distribution("d", shrink=0.1)
  np.testing.assert_allclose(e.alpha, [(0.5, 0.6), (1.4, 1.5)])
  assert collect.training_distribution("narrow_beta0.8").beta == ((0.8, 0.8),)
  assert collect.training_distribution("fixed").alpha == ((1.0, 1.0),)


def test_fixed_is_table_5s_distribution(tmp_path):
  """Table 5 (PROTOCOL.md): dynamics fixed (α = 1) and β in [0.5, 0.8], in training, in
  evaluation and in its evaluation list; the gate's shrink leaves it alone (δ = 0)."""
  assert collect.EVAL_SETTINGS["fixed"] == ("fixed",)
  for shrink in (0.0, 0.15):
    for d in (collect.training_distribution("fixed", shrink),
              collect.evaluation_distribution("fixed", shrink)):  # fmt: skip
      assert d.alpha == ((1.0, 1.0),) and d.beta == ((0.5, 0.8),), (shrink, d)
  draws = collect.training_distribution("fixed").sample(np.random.default_rng(0), "walker", 200)
  assert all(s.alpha_len == s.alpha_size == 1.0 for s in draws)
  beta = np.array([s.beta for s in draws])
  assert 0.5 <= beta.min() < 0.52 and 0.78 < beta.max() <= 0.8  # the whole range, nothing else
  c = pipeline_config(
    **{"collect.distributions": ("fixed",), "collect.evaluation.settings": (),
       "collect.evaluation.scenarios": 5}
  )  # fmt: skip
  lists = collect.stage_lists(c.collect, str(tmp_path), ("walker",), {"walker": {"shrink": 0.1}})
  assert list(lists["walker"]) == ["fixed"] and len(lists["walker"]["fixed"]) == 5
  for s in lists["walker"]["fixed"]:
    assert s["alpha_len"] == s["alpha_size"] == 1.0 and 0.5 <= s["beta"] <= 0.8


@pytest.mark.parametrize(
  "override, message",
  [
    ({"collect.chunk": 7}, r"config.collect.chunk=7 must divide episode_length \+ 1 = 51"),
    ({"collect.distributions": ("narrow", "huge")}, r"config.collect.distributions has 'huge'"),
    ({"collect.behaviour.num_envs": 0}, r"config.collect.behaviour.num_envs=0 must be ≥ 1"),
    ({"collect.evaluation.settings": ("z",)}, r"config.collect.evaluation.settings has 'z'"),
  ],
)
def test_collect_config_errors_name_the_field(override, message):
  with pytest.raises(ValueError, match=message):
    collect.validate(pipeline_config(**override).collect)


def test_iterations_round_up_to_whole_periods():
  c = pipeline_config().collect
  assert collect.period_episodes(c, 4, 8000) == 5 and collect.num_periods(c, 4, 8000) == 8
  assert collect.iterations(c, 4, 8000) == 40 * 51  # 2000 steps per slot → 40 whole episodes
  assert collect.iterations(c, 4, 408) == 2 * 51
  assert dataclasses.replace(collect.recipe(c, "behaviour"), domain="x").replay_capacity == 408
  members = [scen.Scenario("cheetah", beta=0.5)] * 4
  params = collect.make_params(c, "cheetah", members, v_max=6.0, reward_mode="target_speed")
  np.testing.assert_allclose(np.asarray(params.v_target), 3.0)


def test_job_modes_train_only_in_train(tmp_path):
  """A Job trains by default (a snapshot per period, the actor moves); other modes only act."""
  cc = pipeline_config().collect
  job = dataclasses.replace(_job(cc, None), periods=1)
  assert job.mode is runner_lib.RunnerMode.TRAIN
  trained = collect.run_job(cc, job, 8.0, str(tmp_path / "train"), seed=3)
  state = jax.device_get(trained.pop("final_state"))
  (snap,) = trained["snapshots"]
  init = collect.get_runner(cc, "cheetah", job.rc).init(
    collect.make_params(cc, "cheetah", job.scenarios(0), 8.0, "target_speed"),
    jax.random.PRNGKey(3),
  )
  before = jax.tree.leaves(runner_lib.Runner.actor_params(init))
  after = jax.tree.leaves(runner_lib.Runner.actor_params(state))
  assert any(not np.allclose(a, b) for a, b in zip(before, after))  # updates happened
  actor = runner_lib.Runner.actor_params(state)
  saved = collect.load_actor(os.path.join(tmp_path, "train", snap["path"]), actor)
  jax.tree.map(np.testing.assert_array_equal, saved, actor)
  runs = {}
  for mode in runner_lib.RunnerMode:
    if mode is runner_lib.RunnerMode.TRAIN:
      continue
    for again in (0, 1):
      ev = dataclasses.replace(job, mode=mode, init_state=state, name=f"{mode.name} {again}")
      out = collect.run_job(cc, ev, 8.0, str(tmp_path / f"{mode.name}{again}"), seed=5)
      kept = runner_lib.Runner.actor_params(out.pop("final_state"))
      jax.tree.map(np.testing.assert_array_equal, kept, runner_lib.Runner.actor_params(state))
      assert out["snapshots"] == []
      runs[mode, again] = out["returns"]
  # Deterministic acting is a function of the state: the same returns from the same state.
  det = runner_lib.RunnerMode.DETERMINISTIC
  assert runs[det, 0] == runs[det, 1]
  assert runs[runner_lib.RunnerMode.RANDOM, 0] != runs[det, 0]


@pytest.mark.slow  # compiles a 5-agent specialist program (about a minute on 2 cores)
def test_gate_records_its_verdict(pipeline, tmp_path):
  c = pipeline_config(**{"collect.gate.enabled": True, "collect.gate.threshold": 0.0})
  v_max = {"cheetah": {"value": 8.0, "source": "provisional (labelled)"}}
  gate = collect.stage_gate(c.collect, str(tmp_path), ("cheetah",), v_max, stop=None)
  verdict = gate["cheetah"]
  assert verdict["enabled"] and verdict["shrink"] == 0.0
  (first,) = verdict["history"]
  assert first["alpha"] == [0.4, 1.6] and len(first["returns"]) == 5 and len(first["ratios"]) == 4
  assert verdict["passed"] == all(np.isfinite(first["ratios"]))  # threshold 0: finite ratios pass


@pytest.mark.slow  # four rounds of corner specialists (the fast test covers the bound itself)
def test_gate_stops_shrinking_before_setting_d_inverts(pipeline, tmp_path):
  c = pipeline_config(**{"collect.gate.enabled": True, "collect.gate.threshold": float("inf")})
  v_max = {"cheetah": {"value": 8.0, "source": "provisional (labelled)"}}
  verdict = collect.stage_gate(c.collect, str(tmp_path), ("cheetah",), v_max, stop=None)["cheetah"]
  assert not verdict["passed"] and verdict["shrink"] == pytest.approx(0.15)
  np.testing.assert_allclose(
    [h["alpha"] for h in verdict["history"]], [[0.4, 1.6], [0.45, 1.55], [0.5, 1.5], [0.55, 1.45]]
  )
  lists = collect.stage_lists(c.collect, str(tmp_path), ("cheetah",), {"cheetah": verdict})
  assert lists["cheetah"]  # the shrunk ranges draw
  collect.evaluation_distribution("d", verdict["shrink"])  # (d) stays a valid ring
