"""The Colab notebook runs top to bottom on CPU (executed with nbclient), and is committed
without outputs. Its parameters cell is pointed at the session's pipeline data with the test
sizes, so the kernel reuses the programs the other pipeline tests compiled (persistent cache)."""

from __future__ import annotations

import json
import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "launch", "colab", "mrcom_tpu.ipynb")


def test_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_runs_top_to_bottom_on_cpu(pipeline, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  pretrain_overrides = {"data.dir": pipeline.data_dir}
  adapt_overrides = {
    "target.domain": "cheetah", "target.beta": 0.5, "target.episode_length": 250,
    "eval.every": 500,
  }  # fmt: skip
  params.source += (
    f"\nWORKDIR = {str(tmp_path)!r}\nPRETRAIN_OVERRIDES = {pretrain_overrides!r}"
    f"\nADAPT_OVERRIDES = {adapt_overrides!r}\nINSTALL = False\n"
  )
  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO}}
  )
  client.execute()
  text = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "runtime accelerator: cpu" in text and "updates: 300" in text
  assert "adaptation results (mrcom)" in text
  results = json.load(open(tmp_path / "adapt_smoke" / "results.json"))
  assert [r["seed"] for r in results["rows"]] == [0, 1]
  assert (tmp_path / "adapt_smoke" / "learning_curves.png").stat().st_size > 10_000
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the loss curve and the learning curves
