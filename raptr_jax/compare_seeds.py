"""Which seeds a comparison runs and reports (``compare.py`` runs them, ``stats.py`` decides).

* ``seeds``: a list, or ``dict(initial=[...], until_ci=0.02, max=8)`` (a precision target;
  ``parse_seeds``). A seed given twice would count one run twice in an interval: refused.
* Reported seeds (``base_seeds``): an untuned method is reported on every seed it ran (the
  tuning seeds and ``selection.final_seeds``); a tuned method on fresh seeds only (the final
  seeds and those the target adds), never on the tuning seeds its setting was chosen on (the
  winner of several settings on the same seeds is favoured there). Without final seeds or a
  target a tuned method can only be reported on its tuning seeds; the table says so.
* The precision target (``next_round``): while a method's paired 95% interval of the final
  validation loss against the baseline contains 0 and is wider than +- ``until_ci``, and it has
  fewer than ``max`` paired seeds, it gets the next seed (two at once while it has fewer than
  two: one seed has no interval), and so does the baseline where it lacks it. Added seeds are
  the integers after the largest one the config names, in order, so every process (a worker,
  a re-run) derives the same ones.
"""
from raptr_jax import stats

SEED_KEYS = ("initial", "until_ci", "max")
CLI_KEYS = ("seeds", "seeds.until_ci", "seeds.max", "baseline")


def _seed_list(values, what: str) -> list[int]:
  if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
    raise ValueError(f"{what} must be a list of integer seeds, got {values!r}")
  seeds = list(values)
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"{what} must be integers, got {seeds!r}")
  twice = sorted({s for s in seeds if seeds.count(s) > 1})
  if twice:
    raise ValueError(f"seed {twice[0]} is given twice in {what} ({seeds}): one run would count twice in "
                     "every interval; list each seed once")
  return seeds


def apply_cli(comparison: dict, overrides: dict) -> dict:
  """The comparison with the command line's ``--seeds``, ``--seeds.until_ci``, ``--seeds.max``
  and ``--baseline`` (``overrides``: {key: value}) in place of the config's."""
  comparison = dict(comparison)
  if "baseline" in overrides:
    comparison["baseline"] = overrides["baseline"]
  seed_keys = {k.partition(".")[2] or "initial": v for k, v in overrides.items() if k.startswith("seeds")}
  if seed_keys:
    seeds = comparison.get("seeds", [])
    comparison["seeds"] = (dict(seeds) if isinstance(seeds, dict) else {"initial": seeds}) | seed_keys
  return comparison


def parse_seeds(comparison: dict, where: str) -> None:
  """Sets ``seeds`` (the initial list), ``until_ci``, ``max_seeds`` and ``final_seeds`` of a
  comparison dict from its ``seeds`` and ``selection``, with clear messages for bad input."""
  seeds = comparison["seeds"]
  until_ci = max_seeds = None
  if isinstance(seeds, dict):
    unknown = set(seeds) - set(SEED_KEYS)
    if unknown:
      raise ValueError(f"{where}: seeds takes {SEED_KEYS} (e.g. dict(initial=[0, 1, 2], until_ci=0.02, max=8)), "
                       f"got {sorted(unknown)}")
    if "initial" not in seeds:
      raise ValueError(f"{where}: seeds lacks 'initial' (the seeds every method starts with, e.g. [0, 1, 2])")
    until_ci, max_seeds = seeds.get("until_ci"), seeds.get("max")
    seeds = seeds["initial"]
  seeds = _seed_list(seeds, "seeds")
  final = _seed_list(comparison["selection"].get("final_seeds", ()), "selection.final_seeds")
  both = sorted(set(seeds) & set(final))
  if both:
    raise ValueError(f"seed {both[0]} is given twice: in seeds {seeds} and in selection.final_seeds {final}; the "
                     "chosen settings' re-runs must use fresh seeds (not the tuning ones)")
  if until_ci is not None and max_seeds is None:
    raise ValueError(f"seeds.until_ci={until_ci} has no seeds.max: give the most seeds a method may get (e.g. "
                     "max=8); without one a method as good as the baseline would add seeds forever")
  if max_seeds is not None and until_ci is None:
    raise ValueError(f"seeds.max={max_seeds} without seeds.until_ci: max bounds a precision target; give "
                     "until_ci too (0: add seeds until the sign against the baseline is decided)")
  if until_ci is not None:
    if isinstance(until_ci, bool) or not isinstance(until_ci, (int, float)) or until_ci < 0:
      raise ValueError(f"seeds.until_ci must be a number >= 0 (the paired interval's half-width target), "
                       f"got {until_ci!r}")
    if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < 2:
      raise ValueError(f"seeds.max must be an integer >= 2 (one seed has no interval), got {max_seeds!r}")
    if max_seeds < len(seeds):
      raise ValueError(f"seeds.max={max_seeds} is below the {len(seeds)} initial seeds {seeds}")
  comparison.update(seeds=seeds, final_seeds=final, until_ci=until_ci, max_seeds=max_seeds)


