import json

import jax.numpy as jnp
import pytest

from raptr_jax import plan as plan_lib
from raptr_jax import rst
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.metrics import read_metrics
from raptr_jax.models import LayerSelection, Selection
from raptr_jax.optim import learning_rate
from conftest import register_method


def test_plan_charges_each_stage_its_own_cost_and_stops_at_the_budget():
  stages = (plan_lib.Stage("small", 0.3, shape=("k", 1)), plan_lib.Stage("full", 1.0))
  p = plan_lib.Plan(stages, "rst_seconds", budget=10.0, tokens_per_step=1,
                    step_costs={(("k", 1), False): 0.5, (("k", 1), True): 1.5,
                                (("full",), False): 1.0, (("full",), True): 2.5})
  assert p.charge(stages[0]) == 0.5 and p.charge(stages[1]) == 1.0 and p.charge(stages[1], True) == 2.5
  # 3 s of 0.5 s steps (6 steps), then 7 s of 1 s steps (7 steps).
  assert p.total_steps() == 13
  # A Hessian pass every 4th step: 0.5 x 3 + 1.5 reach 3 s in 4 steps; then 1 + 1 + 1 + 2.5 + 1
  # + 1 cross 10 s in 6 more.
  assert p.total_steps(hessian_interval=4) == 4 + 6


def _two_stages(cfg):
  half = lambda key, batch, progress: Selection(layers=LayerSelection(jnp.array([1], jnp.int32), jnp.ones(1)))
  return (plan_lib.Stage("half", 0.5, shape=("layers", 1), select=half, active_layers=1),
          plan_lib.Stage("full", 1.0))


@pytest.fixture
def rst_config(tiny_config, tmp_path, monkeypatch):
  register_method(monkeypatch, "two_stages", _two_stages)
  cfg = tiny_config
  cfg.method.name = "two_stages"
  cfg.budget.update(unit="rst_seconds", value=3.0, rst_table=str(tmp_path / "table.json"))
  cfg.schedule.update(name="one_cycle", warmup=0.5, final=0.0, peak=1e-3)
  cfg.log.every, cfg.eval.every = 1, 0.5
  return cfg


def test_calibration_keys_are_what_the_run_looks_up(rst_config, tmp_path):
  cfg = rst_config
  with pytest.raises(ValueError, match="needs a calibration table.*rst calibrate"):
    train_lib.train(cfg, str(tmp_path / "before"))
  table = rst.calibrate(cfg, steps=2, warmup=0, verbose=False)
  entries = table["entries"]
  assert len(entries) == 3  # two stage shapes + evaluation
  for entry in entries.values():
    for field in ("device_kind", "device_count", "jax", "jaxlib", "dtype", "batch_size", "seq_len",
                  "shape", "seconds", "n"):
      assert field in entry, field
    assert entry["seconds"] > 0 and entry["n"] == 2
  out = train_lib.train(cfg, str(tmp_path / "run"))     # every step kind is found
  assert out["progress"] >= 1.0 and not out["stopped"]


