"""Run records: metrics JSONL (with resume truncation), run info, and the stop flag."""

from __future__ import annotations

import json
import os
import signal

import ml_collections

from mrcom_jax.training import logs


def test_metric_writer_truncates_past_resume_step(tmp_path):
  w = logs.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (10, 20, 30):
    w.write(step, {"loss": step / 10})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "lo')  # a line cut by a kill
  w = logs.MetricWriter(str(tmp_path), resume_step=20, tensorboard=True)
  w.write(30, {"loss": 9.0})
  w.close()
  rows = logs.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [10, 20, 30]
  assert rows[-1]["loss"] == 9.0
  assert os.listdir(tmp_path / "tensorboard")


def test_run_info_records_config_argv_versions(tmp_path):
  c = ml_collections.ConfigDict({"a": 1, "b": {"c": "x"}})
  logs.write_run_info(str(tmp_path), c, {"mesh": {"data": 1}})
  logs.write_run_info(str(tmp_path), c)
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"a": 1, "b": {"c": "x"}}
  with open(tmp_path / "run_info.json") as f:
    info = json.load(f)["invocations"]
  assert len(info) == 2 and info[0]["mesh"] == {"data": 1}
  assert info[0]["versions"]["jax"] and info[0]["versions"]["mujoco"] == "3.17.0"
  assert info[0]["git"]


def test_stop_flag_catches_sigterm_and_sigusr1():
  for sig in (signal.SIGTERM, signal.SIGUSR1):
    with logs.StopFlag() as stop:
      assert not stop
      assert stop.reason(100) is None and stop.reason(100, stop_after=100) == "stop_after"
      assert stop.reason(50, stop_after=100) is None
      signal.raise_signal(sig)
      assert stop and stop.signal == sig
      assert stop.reason(50) == signal.Signals(sig).name
      assert stop.reason(100, stop_after=100) == "stop_after"  # the planned stop names itself
    assert signal.getsignal(sig) is not stop._handle
