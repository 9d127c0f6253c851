"""The comparison runner's statistics: t-intervals over seeds, paired differences against the
baseline, the bands of the plots, the precision target's seed rounds and fresh seeds for tuned
methods. No training: results are synthetic, runs are written by a stand-in launcher."""
import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from raptr_jax import compare, compare_report, stats

# Two-sided 95% Student t critical values t(0.975, df), from a printed table.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045}


def test_t_quantiles_match_the_printed_table():
  for df, value in T_TABLE.items():
    assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_mean_interval_by_hand_and_one_seed_has_none():
  iv = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  s = math.sqrt(sum((x - 3.0) ** 2 for x in (1, 2, 3, 4, 5)) / 4)  # 1.5811
  assert iv.mean == 3.0 and iv.std == pytest.approx(s) and iv.n == 5
  assert (iv.low, iv.high) == pytest.approx((3.0 - 2.776 * s / math.sqrt(5), 3.0 + 2.776 * s / math.sqrt(5)), abs=1e-3)
  one = stats.mean_interval([6.2986])
  assert one.n == 1 and math.isnan(one.low) and not one.has_interval
  assert stats.format_interval(one) == "6.2986 (n=1, no interval)"
  assert stats.format_interval(stats.mean_interval([1.0, 3.0])) == "2.0000 [-10.7062, 14.7062]"  # 2 +- 12.706
  assert stats.format_interval(stats.mean_interval([1.0, math.inf])) == "diverged"


def test_the_interval_covers_the_true_mean_95_percent_of_the_time_at_three_seeds():
  """A z-interval (1.96) or a population std would cover far less at n=3 (~80%)."""
  rng = np.random.default_rng(0)
  draws = rng.normal(5.0, 0.3, size=(4000, 3))
  covered = [(iv.low <= 5.0 <= iv.high) for iv in map(stats.mean_interval, draws)]
  assert 0.94 <= np.mean(covered) <= 0.96


def test_paired_differences_by_hand_verdicts_and_diverged_seeds():
  method, base = {0: 5.0, 1: 5.2, 2: 4.9}, {0: 5.1, 1: 5.4, 2: 5.0, 3: 9.0}  # seed 3: baseline only
  p = stats.paired(method, base)
  diffs = [-0.1, -0.2, -0.1]
  m, s = np.mean(diffs), np.std(diffs, ddof=1)
  assert p.seeds == (0, 1, 2) and p.interval.mean == pytest.approx(m)
  assert p.interval.high == pytest.approx(m + 4.303 * s / math.sqrt(3), abs=1e-3)  # +0.0101: contains 0
  assert p.verdict == "undecided"
  assert stats.paired({0: 5.0, 1: 5.1, 2: 5.0}, {0: 5.3, 1: 5.35, 2: 5.32}).verdict == "ahead"
  assert stats.paired({0: 5.3, 1: 5.35, 2: 5.32}, {0: 5.0, 1: 5.1, 2: 5.0}).verdict == "behind"
  assert stats.paired({0: 0.6, 1: 0.62}, {0: 0.5, 1: 0.51}, lower_better=False).verdict == "ahead"  # accuracy
  assert stats.paired({0: 5.0}, {0: 6.0}).verdict == "undecided"  # one seed
  assert stats.format_paired(stats.paired({0: 5.0}, {0: 6.0})) == "-1.0000 (n=1, no interval) undecided"
  inf = math.inf
  assert stats.paired({0: inf, 1: inf}, {0: 5.0, 1: 5.1}).verdict == "behind"  # diverged on every seed
  assert stats.paired({0: inf, 1: 5.0}, {0: 5.0, 1: 5.1}).verdict == "undecided"
  both = stats.paired({0: inf, 1: 5.0, 2: 5.1}, {0: inf, 1: 5.2, 2: 5.3})
  assert both.seeds == (1, 2)  # both diverged at seed 0: nothing to compare there


def test_needs_more_seeds_is_undecided_and_wider_than_the_target():
  tie = stats.paired({0: 5.0, 1: 5.001}, {0: 5.001, 1: 5.0})  # half-width 12.706 * 0.001414 / 1.414
  assert tie.verdict == "undecided" and tie.interval.half_width == pytest.approx(0.0127, abs=1e-4)
  assert not stats.needs_more_seeds(tie, 0.02) and stats.needs_more_seeds(tie, 0.01)
  assert not stats.needs_more_seeds(stats.paired({0: 5.0, 1: 5.1}, {0: 5.5, 1: 5.6}), 0.0)  # ahead
  assert stats.needs_more_seeds(stats.paired({0: 5.0}, {0: 5.5}), 1.0)  # n=1: no interval yet


