"""The comparison runner's outputs: result tables and plots (``compare.py`` makes the runs,
``stats.py`` the intervals).

* ``results.md`` / ``results.csv``: per budget and method, the final train and validation loss
  (and each extra validation set's, ``eval.sets``, and downstream metric's): the mean over seeds
  with its 95% Student t-interval, and for the validation loss and each extra column the
  **paired** difference against the baseline over the seeds both ran, its t-interval and
  ahead / behind / undecided (Tables 1-3 of No Train No Gain, with how sure they are). When a
  method was tuned: its chosen setting, how many settings were tried, and its results on fresh
  seeds (not the tuning seeds its choice was made on);
* ``per_seed.csv``: every reported run's final values, one row per seed (what the tables and
  ``python -m raptr_jax.claims`` compute from); ``per_seed_evals.csv``: every evaluation of
  those runs (step, budget fraction, clock; validation and extra-set losses);
* ``all_settings.md`` / ``.csv``: every setting of every tuned method on the tuning seeds
  (Appendix C), with its paired difference against the baseline's tuning runs;
* ``loss_vs_<unit>_<budget>.png`` (and ``loss_vs_steps_<budget>.png``): each method's mean
  training loss and validation loss with a band (the same 95% t-interval) over seeds, the
  seeds' curves interpolated onto a common grid first, against the budget clock and steps;
* ``tuning_<method>_<budget>.png``: each setting's validation loss against the budget clock.

CSV columns per quantity ``c`` (``train``, ``val``, ``"<set> loss"``, ``"<task> <metric>"``):
``c_mean``, ``c_std`` (ddof 1), ``c_low``, ``c_high`` (the interval; nan for one seed), ``c_n`` and,
paired, ``c_diff``, ``c_diff_low``, ``c_diff_high``, ``c_pairs`` and ``c_vs_baseline``.
"""
import csv
import math
import os

import numpy as np

from raptr_jax import stats

CAPTION = ("Mean over seeds [95% confidence interval, Student t: mean +- t(0.975, n-1) s/sqrt(n)]; "
           "one seed: \"n=1, no interval\". \"vs {baseline}\": the paired difference method - {baseline} "
           "over the seeds both ran (a seed gives both the same data order and initialization seed), its "
           "95% t-interval, and ahead (the interval is on the better side of 0: lower loss, higher "
           "accuracy) / behind (on the worse side) / undecided (it contains 0, or n=1).")
TUNED_CAPTION = ("Settings tried: how many settings each method's tuning ran; the chosen one (lowest mean "
                 "validation loss over the tuning seeds, a selection the protocol accepts) is reported on "
                 "fresh seeds (selection.final_seeds, and those a precision target adds), not on the tuning "
                 "seeds it was chosen on, unless a note below says otherwise.")
BIASED_NOTE = ("{methods}: reported on their tuning seeds (no fresh seeds: selection.final_seeds or "
               "seeds.until_ci), which favours them (the best of their settings on the same seeds).")


def final_losses(rows):
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  return train[-1]["train/loss"], evals[-1]["eval/loss"]


def final_set_losses(rows) -> dict:
  """{column: final value} of the run's extra validation sets (``eval.sets``: "<name> loss")
  and downstream tasks (``downstream.tasks``: "<task> <metric>")."""
  out = {}
  for r in rows:
    for k, v in r.items():
      if k.startswith("eval/") and k.endswith("/loss") and k != "eval/loss":
        out[k[len("eval/"):-len("/loss")] + " loss"] = v
      elif k.startswith("downstream/"):
        task, _, metric = k[len("downstream/"):].rpartition("/")
        out[f"{task} {metric}"] = v
  return out


def by_seed(finals) -> dict:
  """{seed: (train, val, sets)}; a list (older callers) is numbered 0, 1, ... in order."""
  return dict(finals) if isinstance(finals, dict) else dict(enumerate(finals))


def _columns(finals: dict, sets: list[str]) -> dict:
  """{quantity: {seed: value}} of the train and validation loss and each extra column (a
  diverged run, which logged no extra column, counts as infinite in each)."""
  out = {"train": {s: float(f[0]) for s, f in finals.items()}, "val": {s: float(f[1]) for s, f in finals.items()}}
  for name in sets:
    out[name] = {s: float(f[2][name]) if name in f[2] else math.inf for s, f in finals.items()
                 if name in f[2] or math.isinf(f[1])}
  return out


