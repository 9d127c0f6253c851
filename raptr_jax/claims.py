"""``docs/claims.md``: each claim of the papers that a run here can test, decided from committed
comparison outputs.

    python -m raptr_jax.claims --out=docs/claims.md                       # the table below
    python -m raptr_jax.claims --claims=my_claims.py --out=claims.md      # a table of your own

A claims table (``raptr_jax/claims_table.py``, or a file whose ``CLAIMS`` is a list of dicts)
declares per claim: ``claim`` (its text), ``paper``, ``comparison`` (a folder the comparison
runner wrote, e.g. ``docs/compare_methods``), ``method`` and ``baseline`` (two of its methods),
``direction``, and optionally ``metric`` ("validation loss" by default; "train loss" or any
per-seed column such as "<set> loss"), ``budget`` (needed when the comparison has several),
``at`` (a budget fraction: 1.0, the final value, by default; 0.25 reads each run's first
evaluation at or after 25% of its budget), ``margin`` (in the metric's units, default 0) and
``note``. A claim no committed comparison tests takes ``untested="why"`` instead.

Decision. ``d = method - baseline`` per seed over the seeds both ran (paired: same data order and
initialization seed), its mean and 95% Student t-interval [lo, hi] (``stats.py``). With the
method's advantage ``a = -d`` for a loss (``+d`` for an accuracy) and its interval, a claim is
a one-sided statement about ``a`` (the table shows it on ``d``: for a loss, ahead is
``d < -margin``):

    ahead:      a > +margin        not worse:  a > -margin
    behind:     a < -margin        not ahead:  a < +margin

It **holds** when the whole interval satisfies it, **does not hold** when the whole interval
violates it, and is **undecided at this scale** otherwise; with one seed there is no interval
("undecided (n=1)"). Outputs written before per-seed results existed (only ``results.csv``
with means) give the difference of the means and "undecided (no per-seed results)" where they
had more than one seed.
"""
import argparse
import csv
import dataclasses
import importlib.util
import math
import os
import sys

from raptr_jax import stats

DIRECTIONS = {"ahead": (">", 1), "not worse": (">", -1), "behind": ("<", -1), "not ahead": ("<", 1)}
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided at this scale"
REQUIRED = ("claim", "paper", "method", "baseline", "direction")
OPTIONAL = ("comparison", "metric", "budget", "at", "margin", "note", "untested")


@dataclasses.dataclass(frozen=True)
class Claim:
  claim: str
  paper: str
  method: str
  baseline: str
  direction: str
  comparison: str = ""
  metric: str = "validation loss"
  budget: float | None = None
  at: float = 1.0
  margin: float = 0.0
  note: str = ""
  untested: str = ""

  @property
  def test(self) -> str:
    """The claim as an inequality on d = method - baseline, e.g. "d < +0.02" (a loss: the
    method's advantage is -d; an accuracy: +d)."""
    op, scale = DIRECTIONS[self.direction]
    threshold = scale * self.margin
    if stats.lower_is_better(self.metric):  # a = -d: a > t is d < -t
      op, threshold = {">": "<", "<": ">"}[op], -threshold
    return f"d {op} {threshold:+g}" if threshold else f"d {op} 0"


def make_claim(number: int, entry: dict) -> Claim:
  where = f"claim {number} ({entry.get('claim', '?')!r})" if isinstance(entry, dict) else f"claim {number}"
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: a claim is a dict with {REQUIRED}, got {entry!r}")
  missing = [k for k in REQUIRED if not entry.get(k)]
  if missing:
    raise ValueError(f"{where} lacks {missing} (a claim names {REQUIRED})")
  unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; a claim takes {REQUIRED + OPTIONAL}")
  if entry["direction"] not in DIRECTIONS:
    raise ValueError(f"{where}: direction must be one of {list(DIRECTIONS)}, got {entry['direction']!r}")
  if not entry.get("comparison") and not entry.get("untested"):
    raise ValueError(f"{where} names no comparison: give comparison='docs/...' or untested='why'")
  if not 0.0 < float(entry.get("at", 1.0)) <= 1.0:
    raise ValueError(f"{where}: at must be a budget fraction in (0, 1], got {entry['at']!r}")
  if float(entry.get("margin", 0.0)) < 0:
    raise ValueError(f"{where}: margin must be >= 0, got {entry['margin']!r}")
  return Claim(**entry)


def _float(text: str) -> float:
  return float(text) if text not in ("", None) else math.nan


def _read_csv(path: str) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A comparison folder's results: per seed when it has ``per_seed.csv``, else means only."""
  directory: str
  unit: str
  methods: tuple
  budgets: tuple
  per_seed: dict | None   # {(budget, method): {seed: {column: value}}}
  means: dict             # {(budget, method): (seeds, {metric: mean})}
  evals: dict | None      # {(budget, method): {seed: [(progress, {column: value})]}}


def _means_metric(column: str) -> str:
  return {"train_mean": "train loss", "val_mean": "validation loss"}.get(column, column[:-len("_mean")])


