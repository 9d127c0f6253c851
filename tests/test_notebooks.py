"""Every notebook in notebooks/ runs top to bottom, headless (nbclient), at its own tiny parameters
with the workdir redirected to a temporary folder; each produced what it shows."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("execute", os.path.join(REPO, "notebooks", "execute.py"))
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


def _errors(nb) -> list[str]:
  return [o.get("ename", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if o.output_type == "error"]


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))


def test_every_notebook_is_tested_and_has_a_parameters_cell():
  names = {os.path.basename(p) for p in execute.notebooks()}
  assert names == {"quickstart.ipynb", "raptr_vs_baseline.ipynb", "library_in_your_code.ipynb"}
  for path in execute.notebooks():
    nb = execute.nbformat.read(path, as_version=4)
    assert execute.parameters(nb), path
    # Committed with the outputs of a real execution, without an error, a plot in view.
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), f"{path}: not executed"
    assert not _errors(nb) and _images(nb), path


def test_quickstart(tmp_path):
  workdir = str(tmp_path / "quickstart")
  nb = execute.execute(os.path.join(REPO, "notebooks", "quickstart.ipynb"), {"WORKDIR": workdir})
  assert not _errors(nb) and _images(nb) >= 1
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  summary = json.load(open(os.path.join(workdir, "quickstart.json")))
  # The restored checkpoint's validation loss is the run's last logged one.
  assert summary["step"] == 60 and summary["validation_loss"] == pytest.approx(summary["logged_eval_loss"], rel=1e-5)
  assert all(summary["generated"]["greedy"]) and all(summary["generated"]["sampled"])


def test_raptr_vs_baseline(tmp_path):
  workdir = str(tmp_path / "compare")
  nb = execute.execute(os.path.join(REPO, "notebooks", "raptr_vs_baseline.ipynb"), {"WORKDIR": workdir})
  assert not _errors(nb) and _images(nb) >= 3  # loss vs RST, loss vs steps, subnetwork size
  table = open(os.path.join(workdir, "results.md")).read()
  assert all(f"| {m} |" in table for m in ("baseline", "raptr", "pld")), table
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["baseline"]["mean_layers"] == 6 and 3 <= summary["raptr"]["mean_layers"] < 6
  assert summary["pld"]["mean_layers"] < 6
  # One RST budget: RaPTr's cheaper steps buy it more of them than the baseline.
  assert summary["raptr"]["steps"] > summary["baseline"]["steps"]


def test_library_in_your_code(tmp_path):
  out = str(tmp_path / "library")
  nb = execute.execute(os.path.join(REPO, "notebooks", "library_in_your_code.ipynb"), {"OUT": out, "STEPS": 60})
  assert not _errors(nb) and _images(nb) == 3
  for name in ("optimizers.png", "raptr.png", "random_ltd.png"):
    assert os.path.exists(os.path.join(out, name))
  results = json.load(open(os.path.join(out, "results.json")))
  assert results["steps"] == 60
  for method, loss in results["held_out_loss"].items():  # every optimizer and method trained the model
    assert loss < results["initial_loss"] - 0.3, (method, results)