def _summary(columns: dict) -> dict:
  row = {}
  for name, values in columns.items():
    iv = stats.mean_interval(values.values())
    row |= {f"{name}_mean": iv.mean, f"{name}_std": iv.std, f"{name}_low": iv.low, f"{name}_high": iv.high,
            f"{name}_n": iv.n}
  return row


def _paired_row(columns: dict, base: dict) -> tuple[dict, dict]:
  """CSV fields and the Paired result of each compared quantity (validation and extra columns)."""
  row, results = {}, {}
  for name, values in columns.items():
    if name == "train" or name not in base:
      continue
    p = stats.paired(values, base[name], stats.lower_is_better(name))
    results[name] = p
    row |= {f"{name}_diff": p.interval.mean, f"{name}_diff_low": p.interval.low,
            f"{name}_diff_high": p.interval.high, f"{name}_pairs": p.interval.n, f"{name}_vs_baseline": p.verdict}
  return row, results


def _cell(row: dict, column: str) -> str:
  return stats.format_interval(stats.Interval(row[f"{column}_mean"], row[f"{column}_low"], row[f"{column}_high"],
                                              row[f"{column}_n"], row[f"{column}_std"]))


def _paired_cell(row: dict, column: str, is_baseline: bool) -> str:
  if is_baseline:
    return "(baseline)"
  if f"{column}_vs_baseline" not in row:
    return "-"
  iv = stats.Interval(row[f"{column}_diff"], row[f"{column}_diff_low"], row[f"{column}_diff_high"],
                      row[f"{column}_pairs"], math.nan)
  return f"{stats.format_interval(iv, signed=True)} {row[f'{column}_vs_baseline']}"


def _write_csv(path: str, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def _write(workdir: str, stem: str, rows: list[dict], head: list[str], cells, caption: list[str],
           notes: list[str]) -> str:
  _write_csv(os.path.join(workdir, f"{stem}.csv"), rows)
  lines = [*caption, *([""] if caption else []), "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
  lines += [""] + notes if notes else []
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, f"{stem}.md"), "w") as f:
    f.write(text)
  return text


def default_baseline(methods) -> str:
  """The comparison's baseline: the method named "baseline", else the first one."""
  methods = list(methods)
  return "baseline" if "baseline" in methods else methods[0]


def _set_names(results: dict) -> list[str]:
  return sorted({name for finals in results.values() for f in by_seed(finals).values() for name in f[2]})


def column_title(name: str) -> str:
  return {"train": "train loss", "val": "validation loss"}.get(name, name)


def write_tables(results, workdir: str, unit: str, chosen: dict | None = None, baseline: str = "",
                 tried: dict | None = None, notes: list[str] | None = None) -> str:
  """results.md / .csv and per_seed.csv from ``results`` {(budget, method): {seed: (train, val,
  sets)}} (a list per key is numbered 0, 1, ...); ``chosen`` {(budget, method): setting name} adds
  the chosen setting, ``tried`` {method: settings tried} how many settings a tuned method ran
  (with a note on fresh seeds), ``notes`` lines after the table. Returns the markdown."""
  results = {k: by_seed(v) for k, v in results.items()}
  baseline = baseline or default_baseline(m for _, m in results)
  sets = _set_names(results)
  chosen = {k: v for k, v in (chosen or {}).items() if v}
  tuned = bool(chosen) or any(n > 1 for n in (tried or {}).values())
  rows, seed_rows = [], []
  for (budget, method), finals in results.items():
    row = dict(budget=budget, unit=unit, method=method)
    if tuned:
      row |= {"setting": chosen.get((budget, method), ""), "settings_tried": (tried or {}).get(method, "")}
    columns = _columns(finals, sets)
    row |= {"seeds": len(finals), "seed_list": " ".join(str(s) for s in sorted(finals))} | _summary(columns)
    base = results.get((budget, baseline))
    if base is not None and method != baseline:
      row |= _paired_row(columns, _columns(base, sets))[0]
    rows.append(row)
    for seed in sorted(finals):
      f = finals[seed]
      seed_rows.append(dict(budget=budget, unit=unit, method=method, setting=chosen.get((budget, method), ""),
                            seed=seed, **{"train loss": f[0], "validation loss": f[1]},
                            **{name: f[2].get(name, "") for name in sets}))
  _write_csv(os.path.join(workdir, "per_seed.csv"), seed_rows)
  compared = ["val", *sets]
  head = [f"budget ({unit})", "method"] + (["chosen setting", "settings tried"] if tuned else []) + ["seeds"]
  head += ["final train loss"] + [h for c in compared for h in (f"final {column_title(c)}",
                                                              f"{column_title(c)} vs {baseline} (paired)")]
  caption = [CAPTION.format(baseline=baseline)] + ([TUNED_CAPTION] if tuned else [])
  return _write(workdir, "results", rows, head, lambda r: [
      f"{r['budget']:g}", r["method"], *([r["setting"] or "-", str(r["settings_tried"] or "-")] if tuned else []),
      str(r["seeds"]), _cell(r, "train"),
      *(cell for c in compared for cell in (_cell(r, c), _paired_cell(r, c, r["method"] == baseline)))],
      caption, list(notes or []))