def test_results_tables_match_an_independent_computation_on_synthetic_seeds(tmp_path):
  """Known means and variances: each seed shares a draw between methods (the data order and
  init), so the paired interval is much narrower than the two marginal ones."""
  rng = np.random.default_rng(1)
  seeds = list(range(6))
  shared = rng.normal(0.0, 0.2, size=len(seeds))
  true = {"baseline": 6.0, "good": 5.9, "same": 6.0}
  vals = {m: {s: mu + shared[i] + rng.normal(0.0, 0.02) for i, s in enumerate(seeds)} for m, mu in true.items()}
  held = {m: {s: v + 0.5 + rng.normal(0.0, 0.01) for s, v in per.items()} for m, per in vals.items()}
  results = {(100.0, m): {s: (v + 0.1, v, {"held_out loss": held[m][s]}) for s, v in per.items()}
             for m, per in vals.items()}
  text = compare.write_tables(results, str(tmp_path), "steps", baseline="baseline")
  rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
  for m in true:
    x = np.array([vals[m][s] for s in seeds])
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert float(rows[m]["val_mean"]) == pytest.approx(x.mean())
    assert (float(rows[m]["val_low"]), float(rows[m]["val_high"])) == pytest.approx((low, high))
  for m in ("good", "same"):
    for column, data in (("val", vals), ("held_out loss", held)):
      a, b = np.array([data[m][s] for s in seeds]), np.array([data["baseline"][s] for s in seeds])
      ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
      r = rows[m]
      assert float(r[f"{column}_diff"]) == pytest.approx((a - b).mean())
      assert (float(r[f"{column}_diff_low"]), float(r[f"{column}_diff_high"])) == pytest.approx((ci.low, ci.high))
      assert r[f"{column}_pairs"] == "6"
      expected = "ahead" if ci.high < 0 else "behind" if ci.low > 0 else "undecided"
      assert r[f"{column}_vs_baseline"] == expected
  assert rows["good"]["val_vs_baseline"] == "ahead" and rows["same"]["val_vs_baseline"] == "undecided"
  assert float(rows["good"]["val_low"]) < float(rows["baseline"]["val_high"])  # marginal intervals overlap
  assert "95% confidence interval, Student t" in text
  assert "| final held_out loss | held_out loss vs baseline (paired) |" in text
  good = [l for l in text.splitlines() if l.startswith("| 100 | good |")][0]
  assert good.endswith(" ahead |") and "| (baseline) |" in [l for l in text.splitlines() if "| baseline |" in l][0]
  per_seed = list(csv.DictReader(open(tmp_path / "per_seed.csv")))
  assert len(per_seed) == 18 and float(per_seed[0]["validation loss"]) == pytest.approx(vals["baseline"][0])


def test_one_seed_reads_no_interval_and_undecided(tmp_path):
  results = {(60.0, "baseline"): {0: (6.2, 6.3, {})}, (60.0, "raptr"): {0: (6.1, 6.2, {})}}
  text = compare.write_tables(results, str(tmp_path), "rst_seconds")
  assert ("| 60 | raptr | 1 | 6.1000 (n=1, no interval) | 6.2000 (n=1, no interval) | "
          "-0.1000 (n=1, no interval) undecided |") in text


def test_bands_interpolate_each_seed_onto_one_grid_before_averaging():
  # Two seeds logged at different points of the clock: a, b linear, so interpolation is exact.
  a = [{"progress_units": x, "train/loss": 10.0 - x} for x in (0.0, 2.0, 4.0, 6.0)]
  b = [{"progress_units": x, "train/loss": 12.0 - 2 * x} for x in (1.0, 3.0, 5.0)]
  grid, mean, low, high = compare_report.mean_band({0: a, 1: b}, "progress_units", "train/loss")
  assert list(grid) == [1.0, 2.0, 3.0, 4.0, 5.0]  # the union of x where both seeds have data
  ya, yb = 10.0 - grid, 12.0 - 2 * grid
  assert mean == pytest.approx((ya + yb) / 2)
  half = 12.706 * np.abs(ya - yb) / math.sqrt(2) / math.sqrt(2)  # s = |a - b| / sqrt(2)
  assert high - mean == pytest.approx(half, abs=1e-3) and mean - low == pytest.approx(half, abs=1e-3)
  _, one, low1, _ = compare_report.mean_band([a], "progress_units", "train/loss")
  assert one == pytest.approx([10.0, 8.0, 6.0, 4.0]) and np.isnan(low1).all()


# --- the runner with a stand-in launcher ------------------------------------------------------

