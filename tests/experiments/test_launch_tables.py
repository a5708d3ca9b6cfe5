"""Every table's sweep builds the experiments PROTOCOL.md describes: each pretraining point trains
on its table's distribution, dataset kind, observation function and domains (read back from the
config the entry point's own flags parse), distinct models never share a workdir under one root,
and each adaptation starts from the pretraining run of its own model."""

from __future__ import annotations

import os

import pytest

from launch import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = "/scratch/mrcom"

# PROTOCOL.md, Settings and the experiments table, written out by hand.
EXPECTED = {
  "table1": {"distribution": {"a": "narrow", "b": "narrow", "c": "wide", "d": "wide"}},
  "table2": {
    "distribution": {
      "a@0.8": "narrow_beta0.8",
      "b@0.8": "narrow_beta0.8",
      "c@0.8": "wide_beta0.8",
      "d@0.8": "wide_beta0.8",
    }
  },
  "table3": {
    "distribution": {"a": "narrow"},
    "obs_fn": {"add_gaussian", "add_distractor", "mask_random", "mask_fixed"},
  },
  "table4": {
    "distribution": {"a": "narrow", "b": "narrow", "c": "wide", "d": "wide"},
    "domains": {("hopper",), ("walker",), ("cheetah",)},
  },
  "table5": {"distribution": {"fixed": "fixed"}, "kind": {"expert", "medium", "mix", "random"}},
  "figure3": {"distribution": {"a": "narrow", "d": "wide"}},
}
ALL = ("hopper", "walker", "cheetah")


def _model(config) -> tuple:
  """What a pretraining run trains: everything that makes it another model."""
  d = config.data
  ablations = tuple(a for a in sweep.ABLATIONS if config.world_model[a])
  return (d.distribution, d.kind, d.obs_fn, tuple(d.domains), ablations, config.seed)


@pytest.fixture(scope="module")
def parsed(monkeypatch_module):
  """{table: [(point, config)]} for pretraining and adaptation, every list parsed by the entry
  point's flags and validated (`check_args`)."""
  out = {}
  for table in sweep.TABLES:
    for entry in sweep.ENTRIES:
      seeds = [0, 1] if entry == "pretrain" else [1]
      methods = ("mrcom", "no_rollouts") if entry == "adapt" else ("mrcom",)
      pts = sweep.table_points(table, entry, seeds, ROOT, methods=methods)
      out[table, entry] = [(p, sweep.check_args(entry, p.args())[0]) for p in pts]
  return out


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  mp.chdir(REPO)  # config paths in the argument lists are relative to the repository
  yield mp
  mp.undo()


@pytest.mark.parametrize("table", sweep.TABLES)
def test_pretraining_points_train_their_tables_model(parsed, table):
  want = EXPECTED[table]
  pts = parsed[table, "pretrain"]
  # one run per distribution: settings that share one share its run
  assert {c.data.distribution for _, c in pts} == set(want["distribution"].values())
  seen = set()
  for p, config in pts:
    assert config.data.distribution == want["distribution"][p.setting], p.name
    assert config.data.kind in want.get("kind", {"mix"}), p.name
    assert config.data.obs_fn in want.get("obs_fn", {"none"}), p.name
    assert tuple(config.data.domains) in want.get("domains", {ALL}), p.name
    assert config.data.dir == f"{ROOT}/data"
    seen.add((config.data.kind, config.data.obs_fn, tuple(config.data.domains)))
  # every combination of the table's dimensions is there
  n = len(want.get("kind", {0})) * len(want.get("obs_fn", {0})) * len(want.get("domains", {0}))
  assert len(seen) == n


def test_distinct_models_have_distinct_workdirs_across_all_tables(parsed):
  by_name = {}
  for (_, entry), pts in parsed.items():
    if entry == "pretrain":
      for p, config in pts:
        by_name.setdefault(p.workdir, set()).add(_model(config))
  # one model per workdir, and one workdir per model (Table 3's clean runs are Table 1's (a))
  assert all(len(models) == 1 for models in by_name.values()), by_name
  models = [next(iter(m)) for m in by_name.values()]
  assert len(set(models)) == len(models)
  table1 = {p.workdir for p, _ in parsed["table1", "pretrain"]}
  for other in ("table2", "table3", "table4", "table5"):
    assert not table1 & {p.workdir for p, _ in parsed[other, "pretrain"]}, other


@pytest.mark.parametrize("table", sweep.TABLES)
def test_adaptations_start_from_their_own_models_run(parsed, table):
  pretraining = {p.workdir: config for p, config in parsed[table, "pretrain"]}
  pts = parsed[table, "adapt"]
  assert {p.setting for p, _ in pts} == set(EXPECTED[table]["distribution"])
  for p, config in pts:
    assert config.target.setting == p.setting and tuple(config.seeds) == (p.seed,)
    pre = pretraining[config.pretrain.workdir]  # a pretraining point of the same table
    assert pre.seed == p.seed and pre.data.obs_fn == config.target.obs_fn
    assert pre.data.distribution == EXPECTED[table]["distribution"][p.setting]
    assert tuple(pre.data.domains) == (tuple(config.target.domains) or ALL)
    assert config.adapt.model_rollouts == (p.method != "no_rollouts")
  names = [p.name for p, _ in pts]
  assert len(set(names)) == len(names)


def test_unknown_dimensions_are_refused_with_the_choices():
  for kwargs, message in [
    ({"settings": ["e"]}, "unknown setting 'e'"),
    ({"obs_fns": ["blur"]}, "unknown observation function 'blur'"),
    ({"kinds": ["best"]}, "unknown dataset kind 'best'"),
    ({"domains": ["ant"]}, "unknown domain 'ant'"),
  ]:
    args = {"settings": ["a"], **kwargs}
    with pytest.raises(ValueError, match=message):
      sweep.points("pretrain", [0], methods=["mrcom"], root=ROOT, **args)
  with pytest.raises(ValueError, match="unknown table 'table9'"):
    sweep.table_points("table9", "pretrain", [0], ROOT)