def settings_tried(comparison) -> dict:
  """{method: how many settings its tuning ran}."""
  out = {}
  for s in comparison.settings:
    out[s.method] = out.get(s.method, 0) + 1
  return out


def is_tuned(comparison, method: str) -> bool:
  return settings_tried(comparison).get(method, 0) > 1


def extra_seeds(comparison) -> list[int]:
  """The seeds a precision target may add, in the order it adds them."""
  if comparison.until_ci is None:
    return []
  start = max([*comparison.seeds, *comparison.final_seeds]) + 1
  return list(range(start, start + comparison.max_seeds))


def fresh_only(comparison, method: str) -> bool:
  """A tuned method with fresh seeds to report on (final seeds, or a target that adds them)."""
  return is_tuned(comparison, method) and bool(comparison.final_seeds or comparison.until_ci is not None)


def base_seeds(comparison, method: str) -> list[int]:
  """The seeds a method is reported on before a target adds any (module docstring)."""
  if fresh_only(comparison, method):
    return list(comparison.final_seeds)
  return list(comparison.seeds) + list(comparison.final_seeds)


def reported_seeds(comparison, method: str, done) -> list[int]:
  """``base_seeds`` and the added seeds whose run ``done(seed)`` has finished."""
  return base_seeds(comparison, method) + [s for s in extra_seeds(comparison) if done(s)]


def val_by_seed(finals: dict) -> dict:
  return {seed: float(f[1]) for seed, f in finals.items()}


def paired_val(comparison, results: dict) -> dict:
  """{(budget, method): stats.Paired} of each non-baseline method's final validation loss."""
  out = {}
  for (budget, method), finals in results.items():
    base = results.get((budget, comparison.baseline))
    if method != comparison.baseline and base is not None:
      out[(budget, method)] = stats.paired(val_by_seed(finals), val_by_seed(base))
  return out


def next_round(comparison, best: dict, results: dict, done) -> list[tuple]:
  """The (budget, Setting, seed) runs the precision target adds now ([] when every method is
  decided, tied within ``until_ci`` or at ``max``). ``results``: the reported {(budget, method):
  {seed: (train, val, sets)}}; ``done(budget, setting, seed)``: whether that run finished."""
  if comparison.until_ci is None:
    return []
  runs = []
  for (budget, method), p in paired_val(comparison, results).items():
    n = p.interval.n
    if n >= comparison.max_seeds or not stats.needs_more_seeds(p, comparison.until_ci):
      continue
    mine, theirs = best[(budget, method)], best[(budget, comparison.baseline)]
    fresh = [s for s in extra_seeds(comparison) if s not in p.seeds
             and not (done(budget, mine, s) and done(budget, theirs, s))]
    for seed in fresh[:min(max(2, n + 1), comparison.max_seeds) - n]:
      for setting in (mine, theirs):
        if not done(budget, setting, seed) and (budget, setting, seed) not in runs:
          runs.append((budget, setting, seed))
  return runs


def precision_notes(comparison, results: dict) -> tuple[list[str], list[str]]:
  """(lines for the table's notes, "method at budget" of each pair still undecided)."""
  if comparison.until_ci is None:
    return [], []
  decided, tied, undecided = [], [], []
  for (budget, method), p in paired_val(comparison, results).items():
    if p.verdict != stats.UNDECIDED:
      decided.append(f"{method} at {budget:g} ({p.verdict}, n={p.interval.n})")
    elif p.interval.half_width <= comparison.until_ci:
      tied.append(f"{method} at {budget:g} (+-{p.interval.half_width:.4f}, n={p.interval.n})")
    else:
      undecided.append(f"{method} at {budget:g} (n={p.interval.n})")
  line = (f"Precision target (seeds.until_ci={comparison.until_ci:g}, seeds.max={comparison.max_seeds}): seeds "
          f"were added to each method whose paired 95% interval of the final validation loss against "
          f"{comparison.baseline} contained 0 and was wider than +-{comparison.until_ci:g}.")
  lines = [line, f"Decided: {', '.join(decided) or 'none'}.",
           f"Tied within +-{comparison.until_ci:g} (undecided sign, difference known to that precision): "
           f"{', '.join(tied) or 'none'}.",
           f"Undecided at seeds.max: {', '.join(undecided) or 'none'}."]
  return lines, undecided
