"""PROTOCOL.md's normalised score, its guard, the per-seed ratio of means and the table."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from mrcom_jax.adaptation import results


def test_normalised_score_by_hand():
  # 100 · (30 − 10) / (50 − 10) = 50
  assert results.normalised_score(30.0, 10.0, 50.0) == pytest.approx(50.0)
  # below random is negative: 100 · (5 − 10) / 40 = −12.5
  assert results.normalised_score(5.0, 10.0, 50.0) == pytest.approx(-12.5)
  assert results.normalised_score(30.0, 10.0, None) is None
  # guard: R_ref − R_rand = 0.4 < 0.05 · 10 = 0.5 → NaN (None) with a warning
  with pytest.warns(UserWarning, match="score guard"):
    assert results.normalised_score(9.0, 9.6, 10.0) is None


def _pairs_and_history():
  pairs = [
    {"domain": "hopper", "setting": "a", "label": f"a/{i}", "scenario": {}, "seed": s}
    for i in range(2)
    for s in (0, 1)
  ]
  history = {
    "steps": [500, 1000],
    "returns": [[1.0, 2.0, 3.0, 4.0], [20.0, 30.0, 40.0, 50.0]],
    "random_returns": {"values": [10.0, 10.0, 0.0, 0.0], "source": ["metadata"] * 4},
  }
  metadata = {"specialists": {"hopper": {"a/0": {"return": 50.0}, "a/1": {"return": 100.0}}}}
  return pairs, history, metadata


def test_rows_scores_and_table_by_hand():
  pairs, history, metadata = _pairs_and_history()
  out = results.summarise({"adapt": {"model_rollouts": True, "prompt": True}}, pairs, history,
                          metadata)  # fmt: skip
  rows = out["rows"]
  assert [r["return"] for r in rows] == [20.0, 30.0, 40.0, 50.0]
  # rows: 100·(20−10)/(50−10) = 25, 100·(30−10)/40 = 50, 100·40/100 = 40, 100·50/100 = 50
  assert [r["score"] for r in rows] == pytest.approx([25.0, 50.0, 40.0, 50.0])
  assert rows[1]["curve"] == {"steps": [500, 1000], "returns": [2.0, 30.0]}
  # per seed, the ratio of means over the two scenarios:
  #   seed 0: R = (20 + 40)/2 = 30, R_rand = 5, R_ref = 75 → 100 · 25/70 = 35.714…
  #   seed 1: R = (30 + 50)/2 = 40, R_rand = 5, R_ref = 75 → 100 · 35/70 = 50
  per_seed = {s["seed"]: s for s in out["scores"]}
  assert per_seed[0]["score"] == pytest.approx(100 * 25 / 70)
  assert per_seed[1]["score"] == pytest.approx(50.0)
  (row,) = out["table"]
  assert row["score"]["mean"] == pytest.approx((100 * 25 / 70 + 50) / 2)
  assert row["score"]["std"] == pytest.approx(np.std([100 * 25 / 70, 50]))
  assert row["return"]["mean"] == pytest.approx(35.0) and row["seeds"] == 2
  assert out["variant"] == "mrcom"
  json.dumps(out)  # results.json is plain JSON (None, never NaN)


def test_missing_reference_gives_none_not_nan():
  pairs, history, metadata = _pairs_and_history()
  del metadata["specialists"]["hopper"]["a/1"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = results.summarise({"adapt": {"model_rollouts": False, "prompt": False}}, pairs,
                            history, metadata)  # fmt: skip
  assert all(s["score"] is None for s in out["scores"])
  assert out["table"][0]["score"] == {"mean": None, "std": None, "n": 2}
  assert out["variant"] == "no_rollouts+own_context"


def test_plot_and_table(tmp_path, capsys):
  pairs, history, metadata = _pairs_and_history()
  out = results.summarise({"adapt": {"model_rollouts": True, "prompt": True}}, pairs, history,
                          metadata)  # fmt: skip
  path = tmp_path / "curves.png"
  results.plot_curves(out, str(path))
  assert path.stat().st_size > 10_000
  results.print_table(out)
  assert "42.9 ± 7.1" in capsys.readouterr().out


def test_a_guarded_scenario_is_left_out_of_the_ratio_of_means_and_counted(capsys):
  """PROTOCOL.md, Score: a scenario whose guard fails is NaN, left out of its seed's ratio of
  means, and the cell says how many scenarios the score was computed from."""
  pairs, history, metadata = _pairs_and_history()
  # a third scenario a/2: R_ref − R_rand = 10 − 9.8 = 0.2 < 0.05 · 10 → guarded for both seeds
  pairs += [{"domain": "hopper", "setting": "a", "label": "a/2", "scenario": {}, "seed": s}
            for s in (0, 1)]  # fmt: skip
  history["returns"] = [[*r, 0.0, 0.0] for r in history["returns"]]
  history["returns"][-1][4:] = [1000.0, 2000.0]  # would dominate the means if it counted
  history["random_returns"]["values"] += [9.8, 9.8]
  history["random_returns"]["source"] += ["metadata"] * 2
  metadata["specialists"]["hopper"]["a/2"] = {"return": 10.0}
  with pytest.warns(UserWarning, match="score guard"):
    out = results.summarise({"adapt": {"model_rollouts": True, "prompt": True}}, pairs,
                            history, metadata)  # fmt: skip
  assert [r["guarded"] for r in out["rows"]] == [False] * 4 + [True] * 2
  assert [r["score"] for r in out["rows"][4:]] == [None, None]
  # the scores of test_rows_scores_and_table_by_hand, over a/0 and a/1 only
  per_seed = {s["seed"]: s for s in out["scores"]}
  assert per_seed[0]["score"] == pytest.approx(100 * 25 / 70)
  assert per_seed[1]["score"] == pytest.approx(50.0)
  assert per_seed[0]["return"] == pytest.approx(30.0)  # raw returns over the same scenarios
  assert [(s["scenarios"], s["scenarios_left_out"]) for s in out["scores"]] == [(2, 1), (2, 1)]
  (cell,) = out["table"]
  assert cell["scenarios"] == [2, 2] and cell["scenarios_left_out"] == [1, 1]
  assert cell["score"]["mean"] == pytest.approx((100 * 25 / 70 + 50) / 2)
  results.print_table(out)
  assert "42.9 ± 7.1" in (printed := capsys.readouterr().out) and "2 of 3" in printed
  json.dumps(out)