def _write_run(where: str, train: float, val: float) -> None:
  os.makedirs(os.path.join(where, "checkpoints"), exist_ok=True)
  rows = [{"step": 0, "progress": 0.0, "progress_units": 0.0, "eval/loss": val + 1.0},
          {"step": 1, "progress": 0.5, "progress_units": 1.0, "train/loss": train + 0.5, "eval/loss": val + 0.5},
          {"step": 2, "progress": 1.0, "progress_units": 2.0, "train/loss": train, "eval/loss": val}]
  with open(os.path.join(where, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _launcher(monkeypatch, val_of):
  """compare.train_one replaced: writes a finished run whose final validation loss is
  ``val_of(method, setting name, seed)``; returns the list of the runs it made."""
  made = []

  def train_one(comparison, spec, workdir, quiet=True):
    made.append((spec.setting.method, spec.setting.name, spec.seed))
    val = val_of(spec.setting.method, spec.setting.name, spec.seed)
    _write_run(os.path.join(workdir, spec.key), val + 0.1, val)

  monkeypatch.setattr(compare, "train_one", train_one)
  return made


def _comparison(methods, **extra):
  return dict(config="configs/ul2.py:tiny", common=["budget.unit=steps", "log.tensorboard=False"],
              methods=methods, budgets=[2.0]) | extra


BASE = {0: 5.0, 1: 5.3, 2: 4.8, 3: 5.1, 4: 5.2, 5: 4.9}
DIFFS = {"clear": [-0.499, -0.501],             # ahead at 2 seeds
         "tie": [0.001, -0.001],                # within +-0.02 at 2 seeds: a tie, no more seeds
         "late": [-0.15, -0.25, -0.2],          # undecided at 2, ahead at 3
         "noisy": [0.3, -0.3, 0.3, -0.3, 0.3]}  # never decided: stops at max=4


def test_the_precision_target_adds_seeds_until_decided_or_at_max(tmp_path, monkeypatch, capsys):
  made = _launcher(monkeypatch, lambda m, _, s: BASE[s] + (DIFFS[m][s] if m != "baseline" else 0.0))
  methods = {"baseline": [], **{m: ["optimizer.name=lion"] for m in DIFFS}}
  workdir = str(tmp_path / "w")
  path = tmp_path / "cmp.py"
  path.write_text(f"def get_comparison():\n  return {_comparison(methods, seeds=[0, 1])!r}\n")
  flags = {"seeds.until_ci": 0.02, "seeds.max": 4}  # the command line's --seeds.until_ci=0.02 --seeds.max=4
  comparison = compare.load_comparison(str(path), flags)
  report = compare.compare(comparison, workdir)
  seeds = lambda m: sorted(s for x, _, s in made if x == m)
  assert seeds("baseline") == [0, 1, 2, 3] and seeds("clear") == [0, 1] and seeds("tie") == [0, 1]
  assert seeds("late") == [0, 1, 2] and seeds("noisy") == [0, 1, 2, 3]
  assert {m: p.verdict for (_, m), p in report.paired.items()} == {
      "clear": "ahead", "tie": "undecided", "late": "ahead", "noisy": "undecided"}
  late = report.paired[(2.0, "late")].interval
  d = np.array(DIFFS["late"])
  assert late.high == pytest.approx(d.mean() + 4.303 * d.std(ddof=1) / math.sqrt(3), abs=1e-3)
  assert report.undecided == ["noisy at 2 (n=4)"]
  table = open(os.path.join(workdir, "results.md")).read()
  assert "Decided: clear at 2 (ahead, n=2), late at 2 (ahead, n=3)." in table
  assert "Tied within +-0.02 (undecided sign, difference known to that precision): tie at 2 (+-0.0127, n=2)." in table
  assert "Undecided at seeds.max: noisy at 2 (n=4)." in table
  rows = {r["method"]: r for r in csv.DictReader(open(os.path.join(workdir, "results.csv")))}
  assert rows["noisy"]["seed_list"] == "0 1 2 3" and rows["baseline"]["seeds"] == "4"
  evals = list(csv.DictReader(open(os.path.join(workdir, "per_seed_evals.csv"))))
  assert len(evals) == 3 * (4 + 2 + 2 + 3 + 4)  # 3 evaluations per reported run
  assert os.path.getsize(os.path.join(workdir, "loss_vs_steps_2.png")) > 10_000
  n_made = len(made)
  compare.compare(comparison, workdir)  # everything decided or at max: nothing more to run
  assert len(made) == n_made
  # A worker pool prepares each round in a process of its own, which derives the same round.
  assert compare.seed_round(comparison, compare.sweep.select_best(
      compare.collect(compare.tuning_runs(comparison), workdir), comparison.settings), workdir) == []
  compare.main([f"--config={path}", f"--workdir={workdir}", "--seeds.until_ci=0.02", "--seeds.max=4",
                "--prepare=seeds"])
  assert compare._worker_command(comparison, workdir, compare.tuning_runs(comparison)[0])[-3:-1] == [
      "--seeds.until_ci=0.02", "--seeds.max=4"]
  keys = compare.every_run(comparison)  # a worker can run any added seed
  assert "budget_2/noisy/seed_5" in keys and "budget_2/noisy/seed_6" not in keys


def test_a_tuned_method_is_reported_on_fresh_seeds_with_the_settings_it_tried(tmp_path, monkeypatch):
  vals = {("lion", "peak=0.001", 0): 4.0, ("lion", "peak=0.003", 0): 4.5,  # the tuning seed: 4.0 wins
          ("lion", "peak=0.001", 1): 4.8, ("lion", "peak=0.001", 2): 4.9}
  made = _launcher(monkeypatch, lambda m, name, s: vals.get((m, name, s), 5.0 + s / 10))
  methods = {"baseline": [], "lion": {"overrides": ["optimizer.name=lion"], "grid": {"schedule.peak": [1e-3, 3e-3]}}}
  workdir = str(tmp_path / "w")
  report = compare.compare(_comparison(methods, seeds=[0], selection=dict(final_seeds=[1, 2])), workdir)
  assert sorted(made) == [("baseline", "", 0), ("baseline", "", 1), ("baseline", "", 2), ("lion", "peak=0.001", 0),
                          ("lion", "peak=0.001", 1), ("lion", "peak=0.001", 2), ("lion", "peak=0.003", 0)]
  assert sorted(report.chosen[(2.0, "lion")]) == [1, 2]  # not the tuning seed 0
  rows = {r["method"]: r for r in csv.DictReader(open(os.path.join(workdir, "results.csv")))}
  assert float(rows["lion"]["val_mean"]) == pytest.approx(4.85) and rows["lion"]["settings_tried"] == "2"
  assert rows["baseline"]["seed_list"] == "0 1 2" and rows["lion"]["val_pairs"] == "2"
  assert float(rows["lion"]["val_diff"]) == pytest.approx(np.mean([4.8 - 5.1, 4.9 - 5.2]))
  assert "| 2 | lion | peak=0.001 | 2 | 2 |" in report.table and "Settings tried" in report.table
  # Without fresh seeds the table can only show the tuning seed, and says that it favours the method.
  biased = compare.compare(_comparison(methods, seeds=[0]), str(tmp_path / "b"))
  assert "lion: reported on their tuning seeds" in biased.table


@pytest.mark.parametrize("seeds, selection, match", [
    ([0, 1, 1], {}, r"seed 1 is given twice in seeds \(\[0, 1, 1\]\): one run would count twice"),
    ([0, 1], {"final_seeds": [1, 2]}, r"seed 1 is given twice: in seeds \[0, 1\] and in selection.final_seeds"),
    (dict(initial=[0, 1], until_ci=0.02), {}, r"seeds.until_ci=0.02 has no seeds.max"),
    (dict(initial=[0, 1], max=5), {}, r"seeds.max=5 without seeds.until_ci"),
    (dict(initial=[0, 1, 2], until_ci=0.02, max=2), {}, r"seeds.max=2 is below the 3 initial seeds"),
    (dict(initial=[0], until_ci=-1.0, max=4), {}, r"seeds.until_ci must be a number >= 0"),
    (dict(first=[0]), {}, r"seeds takes \('initial', 'until_ci', 'max'\)"),
])
def test_bad_seeds_are_clear_errors(seeds, selection, match):
  with pytest.raises(ValueError, match=match):
    compare.load_comparison(_comparison({"baseline": []}, seeds=seeds, selection=selection))


def test_bad_seed_options_on_the_command_line(tmp_path, capsys):
  path = tmp_path / "cmp.py"
  path.write_text(f"def get_comparison():\n  return {_comparison({'baseline': [], 'lion': []}, seeds=[0, 1])!r}\n")
  with pytest.raises(SystemExit):
    compare.main([f"--config={path}", "--seeds.max=4", "--seeds.max=6"])
  assert "--seeds.max is given twice" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="seeds.until_ci=0.02 has no seeds.max"):
    compare.main([f"--config={path}", "--seeds.until_ci=0.02", f"--workdir={tmp_path / 'w'}"])
  with pytest.raises(SystemExit, match="baseline 'adamw' is not one of the methods"):
    compare.main([f"--config={path}", "--baseline=adamw", f"--workdir={tmp_path / 'w'}"])
  loaded = compare.load_comparison(str(path), {"seeds": [3, 4], "seeds.until_ci": 0.0, "seeds.max": 5})
  assert loaded.seeds == [3, 4] and loaded.until_ci == 0.0 and compare_extra(loaded) == [5, 6, 7, 8, 9]
  assert "--seeds.until_ci=0.0" in compare._worker_command(loaded, "w", compare.tuning_runs(loaded)[0])


def compare_extra(comparison):
  from raptr_jax import compare_seeds
  return compare_seeds.extra_seeds(comparison)