def load_comparison(directory: str) -> Comparison:
  """The outputs of ``python -m raptr_jax.compare`` in ``directory``."""
  if not os.path.isdir(directory):
    raise ValueError(f"comparison {directory} does not exist (no such folder); run the comparison and commit "
                     "its outputs, or point the claim at an existing one")
  results = os.path.join(directory, "results.csv")
  if not os.path.exists(results):
    raise ValueError(f"comparison {directory} holds no results.csv: not an output of python -m raptr_jax.compare")
  means = {}
  rows = _read_csv(results)
  for r in rows:
    values = {_means_metric(k): _float(v) for k, v in r.items() if k.endswith("_mean")}
    means[(float(r["budget"]), r["method"])] = (int(r["seeds"]), values)
  per_seed = evals = None
  if os.path.exists(os.path.join(directory, "per_seed.csv")):
    per_seed = {}
    for r in _read_csv(os.path.join(directory, "per_seed.csv")):
      values = {k: _float(v) for k, v in r.items() if k not in ("budget", "unit", "method", "setting", "seed")}
      per_seed.setdefault((float(r["budget"]), r["method"]), {})[int(r["seed"])] = values
  if os.path.exists(os.path.join(directory, "per_seed_evals.csv")):
    evals = {}
    for r in _read_csv(os.path.join(directory, "per_seed_evals.csv")):
      values = {k: _float(v) for k, v in r.items() if k not in ("budget", "unit", "method", "setting", "seed",
                                                                 "step", "progress", "progress_units")}
      evals.setdefault((float(r["budget"]), r["method"]), {}).setdefault(int(r["seed"]), []).append(
          (_float(r["progress"]), values))
  return Comparison(directory, rows[0]["unit"] if rows else "", tuple(dict.fromkeys(r["method"] for r in rows)),
                    tuple(sorted({float(r["budget"]) for r in rows})), per_seed, means, evals)


@dataclasses.dataclass(frozen=True)
class Outcome:
  claim: Claim
  budget: float | None
  unit: str
  difference: str   # the measured d with its interval, or why there is none
  seeds: str
  verdict: str


def _values_at(comparison: Comparison, key, metric: str, at: float) -> dict | None:
  """{seed: value} of ``metric`` at budget fraction ``at`` (None where not committed)."""
  if at >= 1.0:
    per_seed = (comparison.per_seed or {}).get(key)
    return None if per_seed is None else {s: v[metric] for s, v in per_seed.items() if metric in v}
  if comparison.evals is None or key not in comparison.evals:
    return None
  out = {}
  for seed, points in comparison.evals[key].items():
    later = [v for progress, v in sorted(points, key=lambda p: p[0]) if progress >= at - 1e-9 and metric in v]
    if later:
      out[seed] = later[0][metric]
  return out


def _decide(claim: Claim, p: stats.Paired) -> str:
  iv = p.interval
  if iv.n < 2:
    return f"undecided (n={iv.n})"
  sign = -1.0 if stats.lower_is_better(claim.metric) else 1.0  # advantage a = sign * d
  if not all(math.isfinite(x) for x in (iv.low, iv.high)):
    return f"{UNDECIDED} (a diverged seed)"
  lo, hi = sorted((sign * iv.low, sign * iv.high))
  op, scale = DIRECTIONS[claim.direction]
  threshold = scale * claim.margin
  if op == ">":
    return HOLDS if lo > threshold else FAILS if hi < threshold else UNDECIDED
  return HOLDS if hi < threshold else FAILS if lo > threshold else UNDECIDED


def evaluate(claim: Claim, root: str = ".", cache: dict | None = None) -> Outcome:
  """The outcome of one claim against its comparison's committed outputs under ``root``."""
  if claim.untested:
    return Outcome(claim, claim.budget, "", "-", "-", f"not tested here: {claim.untested}")
  cache = {} if cache is None else cache
  directory = os.path.join(root, claim.comparison)
  if directory not in cache:
    cache[directory] = load_comparison(directory)
  c = cache[directory]
  for role in ("method", "baseline"):
    name = getattr(claim, role)
    if name not in c.methods:
      raise ValueError(f"claim {claim.claim!r}: its {role} {name!r} is not in {claim.comparison} (its methods: "
                       f"{', '.join(c.methods)})")
  budget = claim.budget
  if budget is None:
    if len(c.budgets) != 1:
      raise ValueError(f"claim {claim.claim!r}: {claim.comparison} has budgets {list(c.budgets)}; give budget=")
    budget = c.budgets[0]
  if float(budget) not in c.budgets:
    raise ValueError(f"claim {claim.claim!r}: {claim.comparison} has no budget {budget:g} (it has "
                     f"{', '.join(f'{b:g}' for b in c.budgets)})")
  budget = float(budget)
  keys = [(budget, claim.method), (budget, claim.baseline)]
  for key in keys:
    if key not in c.means:
      raise ValueError(f"claim {claim.claim!r}: {claim.comparison} has no {key[1]} at budget {budget:g}")
  if claim.metric not in c.means[keys[0]][1]:
    known = sorted(c.means[keys[0]][1])
    raise ValueError(f"claim {claim.claim!r}: {claim.comparison} has no metric {claim.metric!r} (it has {known})")
  method, base = (_values_at(c, k, claim.metric, claim.at) for k in keys)
  if method is None or base is None:
    return _without_seeds(claim, c, budget, keys)
  p = stats.paired(method, base, stats.lower_is_better(claim.metric))
  seeds = f"{p.interval.n} ({' '.join(map(str, p.seeds))})" if p.seeds else "0"
  return Outcome(claim, budget, c.unit, stats.format_interval(p.interval, signed=True), seeds, _decide(claim, p))