def test_rst_run_charges_stage_costs_drives_lr_and_boundaries(rst_config, tmp_path, capsys):
  cfg = rst_config
  table = rst.calibrate(cfg, steps=1, warmup=0, verbose=False)
  costs = iter([0.05, 0.2])  # deterministic reference costs: half-depth stage, then full
  for entry in table["entries"].values():
    if entry["kind"] == "train":
      entry["seconds"] = next(costs)
    entry["device_kind"] = "reference accelerator"
  rst.save_table(cfg.budget.rst_table, table)
  train_lib.train(cfg, str(tmp_path / "run"))
  assert "calibrated on ['reference accelerator']" in capsys.readouterr().out
  rows = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
  charges = [b["progress_units"] - a["progress_units"] for a, b in zip([{"progress_units": 0.0}] + rows, rows)]
  stages = [r["stage"] for r in rows]
  # 1.5 s of 0.05 s steps = 30 steps in the half-depth stage, then 1.5 s of 0.2 s steps = 8.
  assert stages == [0] * 30 + [1] * 8
  assert charges[:30] == pytest.approx([0.05] * 30) and charges[30:] == pytest.approx([0.2] * 8)
  assert rows[-1]["rst_s"] == pytest.approx(3.1) and rows[-1]["progress"] >= 1.0
  assert 0 < rows[-1]["rst_per_wall"] and rows[-1]["wall_s"] > 0
  for r, c in zip(rows, charges):  # the LR of each step is the one-cycle value at its RST fraction
    start = (r["progress_units"] - c) / 3.0
    assert r["lr"] == pytest.approx(float(learning_rate(start, "one_cycle", 1e-3, 0.5, 0.0)), rel=1e-5)
  assert rows[30]["lr"] == pytest.approx(1e-3)  # the first step at 50% of the budget: the peak
  evals = [r["step"] for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
  assert evals == [0, 30, 38]  # eval cadence on the RST clock: at 50% and at the end


def test_missing_entries_and_free_hessian(rst_config, tmp_path):
  cfg = rst_config
  table = rst.calibrate(cfg, steps=1, warmup=0, verbose=False)
  cfg.optimizer.update(name="sophia_g", hessian_interval=3)
  with pytest.raises(ValueError, match=r"no entry for step kind .*rst calibrate"):
    train_lib.train(cfg, str(tmp_path / "a"))
  table = rst.calibrate(cfg, steps=1, warmup=0, verbose=False)
  run = train_lib.setup(cfg)
  costs = run.plan.step_costs
  assert costs[(("full",), True)] > costs[(("full",), False)]
  cfg.budget.free_hessian = True
  free = train_lib.setup(cfg).plan.step_costs
  assert free[(("full",), True)] == free[(("full",), False)]
  assert len(json.load(open(cfg.budget.rst_table))["entries"]) == len(table["entries"])
  cfg.budget.free_scoring = True
  with pytest.raises(ValueError, match="no forward-only scoring passes"):
    train_lib.setup(cfg)


def test_rst_hours_are_seconds_on_the_clock(tiny_config):
  tiny_config.budget.update(unit="rst_hours", value=0.5)
  assert run_lib.budget_in_units(tiny_config) == ("rst_seconds", 1800.0)


def test_missing_kinds_are_scaled_to_the_reference_system_through_an_anchor(rst_config):
  """A table timed on another machine lacks a kind of the plan: it is timed here together with
  a kind the table has (the anchor), and scaled by the anchor's reference time / its time here."""
  cfg = rst_config
  table = rst.calibrate(cfg, steps=1, warmup=0, verbose=False)
  for entry in table["entries"].values():  # the reference system was 10x slower than this one
    entry["seconds"] *= 10.0
    entry["device_kind"] = "reference"
  half = next(k for k, e in table["entries"].items() if e["stage"] == "half")
  del table["entries"][half]
  rst.save_table(cfg.budget.rst_table, table)
  entries = rst.calibrate(cfg, steps=1, warmup=0, verbose=False, only_missing=True)["entries"]
  new = entries[half]
  assert entries[new["anchor"]]["stage"] == "full"
  assert {k: e for k, e in entries.items() if k != half} == table["entries"]  # the reference stays
  assert new["seconds"] == pytest.approx(new["measured_seconds"] * new["scaled_by"])
  assert 3.0 < new["scaled_by"] < 30.0   # about 10: the anchor's reference time over its time here
  # Nothing of this config in the table: this device becomes its reference, unscaled.
  cfg.optimizer.name = "lion"
  lion = rst.calibrate(cfg, steps=1, warmup=0, verbose=False, only_missing=True)["entries"]
  assert len(lion) == len(entries) + 3 and not any("scaled_by" in e for k, e in lion.items() if k not in entries)