def write_settings_table(results, workdir: str, unit: str, baseline: str = "") -> str:
  """all_settings.csv and .md from {(budget, Setting): {seed: (train, val, sets)}}: every
  setting's result on the tuning seeds, best first per method, with its paired difference
  against ``baseline``'s runs at the same budget (its best setting when it was tuned)."""
  results = {k: by_seed(v) for k, v in results.items() if v}
  baseline = baseline or default_baseline(dict.fromkeys(s.method for _, s in results))
  base = {}
  for (budget, setting), finals in results.items():
    mean = np.mean([f[1] for f in finals.values()])
    if setting.method == baseline and (budget not in base or mean < base[budget][0]):
      base[budget] = (mean, finals)
  rows = []
  for (budget, setting), finals in results.items():
    columns = _columns(finals, [])
    row = dict(budget=budget, unit=unit, method=setting.method, setting=setting.name or "-", seeds=len(finals),
               seed_list=" ".join(str(s) for s in sorted(finals))) | _summary(columns)
    if budget in base and setting.method != baseline:
      row |= _paired_row(columns, _columns(base[budget][1], []))[0]
    rows.append(row)
  rows.sort(key=lambda r: (r["budget"], r["method"], r["val_mean"]))
  head = [f"budget ({unit})", "method", "setting", "seeds", "final train loss", "final validation loss",
          f"validation loss vs {baseline} (paired)"]
  caption = [CAPTION.format(baseline=baseline) + " Every setting on the tuning seeds."]
  return _write(workdir, "all_settings", rows, head, lambda r: [
      f"{r['budget']:g}", r["method"], r["setting"], str(r["seeds"]), _cell(r, "train"), _cell(r, "val"),
      _paired_cell(r, "val", r["method"] == baseline)], caption, [])


def write_eval_points(curves: dict, workdir: str, unit: str, chosen: dict | None = None) -> str:
  """per_seed_evals.csv: every evaluation of every reported run. ``curves``: {budget: {method:
  {seed: metrics rows}}}; ``chosen`` {(budget, method): setting name}."""
  out = []
  for budget, runs in curves.items():
    for method, per_seed in runs.items():
      for seed, rows in by_seed(per_seed).items():
        for r in rows:
          if "eval/loss" not in r:
            continue
          sets = {k[len("eval/"):-len("/loss")] + " loss": r[k] for k in r
                  if k.startswith("eval/") and k.endswith("/loss") and k != "eval/loss"}
          out.append(dict(budget=budget, unit=unit, method=method, setting=(chosen or {}).get((budget, method), ""),
                          seed=seed, step=r.get("step", ""), progress=r.get("progress", ""),
                          progress_units=r.get("progress_units", ""), **{"validation loss": r["eval/loss"]}, **sets))
  path = os.path.join(workdir, "per_seed_evals.csv")
  if out:
    _write_csv(path, out)
  return path