def _without_seeds(claim: Claim, c: Comparison, budget: float, keys) -> Outcome:
  """An output with means only (or no evaluations at ``at``): the difference of the means."""
  if claim.at < 1.0:
    why = f"no per-seed evaluations at {claim.at:.0%} of the budget committed (per_seed_evals.csv)"
    return Outcome(claim, budget, c.unit, "-", "-", f"undecided ({why})")
  (n_m, m), (n_b, b) = c.means[keys[0]], c.means[keys[1]]
  d = m[claim.metric] - b[claim.metric]
  if n_m == 1 and n_b == 1:
    return Outcome(claim, budget, c.unit, f"{d:+.4f} (n=1, no interval)", "1", "undecided (n=1)")
  return Outcome(claim, budget, c.unit, f"{d:+.4f} (difference of means; no paired interval)", f"{n_m} vs {n_b}",
                 "undecided (no per-seed results)")


def load_claims(path: str = "") -> list[Claim]:
  """The claims of ``path`` (a Python file defining ``CLAIMS``), or of ``claims_table.py``."""
  if not path:
    from raptr_jax.claims_table import CLAIMS  # pylint: disable=g-import-not-at-top
    entries = CLAIMS
  else:
    if not os.path.exists(path):
      raise ValueError(f"claims table {path!r} not found")
    spec = importlib.util.spec_from_file_location("claims_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "CLAIMS"):
      raise ValueError(f"{path} defines no CLAIMS (a list of claim dicts)")
    entries = module.CLAIMS
  return [make_claim(i + 1, e) for i, e in enumerate(entries)]


HEADER = """# The papers' claims, tested here

Generated by `{command}` from the committed comparison outputs and the claims table
(`{table}`); do not edit by hand. Each row: the claim, the comparison that tests it,
the measured paired difference d = method - baseline of the metric (mean over the seeds both
ran, with its 95% Student t-interval; a seed gives both runs the same data order and
initialization seed), and the verdict.

How a claim is decided: it is the inequality on d in the "test" column (for a loss, lower is
better: ahead is d < -margin, not worse d < +margin, not ahead d > -margin, behind d > +margin;
for an accuracy the signs flip; margins in the metric's units). It **holds** when the whole 95%
interval of d satisfies it, **does not hold** when the whole interval violates it, and is
**undecided at this scale** otherwise. One seed has no interval: "undecided (n=1)".
Outputs committed before the runner wrote per-seed results (`per_seed.csv`) have means only:
their rows give the difference of the means and stay undecided.

"""


def _budget_text(o: Outcome) -> str:
  if o.budget is None:
    return "-"
  at = "final" if o.claim.at >= 1.0 else f"at {o.claim.at:.0%} of"
  return f"{o.claim.metric}, {at} {o.budget:g} {o.unit}".strip()


def render(outcomes: list[Outcome], command: str, table: str) -> str:
  lines = [HEADER.format(command=command, table=table).rstrip("\n"), "",
           "| # | claim | paper | comparison | method vs baseline | metric | test | d (95% CI) | seeds | verdict |",
           "|---" * 10 + "|"]
  for i, o in enumerate(outcomes, 1):
    c = o.claim
    comparison = f"`{c.comparison}`" if c.comparison else "-"
    lines.append(f"| {i} | {c.claim} | {c.paper} | {comparison} | {c.method} vs {c.baseline} | {_budget_text(o)} | "
                 f"{c.test} | {o.difference} | {o.seeds} | {o.verdict} |")
  notes = [f"{i}. {o.claim.note}" for i, o in enumerate(outcomes, 1) if o.claim.note]
  if notes:
    lines += ["", "Notes:", ""] + notes
  return "\n".join(lines) + "\n"


def generate(claims: list[Claim], root: str = ".", command: str = "python -m raptr_jax.claims",
             table: str = "raptr_jax/claims_table.py") -> str:
  """The markdown of every claim's outcome (a bad claim stops with a clear message first)."""
  cache = {}
  return render([evaluate(c, root, cache) for c in claims], command, table)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.claims", description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/claims.md", help="where to write the markdown")
  parser.add_argument("--claims", default="", help="a claims table file (CLAIMS = [...]); default: the built-in one")
  parser.add_argument("--root", default=".", help="the folder the claims' comparison paths are relative to")
  args = parser.parse_args(argv)
  command = "python -m raptr_jax.claims" + (f" --claims={args.claims}" if args.claims else "") + f" --out={args.out}"
  try:
    text = generate(load_claims(args.claims), args.root, command, args.claims or "raptr_jax/claims_table.py")
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
