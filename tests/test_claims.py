"""The claims table generator (raptr_jax/claims.py) on small synthetic comparison folders: the
paired differences against an independent computation, each verdict, older outputs with means
only, and the messages for a claims table that points at nothing."""
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from raptr_jax import claims, compare, compare_report
from conftest import ROOT

SEEDS = (0, 1, 2, 3)
BASE = {0: 5.00, 1: 5.30, 2: 4.90, 3: 5.10}
SHIFT = {"baseline": [0.0] * 4,
         "fast": [-0.30, -0.32, -0.29, -0.31],   # lower loss on every seed: ahead
         "same": [0.004, -0.005, 0.003, -0.002],  # within +-0.02: not worse, not ahead
         "slow": [0.20, 0.25, 0.22, 0.21],       # behind
         "noisy": [0.3, -0.3, 0.25, -0.28]}      # undecided


def _val(method, seed):
  return BASE[seed] + SHIFT[method][seed]


def _comparison_dir(tmp_path, name="cmp"):
  """A folder as the comparison runner writes it: results / per_seed tables and evaluations
  (at 25%: the same differences, halved)."""
  where = tmp_path / name
  where.mkdir()
  results = {(60.0, m): {s: (_val(m, s) + 0.1, _val(m, s), {"held loss": _val(m, s) + 1.0}) for s in SEEDS}
             for m in SHIFT}
  compare.write_tables(results, str(where), "rst_seconds", baseline="baseline")
  curves = {60.0: {m: {s: [{"step": 3, "progress": 0.26, "progress_units": 15.6, "eval/loss": 7.0 + SHIFT[m][s] / 2},
                           {"step": 12, "progress": 1.0, "progress_units": 60.0, "eval/loss": _val(m, s)}]
                       for s in SEEDS} for m in SHIFT}}
  compare_report.write_eval_points(curves, str(where), "rst_seconds")
  return where


def _claim(**kwargs):
  return claims.make_claim(1, dict(claim="x", paper="p", comparison="cmp", baseline="baseline") | kwargs)


def test_verdicts_and_differences_match_an_independent_paired_t_interval(tmp_path):
  _comparison_dir(tmp_path)
  root = str(tmp_path)
  cases = [("fast", "ahead", 0.0, "holds"), ("slow", "ahead", 0.0, "does not hold"),
           ("noisy", "ahead", 0.0, "undecided at this scale"), ("same", "not worse", 0.02, "holds"),
           ("same", "not ahead", 0.02, "holds"), ("fast", "not ahead", 0.02, "does not hold"),
           ("slow", "not worse", 0.02, "does not hold"), ("slow", "behind", 0.0, "holds"),
           ("same", "ahead", 0.0, "undecided at this scale")]
  for method, direction, margin, verdict in cases:
    outcome = claims.evaluate(_claim(method=method, direction=direction, margin=margin), root)
    assert outcome.verdict == verdict, (method, direction)
  d = np.array(SHIFT["fast"])
  ci = scipy_stats.ttest_rel([_val("fast", s) for s in SEEDS], [BASE[s] for s in SEEDS]).confidence_interval(0.95)
  outcome = claims.evaluate(_claim(method="fast", direction="ahead"), root)
  assert outcome.difference == f"{d.mean():+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]" and outcome.seeds == "4 (0 1 2 3)"
  # Another metric, and a point early in the budget (the first evaluation at or after 25%).
  assert claims.evaluate(_claim(method="slow", direction="behind", metric="held loss"), root).verdict == "holds"
  early = claims.evaluate(_claim(method="fast", direction="ahead", at=0.25), root)
  assert early.verdict == "holds" and early.difference.startswith(f"{d.mean() / 2:+.4f}")
  assert _claim(method="fast", direction="not worse", margin=0.02).test == "d < +0.02"
  assert _claim(method="fast", direction="not ahead", margin=0.02).test == "d > -0.02"
  assert _claim(method="fast", direction="ahead").test == "d < 0"


