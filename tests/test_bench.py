"""The benchmark runners: ``bench/run_all.py`` keeps to its budget and reports what it ran and
skipped; ``bench/plain_jax.py`` (the framework tax's reference) computes the project's model."""
import json
import os
import sys

import jax
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import framework_tax  # noqa: E402
import plain_jax  # noqa: E402
import run_all  # noqa: E402


def test_run_all_keeps_to_its_budget_and_reports(tmp_path, capsys):
  """A small budget: the first entry runs (its figures in the report and the markdown rows), the
  next does not fit its estimate and is skipped naming why; the whole run ends within the budget."""
  out, rows = tmp_path / "report.json", tmp_path / "rows.md"
  budget = 60
  full = run_all.main([f"--time_budget_s={budget}", "--only=step_decoder,interlocking", "--size=cpu",
                       f"--json={out}", f"--markdown={rows}"])
  report = json.loads(out.read_text())
  assert report["entries"] == json.loads(json.dumps(full["entries"]))
  env = report["environment"]
  assert env["platform"] == "cpu" and env["jax"] == jax.__version__ and env["jaxlib"]
  entries = {e["name"]: e for e in report["entries"]}
  assert list(entries) == ["step_decoder", "interlocking"]   # the order of importance
  step = entries["step_decoder"]
  assert step["status"] == "ok", step
  assert step["figures"]["step_ms"] > 0 and step["figures"]["tokens_per_s"] > 0 and step["figures"]["mfu"] is None
  assert step["command"] == "python bench/bench_step.py --preset=tiny --steps=5 --warmup=1"
  skipped = entries["interlocking"]
  assert skipped["status"] == "skipped" and "of the budget left" in skipped["reason"]
  assert report["wall_s"] <= budget
  markdown = rows.read_text().splitlines()
  assert markdown[0].startswith("| date | device | jax | benchmark |") and len(markdown) == 2 + 2
  assert "step_decoder" in markdown[2] and "tokens/s" in markdown[2] and "skipped" in markdown[3]


def test_run_all_refuses_unknown_entries(capsys):
  with pytest.raises(SystemExit):
    run_all.main(["--only=step_gpt5"])
  assert "unknown entries ['step_gpt5']" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["full", "raptr", "random_ltd"])
def test_plain_jax_reference_is_the_projects_model(variant):
  """The framework tax compares like with like: the plain-JAX loss equals the project's (the full
  model's over three optimizer steps; a subnetwork's under the same layer or token draw)."""
  cfg = framework_tax.config("tiny", [])
  pair = framework_tax.setup_pair(variant, cfg)
  params, ref_batch = pair.params, pair.ref_batch
  # check_same_model asserts the agreement itself (np.testing), and says what it compared
  *_, said = framework_tax.check_same_model(variant, cfg, pair)
  assert "agree" in said
  if variant == "full":  # and the reference is not trivially equal: a changed parameter changes its loss
    changed = jax.tree.map(np.array, params)
    changed["layers"]["wo"] *= 2
    assert float(plain_jax.full_loss(changed, ref_batch)) != pytest.approx(float(plain_jax.full_loss(params, ref_batch)),
                                                                         rel=1e-6)
