import csv
import os
import textwrap

import numpy as np
import pytest

from raptr_jax import compare
from raptr_jax.metrics import read_metrics


@pytest.fixture
def comparison_file(tmp_path):
  path = tmp_path / "cmp.py"
  path.write_text(textwrap.dedent(f"""
      def get_comparison():
        return dict(config="configs/ul2.py:tiny",
                    common=["budget.unit=rst_seconds", "budget.rst_table={tmp_path / 'table.json'}",
                            "eval.every=0.5", "log.every=2", "log.tensorboard=False"],
                    methods={{"adamw": ["optimizer.name=adamw"],
                             "stacking": ["method.name=stacking", "method.stacking.depths=(1, 2)",
                                          "method.stacking.grow_at=(0.4,)"]}},
                    seeds=[0, 1], budgets=[0.3])
      """))
  return str(path)


def test_comparison_writes_tables_and_plots_and_resumes(comparison_file, tmp_path, capsys):
  workdir = str(tmp_path / "out")
  compare.main([f"--config={comparison_file}", f"--workdir={workdir}"])
  assert os.path.exists(tmp_path / "table.json")  # missing step kinds were calibrated first
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["seeds"]) for r in rows] == [("adamw", "2"), ("stacking", "2")]
  for r in rows:  # mean +- std of the per-seed final losses
    finals = [compare.final_losses(read_metrics(compare.run_dir(workdir, 0.3, r["method"], s))) for s in (0, 1)]
    val = np.asarray(finals)[:, 1]
    assert float(r["val_mean"]) == pytest.approx(val.mean())
    assert float(r["val_std"]) == pytest.approx(val.std(ddof=1))
  assert "| 0.3 | stacking | 2 |" in open(os.path.join(workdir, "results.md")).read()
  assert os.path.getsize(os.path.join(workdir, "loss_vs_rst_0.3.png")) > 10_000
  assert os.path.getsize(os.path.join(workdir, "loss_vs_steps_0.3.png")) > 10_000  # step-wise too
  capsys.readouterr()
  compare.main([f"--config={comparison_file}", f"--workdir={workdir}"])  # everything is done already
  assert capsys.readouterr().out.count("already complete") == 4
  # The function of the command (notebooks): the same comparison as a dict, in this process.
  as_dict = compare.load_comparison(comparison_file)
  as_dict = {k: getattr(as_dict, k) for k in ("config", "common", "methods", "seeds", "budgets")}
  report = compare.compare(as_dict, workdir)
  assert "| 0.3 | stacking | 2 |" in report.table and report.plots[0].endswith("loss_vs_rst_0.3.png")
  assert set(report.chosen) == {(0.3, "adamw"), (0.3, "stacking")}
  with pytest.raises(ValueError, match="workers > 1 and emit re-run the comparison command on a config file"):
    compare.run_all(compare.load_comparison(as_dict), workdir, workers=2)


def test_bad_comparisons_are_clear_errors(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("def get_comparison():\n  return dict(config='configs/ul2.py', methods={}, seeds=[0], budgets=[1])\n")
  with pytest.raises(ValueError, match="at least one method"):
    compare.load_comparison(str(path))
  path.write_text("def get_comparison():\n  return dict(config='configs/ul2.py', methods={'a': []}, seeds=[0])\n")
  with pytest.raises(ValueError, match="lacks 'budgets'"):
    compare.load_comparison(str(path))
  with pytest.raises(ValueError, match="the comparison dict lacks 'seeds'"):
    compare.load_comparison(dict(config="configs/ul2.py", methods={"a": []}, budgets=[1]))