def test_outputs_with_means_only_stay_undecided(tmp_path):
  where = _comparison_dir(tmp_path)
  os.remove(where / "per_seed.csv")
  os.remove(where / "per_seed_evals.csv")
  outcome = claims.evaluate(_claim(method="fast", direction="ahead"), str(tmp_path))
  assert outcome.verdict == "undecided (no per-seed results)" and "difference of means" in outcome.difference
  one = tmp_path / "one"
  one.mkdir()
  compare.write_tables({(60.0, "baseline"): {0: (6.2, 6.3, {})}, (60.0, "fast"): {0: (6.0, 6.1, {})}}, str(one),
                       "rst_seconds")
  os.remove(one / "per_seed.csv")
  outcome = claims.evaluate(_claim(comparison="one", method="fast", direction="ahead"), str(tmp_path))
  assert outcome.verdict == "undecided (n=1)" and outcome.difference == "-0.2000 (n=1, no interval)"
  early = claims.evaluate(_claim(comparison="one", method="fast", direction="ahead", at=0.25), str(tmp_path))
  assert early.verdict.startswith("undecided (no per-seed evaluations at 25%")


def test_the_command_writes_the_table(tmp_path, capsys):
  _comparison_dir(tmp_path)
  table = tmp_path / "my_claims.py"
  table.write_text("CLAIMS = [dict(claim='fast is ahead', paper='P', comparison='cmp', method='fast', "
                   "baseline='baseline', direction='ahead', note='a note'),\n"
                   "          dict(claim='not run', paper='P', method='a', baseline='b', direction='ahead', "
                   "untested='needs a GPU')]\n")
  out = tmp_path / "docs" / "claims.md"
  claims.main([f"--claims={table}", f"--out={out}", f"--root={tmp_path}"])
  text = out.read_text()
  assert "| 1 | fast is ahead | P | `cmp` | fast vs baseline | validation loss, final 60 rst_seconds | d < 0 |" in text
  assert "| 4 (0 1 2 3) | holds |" in text
  assert "not tested here: needs a GPU" in text and "1. a note" in text


def test_the_built_in_claims_read_the_committed_outputs():
  text = claims.generate(claims.load_claims(), ROOT)
  assert text.count("\n| ") == len(claims.load_claims()) + 1  # header + one row per claim
  assert "raptr vs baseline" in text and "undecided (n=1)" in text


@pytest.mark.parametrize("entry, match", [
    (dict(comparison="nowhere", method="fast"), r"comparison .*nowhere does not exist"),
    (dict(method="adamw"), r"its method 'adamw' is not in cmp \(its methods: baseline, fast, same, slow, noisy\)"),
    (dict(method="fast", baseline="sgd"), r"its baseline 'sgd' is not in cmp"),
    (dict(method="fast", budget=120), r"cmp has no budget 120 \(it has 60\)"),
    (dict(method="fast", metric="perplexity"), r"cmp has no metric 'perplexity'"),
])
def test_a_claim_pointing_at_nothing_is_a_clear_error(tmp_path, entry, match):
  _comparison_dir(tmp_path)
  with pytest.raises(ValueError, match=match):
    claims.evaluate(_claim(direction="ahead", **entry), str(tmp_path))


def test_bad_claims_tables_are_clear_errors(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"direction must be one of \['ahead', 'not worse', 'behind', 'not ahead'\]"):
    _claim(method="fast", direction="better")
  with pytest.raises(ValueError, match=r"claim 1 \('x'\) lacks \['method'\]"):
    _claim(direction="ahead")
  with pytest.raises(ValueError, match="names no comparison"):
    claims.make_claim(1, dict(claim="x", paper="p", method="a", baseline="b", direction="ahead"))
  with pytest.raises(ValueError, match=r"unknown keys \['metrc'\]"):
    _claim(method="fast", direction="ahead", metrc="x")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no results.csv"):
    claims.evaluate(_claim(comparison="empty", method="a", direction="ahead"), str(tmp_path))
  table = tmp_path / "t.py"
  table.write_text("CLAIMS = [dict(claim='c', paper='p', comparison='missing', method='a', baseline='b', "
                   "direction='ahead')]\n")
  with pytest.raises(SystemExit, match="error: comparison .*missing does not exist"):
    claims.main([f"--claims={table}", f"--out={tmp_path / 'x.md'}", f"--root={tmp_path}"])
  assert not os.path.exists(tmp_path / "x.md")