def _seed_points(rows, x_key: str, y_key: str):
  """One seed's finite (x, y) points, ordered by x."""
  pts = []
  for r in rows:
    if x_key in r and y_key in r:
      x, y = float(r[x_key]), float(r[y_key])
      if math.isfinite(x) and math.isfinite(y):
        pts.append((x, y))
  pts.sort()
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def mean_band(rows_per_seed, x_key: str, y_key: str, max_points: int = 300, confidence: float = stats.CONFIDENCE):
  """(grid, mean, low, high) of ``y_key`` against ``x_key`` over seeds: each seed's curve is
  interpolated (linearly) onto one grid, the union of the seeds' x values over the range all of
  them cover (at most ``max_points``, evenly spaced beyond that), then averaged; [low, high] is
  the t-interval of the mean at each point (nan for one seed)."""
  curves = [c for c in (_seed_points(rows, x_key, y_key) for rows in by_seed(rows_per_seed).values()) if len(c[0])]
  if not curves:  # no seed logged this (a run that diverged before)
    return (np.zeros(0),) * 4
  lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
  if lo > hi:  # the seeds' ranges do not overlap
    return (np.zeros(0),) * 4
  grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in curves]))
  if len(grid) > max_points:
    grid = np.linspace(lo, hi, max_points)
  ys = np.stack([np.interp(grid, x, y) for x, y in curves])
  mean = ys.mean(axis=0)
  n = len(curves)
  if n < 2:
    return grid, mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
  half = stats.t_quantile(0.5 + confidence / 2, n - 1) * ys.std(axis=0, ddof=1) / math.sqrt(n)
  return grid, mean, mean - half, mean + half


def _figure(**kwargs):
  """A figure drawn without pyplot: no backend is chosen or switched, so plotting from a
  notebook (whose inline backend stays) or a headless worker behaves the same."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(**kwargs)
  return fig, fig.subplots()


def _finish(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=legend_size)
  ax.grid(alpha=0.3)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_curves(curves: dict, workdir: str, unit: str) -> list[str]:
  """Per budget, each method's training loss and validation loss (mean over seeds, with a band:
  the 95% t-interval of the mean) against the budget clock (``loss_vs_<unit>_<budget>.png``)
  and, when that clock is not steps, against steps too (``loss_vs_steps_<budget>.png``): a
  method charged less per step (a cheaper step, or interlocking backprop's K-device time) runs
  more steps in the same budget. ``curves``: {budget: {method: {seed: metrics rows}}} (or a list
  of rows per seed)."""
  axes = [("progress_units", unit)] + ([("step", "steps")] if unit != "steps" else [])
  paths = []
  for budget, runs in curves.items():
    counts = sorted({len(by_seed(rows)) for rows in runs.values()})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    band = "band: 95% t-interval" if counts[-1] > 1 else "no band"
    for key, label in axes:
      fig, ax = _figure(figsize=(7, 4.5))
      for i, (method, rows_per_seed) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for y_key, style, alpha, what in (("train/loss", "-", 0.18, "train"),
                                          ("eval/loss", "o--", 0.12, "validation")):
          x, mean, low, high = mean_band(rows_per_seed, key, y_key)
          ax.plot(x, mean, style, color=color, ms=4, label=f"{method} ({what})")
          if len(x) and np.all(np.isfinite(low)):
            ax.fill_between(x, low, high, color=color, alpha=alpha, lw=0)
      title = f"budget {budget:g} {unit}: mean of {seeds} seed(s) per method, {band}"
      _finish(ax, label.replace("_", " "), "loss", title, 8)
      paths.append(_save(fig, os.path.join(workdir, f"loss_vs_{label.split('_')[0]}_{budget:g}.png")))
  return paths


def plot_tuning(settings_rows: dict, workdir: str, unit: str) -> list[str]:
  """``tuning_<method>_<budget>.png``: the validation loss of each setting of a tuned method
  (mean over its seeds) against the budget clock, the chosen one drawn thick.
  ``settings_rows``: {(budget, method): [(setting name, [rows per seed], chosen)]}."""
  paths = []
  for (budget, method), entries in settings_rows.items():
    if len(entries) < 2:
      continue
    from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
    fig, ax = _figure(figsize=(7, 4.5))
    colors = colormaps["viridis"](np.linspace(0.0, 0.95, len(entries))) if len(entries) > 10 else [f"C{i}" for i in range(10)]
    for i, (name, rows_per_seed, is_best) in enumerate(entries):
      x, y, _, _ = mean_band(rows_per_seed, "progress_units", "eval/loss")
      ax.plot(x, y, "o-", color=colors[i], lw=3 if is_best else 1, label=name + (" (chosen)" if is_best else ""))
    _finish(ax, unit.replace("_", " "), "validation loss", f"{method}: {len(entries)} settings at budget {budget:g} {unit}", 7)
    paths.append(_save(fig, os.path.join(workdir, f"tuning_{method}_{budget:g}.png")))
  return paths
