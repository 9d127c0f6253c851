"""Compare methods under one protocol (No Train No Gain): fixed budgets, several seeds.

    python -m raptr_jax.compare --config=configs/compare_small.py [--workdir=runs/compare_small]

A comparison config (see ``configs/compare_small.py``) names the run config, the methods (each a
list of ``section.field=value`` overrides), the seeds, the budgets (in the run's budget unit;
RST by default) and overrides common to every run. Each (budget, method, seed) trains in its own
folder under the workdir; re-running the command resumes interrupted runs and skips finished
ones. ``calibrate_missing`` times step kinds absent from the RST table on this device first,
scaled to the table's reference system through a kind the table has for the same config
(``rst.calibrate(only_missing=True)``; with none, this device becomes the reference); a method's one-off preparation (``Method.prepare``:
RHO loss's irreducible-loss store) runs before its first run and is reused after. Outputs in the workdir:

* ``results.md`` / ``results.csv``: final train and validation loss per method and budget,
  mean +- std over seeds (like Tables 1-3 of the paper);
* ``loss_vs_rst_<budget>.png``: training loss (mean over seeds) and validation points against
  the budget clock per method (like Figure 1); ``loss_vs_steps_<budget>.png`` the same against
  steps (with the first, interlocking backprop's Figure 7: time-wise and step-wise).
"""
import argparse
import csv
import os
import sys

import numpy as np

from raptr_jax import rst
from raptr_jax.config import load_config
from raptr_jax.metrics import read_metrics


def run_dir(workdir, budget, method, seed):
  return os.path.join(workdir, f"budget_{budget:g}", method, f"seed_{seed}")


def final_losses(rows):
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  return train[-1]["train/loss"], evals[-1]["eval/loss"]


def final_set_losses(rows) -> dict:
  """{name: final eval/<name>/loss} of the run's extra validation sets (``eval.sets``)."""
  out = {}
  for r in rows:
    out |= {k[len("eval/"):-len("/loss")]: v for k, v in r.items()
            if k.startswith("eval/") and k.endswith("/loss") and k != "eval/loss"}
  return out


def run_all(comparison, workdir: str, quiet: bool = True) -> dict:
  """Trains every run (resuming), returns {(budget, method): [(train, val) per seed]}."""
  from raptr_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  results = {}
  for budget in comparison.budgets:
    for method, overrides in comparison.methods.items():
      for seed in comparison.seeds:
        cfg = load_config(comparison.config, [*comparison.common, *overrides,
                                              f"budget.value={budget}", f"seed={seed}"])
        if quiet:
          cfg.log.progress_bar = False
        if cfg.budget.unit.startswith("rst") and comparison.calibrate_missing:
          _calibrate_missing(cfg, train_lib)
        prepare(cfg)
        where = run_dir(workdir, budget, method, seed)
        print(f"== budget {budget:g} {cfg.budget.unit}, {method}, seed {seed}: {where}")
        train_lib.train(cfg, where)
        rows = read_metrics(where)
        results.setdefault((budget, method), []).append((*final_losses(rows), final_set_losses(rows)))
  return results


def prepare(cfg) -> None:
  """Runs the one-off work the run's method declares (``Method.prepare``, e.g. RHO loss's
  irreducible-loss store); each step skips what is already done."""
  import importlib  # pylint: disable=g-import-not-at-top
  from raptr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  for target in get_method(cfg.method.name, cfg).prepare:
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(cfg)


def _calibrate_missing(cfg, train_lib):
  try:
    train_lib.setup(cfg)
  except ValueError as e:
    if "rst calibrate" not in str(e):
      raise
    print(f"calibrating on this device: {str(e).split(';')[0]}")
    rst.calibrate(cfg, verbose=False, only_missing=True)


