"""The comparison runner's outputs: result tables and plots (``compare.py`` makes the runs).

* ``results.md`` / ``results.csv``: per budget and method, the final train and validation loss
  (and each extra validation set's, ``eval.sets``), mean +- std over seeds (Tables 1-3 of No
  Train No Gain), with the chosen setting when the method was tuned;
* ``all_settings.md`` / ``.csv``: every setting of every tuned method (Appendix C);
* ``loss_vs_<unit>_<budget>.png`` (and ``loss_vs_steps_<budget>.png``): the chosen settings'
  training loss (mean over seeds) and validation points against the budget clock and steps;
* ``tuning_<method>_<budget>.png``: each setting's validation loss against the budget clock.
"""
import csv
import os

import numpy as np


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


def _summary(finals, sets) -> dict:
  """mean / std over seeds of the train, validation and extra-set losses (a diverged seed's inf
  makes the mean inf)."""
  columns = {"train": [f[0] for f in finals], "val": [f[1] for f in finals]}
  columns |= {name: [f[2][name] for f in finals if name in f[2]] for name in sets}
  row = {}
  with np.errstate(invalid="ignore"):
    for name, values in columns.items():
      if not values:
        row[f"{name}_mean"], row[f"{name}_std"] = float("nan"), float("nan")
        continue
      row[f"{name}_mean"] = float(np.mean(values))
      row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return row


def _cell(row: dict, column: str) -> str:
  """mean +- std of a column, or "diverged" where a seed's run stopped on a non-finite loss."""
  mean, std = row[f"{column}_mean"], row[f"{column}_std"]
  return "diverged" if mean == float("inf") else f"{mean:.4f} +- {std:.4f}"


def _write(workdir: str, stem: str, rows: list[dict], head: list[str], cells) -> str:
  with open(os.path.join(workdir, f"{stem}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, f"{stem}.md"), "w") as f:
    f.write(text)
  return text


def write_tables(results, workdir: str, unit: str, chosen: dict | None = None) -> str:
  """results.csv and results.md from ``results`` {(budget, method): [(train, val, sets) per
  seed]}; ``chosen`` {(budget, method): setting name} adds the chosen setting of tuned methods."""
  sets = sorted({name for finals in results.values() for *_, extra in finals for name in extra})
  chosen = {k: v for k, v in (chosen or {}).items() if v}
  rows = []
  for (budget, method), finals in results.items():
    row = dict(budget=budget, unit=unit, method=method)
    if chosen:
      row["setting"] = chosen.get((budget, method), "")
    rows.append(row | {"seeds": len(finals)} | _summary(finals, sets))
  head = [f"budget ({unit})", "method"] + (["chosen setting"] if chosen else []) + ["seeds", "final train loss",
          "final validation loss"] + [f"final {name}" for name in sets]
  return _write(workdir, "results", rows, head, lambda r: [
      f"{r['budget']:g}", r["method"], *([r["setting"] or "-"] if chosen else []), str(r["seeds"]),
      *(_cell(r, c) for c in ["train", "val", *sets])])


def write_settings_table(results, workdir: str, unit: str) -> str:
  """all_settings.csv and .md from {(budget, Setting): [(train, val, sets) per seed]}: every
  setting's result, best first per method."""
  rows = []
  for (budget, setting), finals in results.items():
    if finals:
      rows.append(dict(budget=budget, unit=unit, method=setting.method, setting=setting.name or "-",
                       seeds=len(finals)) | _summary(finals, []))
  rows.sort(key=lambda r: (r["budget"], r["method"], r["val_mean"]))
  head = [f"budget ({unit})", "method", "setting", "seeds", "final train loss", "final validation loss"]
  return _write(workdir, "all_settings", rows, head, lambda r: [
      f"{r['budget']:g}", r["method"], r["setting"], str(r["seeds"]), _cell(r, "train"), _cell(r, "val")])


def _mean_curve(rows_per_seed, x_key: str, y_key: str):
  """The points of ``y_key`` against ``x_key``, averaged over seeds up to the shortest run."""
  curves = [c for c in ([(r[x_key], r[y_key]) for r in rows if y_key in r] for rows in rows_per_seed) if c]
  if not curves:  # no seed logged this (a run that diverged before)
    return np.zeros(0), np.zeros(0)
  n = min(len(c) for c in curves)
  return (np.mean([[x for x, _ in c[:n]] for c in curves], axis=0),
          np.mean([[y for _, y in c[:n]] for c in curves], axis=0))


def _figure(**kwargs):
  """A figure drawn without pyplot: no backend is chosen or switched, so plotting from a
  notebook (whose inline backend stays) or a headless worker behaves the same."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(**kwargs)
  return fig, fig.subplots()


def _finish(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=legend_size)
  ax.grid(alpha=0.3)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_curves(curves: dict, workdir: str, unit: str) -> list[str]:
  """Per budget, training loss (mean over seeds) and validation points per method against the
  budget clock (``loss_vs_<unit>_<budget>.png``) and, when that clock is not steps, against
  steps too (``loss_vs_steps_<budget>.png``): a method charged less per step (a cheaper step,
  or interlocking backprop's K-device time) runs more steps in the same budget. ``curves``:
  {budget: {method: [metrics rows per seed]}}."""
  axes = [("progress_units", unit)] + ([("step", "steps")] if unit != "steps" else [])
  paths = []
  for budget, runs in curves.items():
    for key, label in axes:
      fig, ax = _figure(figsize=(7, 4.5))
      for i, (method, rows_per_seed) in enumerate(runs.items()):
        color = f"C{i}"
        x, y = _mean_curve(rows_per_seed, key, "train/loss")
        ax.plot(x, y, color=color, label=f"{method} (train)")
        x, y = _mean_curve(rows_per_seed, key, "eval/loss")
        ax.plot(x, y, "o--", color=color, label=f"{method} (validation)")
      seeds = max(len(rows) for rows in runs.values())
      _finish(ax, label.replace("_", " "), "loss", f"budget {budget:g} {unit}, mean over {seeds} seed(s)", 8)
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
      x, y = _mean_curve(rows_per_seed, "progress_units", "eval/loss")
      ax.plot(x, y, "o-", color=colors[i], lw=3 if is_best else 1, label=name + (" (chosen)" if is_best else ""))
    _finish(ax, unit.replace("_", " "), "validation loss", f"{method}: {len(entries)} settings at budget {budget:g} {unit}", 7)
    paths.append(_save(fig, os.path.join(workdir, f"tuning_{method}_{budget:g}.png")))
  return paths

