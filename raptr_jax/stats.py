"""How sure a comparison is: confidence intervals over seeds and paired differences against a
baseline (the comparison runner's tables and plots, ``compare_report.py``, its precision target,
``compare.py``, and the claims table, ``claims.py``).

* ``mean_interval(values)``: the mean over seeds and its 95% **Student t-interval**,
  ``mean +- t(0.975, n - 1) * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof 1).
  One seed has no interval (shown as "n=1, no interval").
* ``paired(method, baseline)``: the per-seed differences ``method - baseline`` over the seeds
  both ran (a seed gives both runs the same data order and initialization seed, so the seed's
  own luck cancels), their mean and t-interval, and a verdict: **ahead** when the whole interval
  is on the better side of 0 (below 0 for a loss, above for an accuracy), **behind** when it is
  on the worse side, **undecided** when it contains 0 or n < 2. A seed where both runs diverged
  is left out (nothing to compare); where one diverged the difference is infinite: ahead or
  behind only when every pair is infinite the same way (at n >= 2), undecided otherwise.
* ``needs_more_seeds(p, until_ci)``: the precision target's rule (``seeds.until_ci``): more
  seeds while the paired interval contains 0 **and** its half-width is above ``until_ci``.
  A difference known to +- ``until_ci`` that still contains 0 is a tie at that precision;
  ``until_ci=0`` adds seeds until the sign is decided (or ``seeds.max``).

Two-sided 95% intervals: each one-sided reading ("ahead", "not worse") errs at most 2.5% of the
time under the t model (per-seed results independent and roughly normal).
"""
import dataclasses
import math

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
AHEAD, BEHIND, UNDECIDED = "ahead", "behind", "undecided"
HIGHER_IS_BETTER = ("acc", "acc_norm", "f1", "accuracy")  # a column's last word; the rest: lower


def t_quantile(p: float, df: int) -> float:
  """The p-quantile of Student's t distribution with ``df`` degrees of freedom."""
  return float(scipy_stats.t.ppf(p, df))


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean over ``n`` seeds and its confidence interval [low, high] (nan for n < 2 or a
  non-finite value)."""
  mean: float
  low: float
  high: float
  n: int
  std: float

  @property
  def has_interval(self) -> bool:
    return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2 if self.has_interval else math.inf


def mean_interval(values, confidence: float = CONFIDENCE) -> Interval:
  """Mean and Student t-interval of ``values`` (one per seed)."""
  x = np.asarray(list(values), dtype=float)
  n = len(x)
  if n == 0:
    return Interval(math.nan, math.nan, math.nan, 0, math.nan)
  with np.errstate(invalid="ignore"):
    mean = float(x.mean())
  if n < 2 or not np.all(np.isfinite(x)):
    return Interval(mean, math.nan, math.nan, n, math.nan)
  std = float(x.std(ddof=1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
  return Interval(mean, mean - half, mean + half, n, std)


def lower_is_better(column: str) -> bool:
  """Losses and perplexities: lower; accuracies and F1 (``"<task> acc"``): higher."""
  return column.split()[-1] not in HIGHER_IS_BETTER if column.split() else True


@dataclasses.dataclass(frozen=True)
class Paired:
  """``method - baseline`` over ``seeds``: its mean and interval, and the verdict."""
  interval: Interval
  seeds: tuple
  verdict: str


def paired(method: dict, baseline: dict, lower_better: bool = True, confidence: float = CONFIDENCE) -> Paired:
  """The paired difference of ``method`` and ``baseline`` ({seed: value} each) over their
  common seeds (see the module docstring for the verdict)."""
  seeds = tuple(s for s in sorted(set(method) & set(baseline))
                if math.isfinite(method[s]) or math.isfinite(baseline[s]))
  diffs = [method[s] - baseline[s] for s in seeds]
  interval = mean_interval(diffs, confidence)
  better = -1.0 if lower_better else 1.0  # the sign of a difference in the method's favour
  if len(diffs) < 2:
    verdict = UNDECIDED
  elif not all(math.isfinite(d) for d in diffs):
    signs = {math.copysign(1.0, d) for d in diffs if not math.isfinite(d)}
    same = all(not math.isfinite(d) for d in diffs) and len(signs) == 1
    verdict = (AHEAD if signs == {better} else BEHIND) if same else UNDECIDED
  elif interval.low > 0 or interval.high < 0:
    verdict = AHEAD if (interval.high < 0) == (better < 0) else BEHIND
  else:
    verdict = UNDECIDED
  return Paired(interval, seeds, verdict)


def needs_more_seeds(p: Paired, until_ci: float) -> bool:
  """The precision target's rule: undecided and its interval wider than +- ``until_ci``."""
  return p.verdict == UNDECIDED and not p.interval.half_width <= until_ci


def format_number(value: float, signed: bool = False) -> str:
  if math.isnan(value):
    return "-"
  if math.isinf(value):
    return "diverged" if not signed else ("+inf (diverged)" if value > 0 else "-inf (diverged)")
  return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_interval(interval: Interval, signed: bool = False) -> str:
  """"6.2986 [6.2001, 6.3971]", "6.2986 (n=1, no interval)", "diverged" or "-" (no seeds)."""
  if interval.n == 0:
    return "-"
  text = format_number(interval.mean, signed)
  if not math.isfinite(interval.mean):
    return text
  if interval.n < 2:
    return f"{text} (n=1, no interval)"
  return f"{text} [{format_number(interval.low, signed)}, {format_number(interval.high, signed)}]"


def format_paired(p: Paired) -> str:
  """"-0.0995 [-0.1500, -0.0490] ahead" (the difference, its interval, the verdict)."""
  return f"{format_interval(p.interval, signed=True)} {p.verdict}"