def write_tables(results, workdir: str, unit: str) -> str:
  """results.csv and results.md: mean +- std over seeds of the final train loss, the final
  validation loss and each extra validation set's (``eval.sets``), per budget and method."""
  mean_std = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
  sets = sorted({name for finals in results.values() for *_, extra in finals for name in extra})
  rows = []
  for (budget, method), finals in results.items():
    row = dict(budget=budget, unit=unit, method=method, seeds=len(finals))
    columns = {"train": [f[0] for f in finals], "val": [f[1] for f in finals]}
    columns |= {name: [f[2][name] for f in finals if name in f[2]] for name in sets}
    for name, values in columns.items():
      row[f"{name}_mean"], row[f"{name}_std"] = mean_std(values) if values else (float("nan"), float("nan"))
    rows.append(row)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  header = ["final train loss", "final validation loss"] + [f"final {name} loss" for name in sets]
  lines = [f"| budget ({unit}) | method | seeds | " + " | ".join(header) + " |", "|---" * (3 + len(header)) + "|"]
  for r in rows:
    cells = [f"{r[f'{c}_mean']:.4f} +- {r[f'{c}_std']:.4f}" for c in ["train", "val", *sets]]
    lines.append(f"| {r['budget']:g} | {r['method']} | {r['seeds']} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  return text


def plot_curves(comparison, workdir: str, unit: str) -> list[str]:
  """Per budget, training loss (mean over seeds) and validation points per method against the
  budget clock (``loss_vs_<unit>_<budget>.png``) and, when that clock is not steps, against
  steps too (``loss_vs_steps_<budget>.png``): a method charged less per step (a cheaper step,
  or interlocking backprop's K-device time) runs more steps in the same budget."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  axes = [("progress_units", unit)] + ([("step", "steps")] if unit != "steps" else [])
  paths = []
  for budget in comparison.budgets:
    runs = {method: [read_metrics(run_dir(workdir, budget, method, s)) for s in comparison.seeds]
            for method in comparison.methods}
    for key, label in axes:
      fig, ax = plt.subplots(figsize=(7, 4.5))
      for i, (method, rows_per_seed) in enumerate(runs.items()):
        color = f"C{i}"
        x, y = _mean_curve(rows_per_seed, key, "train/loss")
        ax.plot(x, y, color=color, label=f"{method} (train)")
        x, y = _mean_curve(rows_per_seed, key, "eval/loss")
        ax.plot(x, y, "o--", color=color, label=f"{method} (validation)")
      ax.set_xlabel(label.replace("_", " "))
      ax.set_ylabel("loss")
      ax.set_title(f"budget {budget:g} {unit}, mean over {len(comparison.seeds)} seeds")
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
      path = os.path.join(workdir, f"loss_vs_{label.split('_')[0]}_{budget:g}.png")
      fig.tight_layout()
      fig.savefig(path, dpi=110)
      plt.close(fig)
      paths.append(path)
  return paths


def _mean_curve(rows_per_seed, x_key: str, y_key: str):
  """The points of ``y_key`` against ``x_key``, averaged over seeds up to the shortest run."""
  curves = [[(r[x_key], r[y_key]) for r in rows if y_key in r] for rows in rows_per_seed]
  n = min(len(c) for c in curves)
  return (np.mean([[x for x, _ in c[:n]] for c in curves], axis=0),
          np.mean([[y for _, y in c[:n]] for c in curves], axis=0))


def load_comparison(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("comparison", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  comparison = module.get_comparison()
  for field in ("config", "methods", "seeds", "budgets"):
    if field not in comparison:
      raise ValueError(f"comparison config {path} lacks {field!r}")
  comparison.setdefault("common", [])
  comparison.setdefault("calibrate_missing", True)
  if not comparison["methods"] or not comparison["seeds"] or not comparison["budgets"]:
    raise ValueError("a comparison needs at least one method, seed and budget")
  if any(b <= 0 for b in comparison["budgets"]):
    raise ValueError(f"budgets must be positive, got {comparison['budgets']}")
  return argparse.Namespace(**comparison)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.compare", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="comparison config, e.g. configs/compare_small.py")
  parser.add_argument("--workdir", default=None, help="default: runs/<comparison name>")
  args = parser.parse_args(argv)
  workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
  try:
    comparison = load_comparison(args.config)
    results = run_all(comparison, workdir)
  except ValueError as e:
    sys.exit(f"error: {e}")
  unit = load_config(comparison.config, comparison.common).budget.unit
  print(write_tables(results, workdir, unit))
  for path in plot_curves(comparison, workdir, unit):
    print(f"plot: {path}")


if __name__ == "__main__":
  main()
