"""Compare methods under one protocol (No Train No Gain): fixed budgets, several seeds, and each
method tuned at the budget first (its Appendix C).

    python -m raptr_jax.compare --config=configs/compare_small.py [--workdir=runs/compare_small]
    python -m raptr_jax.compare --config=configs/tune_ntng.py --workers=2        # 2 runs at once
    python -m raptr_jax.compare --config=configs/tune_ntng.py --emit=jobs/       # a cluster's jobs

A comparison config (see ``configs/compare_small.py``) names the run config, the methods, the
seeds, the budgets (in the run's budget unit; RST by default) and overrides common to every
run. A method is a list of ``section.field=value`` overrides, or a dict with a ``grid`` and / or
a random ``search`` of settings (``sweep.py``); ``configs/tune_ntng.py`` holds the paper's
Appendix C grids. Optional keys: ``baseline`` (the method every other is compared with, paired
by seed; default: the method named "baseline", else the first), ``selection=dict(final_seeds=
[...])`` (re-run each method's chosen setting with these fresh seeds: a tuned method is reported
on them, not on the tuning seeds its choice was made on), ``max_runs`` (default 64: a larger
sweep needs ``--yes``), ``calibrate_missing`` (default True).

Seeds: a list (``seeds=[0, 1, 2]``), or a precision target
``seeds=dict(initial=[0, 1, 2], until_ci=0.02, max=8)`` (or ``--seeds.until_ci=0.02
--seeds.max=8`` on the command line, with ``--seeds=0,1,2``): after the initial (and final)
seeds, each method whose paired 95% interval against the baseline (final validation loss)
still contains 0 **and** is wider than +- ``until_ci`` gets one more seed (the baseline runs it
too), round after round, until its interval excludes 0 (ahead / behind), is within +-
``until_ci`` (a tie at that precision), or it has ``max`` paired seeds; ``until_ci=0`` runs
until the sign is decided. Added seeds are the integers after the largest seed the config
names. The table's notes say which methods were decided, tied, or stayed undecided. A seed
given twice (in ``seeds``, or in ``seeds`` and ``final_seeds``) would count one run twice and is
refused, as are a target without ``max`` and ``max`` without a target.

Before any run starts, every run's config is built and validated (an unknown key stops the
sweep there), step kinds missing from the RST table are timed on this device and scaled to the
table's reference system (``rst.calibrate(only_missing=True)``), and each method's one-off
preparation (``Method.prepare``: RHO loss's IL store) runs. Each (budget, setting, seed) then
trains in its own folder under the workdir; re-running the command skips finished runs and
resumes interrupted ones, so a killed sweep continues where it stopped.

Execution: in this process (``--workers=1``), or ``--workers=N`` local worker processes, each
with devices of its own (``--platform`` cpu: N processes of ``--worker_devices`` fake devices;
gpu: ``CUDA_VISIBLE_DEVICES``; tpu: this host's chips via ``TPU_VISIBLE_CHIPS``), each worker
running ``python -m raptr_jax.compare ... --only=<run>``. For many machines ``--emit=DIR`` writes
that command for every pending run into ``DIR/runs.txt`` and a Slurm job array
``DIR/slurm.sbatch`` over it (any scheduler that runs one command per job works: Kubernetes
Indexed Jobs, ``xargs -P``, GNU parallel); run the comparison command again when they are done
to write the tables (and, with ``final_seeds``, to emit the second phase). RST budgets stay
comparable however the runs are spread: every run charges the calibrated reference table, not
its own wall time.

As a function (a notebook, a script): ``compare.compare(path_or_dict, workdir)`` runs the pending
runs in this process and returns the ``Report`` (tables, plot paths).

Outputs (``compare_report.py``): ``results.md`` / ``.csv`` (per method and budget: means with
95% t-intervals over seeds, paired differences against the baseline; the chosen setting and how
many were tried per tuned method), ``per_seed.csv`` and ``per_seed_evals.csv`` (the runs behind
them: ``python -m raptr_jax.claims`` reads these), ``all_settings.md`` / ``.csv``,
``loss_vs_<unit>_<budget>.png``, ``loss_vs_steps_<budget>.png`` (means with 95% bands) and
``tuning_<method>_<budget>.png``.
"""
import argparse
import ast
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from raptr_jax import compare_report
from raptr_jax import compare_seeds
from raptr_jax import rst
from raptr_jax import sweep
from raptr_jax.compare_report import (default_baseline, final_losses, final_set_losses,  # noqa: F401
                                      plot_curves, plot_tuning, write_eval_points, write_settings_table,
                                      write_tables)
from raptr_jax.config import load_config
from raptr_jax.metrics import read_metrics

DEFAULT_MAX_RUNS = 64


@dataclasses.dataclass(frozen=True)
class RunSpec:
  budget: float
  setting: sweep.Setting
  seed: int

  @property
  def key(self) -> str:
    """The run's folder under the workdir (and its name for ``--only``)."""
    parts = [f"budget_{self.budget:g}", self.setting.method] + ([self.setting.name] if self.setting.name else [])
    return "/".join(parts + [f"seed_{self.seed}"])


def run_dir(workdir, budget, method, seed, setting: str = ""):
  return os.path.join(workdir, f"budget_{budget:g}", method, *([setting] if setting else []), f"seed_{seed}")


def _duplicate_keys(path: str) -> None:
  """A dict literal with a key twice keeps only the last one silently (two methods of the same
  name); refuse that."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Dict):
      keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
      twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
      if twice:
        raise ValueError(f"{path}:{node.lineno}: {twice[0]!r} is given twice in one dict (two methods or grid "
                         "keys of the same name: the first would be dropped silently); rename one")


def load_comparison(path, overrides: dict | None = None):
  """The comparison of a config file's ``get_comparison()``, or of a dict of the same keys
  (a notebook's; such a comparison runs in this process only: workers and ``--emit`` re-run
  the comparison command, which needs a file). ``overrides``: the command line's
  {"seeds" | "seeds.until_ci" | "seeds.max" | "baseline": value}, passed on to its workers."""
  overrides = dict(overrides or {})
  if isinstance(path, dict):
    return make_comparison(compare_seeds.apply_cli(path, overrides), "", overrides)
  import importlib.util  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise ValueError(f"comparison config {path!r} not found")
  _duplicate_keys(path)
  spec = importlib.util.spec_from_file_location("comparison", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return make_comparison(compare_seeds.apply_cli(module.get_comparison(), overrides), path, overrides)


def make_comparison(comparison: dict, path: str, overrides: dict | None = None):
  where = path or "the comparison dict"
  for field in ("config", "methods", "seeds", "budgets"):
    if field not in comparison:
      raise ValueError(f"{where} lacks {field!r} (a comparison names config, methods, seeds and budgets)")
  comparison.setdefault("common", [])
  comparison.setdefault("calibrate_missing", True)
  comparison.setdefault("selection", {})
  comparison.setdefault("max_runs", DEFAULT_MAX_RUNS)
  if not comparison["methods"] or not comparison["seeds"] or not comparison["budgets"]:
    raise ValueError("a comparison needs at least one method, seed and budget")
  if any(b <= 0 for b in comparison["budgets"]):
    raise ValueError(f"budgets must be positive, got {comparison['budgets']}")
  unknown = set(comparison["selection"]) - {"final_seeds"}
  if unknown:
    raise ValueError(f"selection takes final_seeds (the chosen settings' extra seeds), got {sorted(unknown)}")
  compare_seeds.parse_seeds(comparison, where)
  comparison.setdefault("baseline", default_baseline(comparison["methods"]))
  if comparison["baseline"] not in comparison["methods"]:
    raise ValueError(f"baseline {comparison['baseline']!r} is not one of the methods {list(comparison['methods'])}")
  comparison["path"] = path
  comparison["overrides"] = dict(overrides or {})
  comparison["settings"] = sweep.expand(comparison["methods"])
  return argparse.Namespace(**comparison)


def tuning_runs(comparison) -> list[RunSpec]:
  return [RunSpec(float(b), s, int(seed)) for b in comparison.budgets for s in comparison.settings
          for seed in comparison.seeds]


def final_runs(comparison, best: dict) -> list[RunSpec]:
  """The chosen settings' runs with ``selection.final_seeds`` (fresh: never a tuning seed)."""
  return [RunSpec(b, s, seed) for (b, _), s in best.items() for seed in comparison.final_seeds]


def every_run(comparison) -> dict[str, RunSpec]:
  """{key: run} of every run a phase can make: the tuning runs, and each setting at every
  budget with each final seed and each seed a precision target may add (the later phases run
  the chosen ones of those)."""
  runs = {s.key: s for s in tuning_runs(comparison)}
  for b in comparison.budgets:
    for setting in comparison.settings:
      runs |= {r.key: r for r in (RunSpec(float(b), setting, seed) for seed in
                                  [*comparison.final_seeds, *compare_seeds.extra_seeds(comparison)])}
  return runs


def _done(workdir: str):
  return lambda budget, setting, seed: finished(os.path.join(workdir, RunSpec(budget, setting, seed).key))


def reported(comparison, best: dict, workdir: str) -> dict:
  """{(budget, method): {seed: (train, val, sets)}} of each chosen setting on the seeds it is
  reported on (``compare_seeds``: fresh seeds for a tuned method)."""
  done = _done(workdir)
  out = {}
  for b in map(float, comparison.budgets):
    for m in comparison.methods:
      if (b, m) not in best:
        continue
      setting = best[(b, m)]
      seeds = compare_seeds.reported_seeds(comparison, m, lambda seed: done(b, setting, seed))
      out[(b, m)] = collect([RunSpec(b, setting, seed) for seed in seeds], workdir).get((b, setting), {})
  return out


def seed_round(comparison, best: dict, workdir: str) -> list[RunSpec]:
  """The runs the precision target adds now (``compare_seeds.next_round``)."""
  runs = compare_seeds.next_round(comparison, best, reported(comparison, best, workdir), _done(workdir))
  return [RunSpec(b, setting, seed) for b, setting, seed in runs]


def run_config(comparison, spec: RunSpec, quiet: bool = True):
  cfg = load_config(comparison.config, [*comparison.common, *spec.setting.overrides,
                                        f"budget.value={spec.budget}", f"seed={spec.seed}"])
  if quiet:
    cfg.log.progress_bar = False
  return cfg


def finished(where: str) -> bool:
  """True when the run in ``where`` has reached its budget (its last logged row) or diverged."""
  if os.path.exists(os.path.join(where, DIVERGED)):
    return True
  try:
    rows = read_metrics(where)
  except (OSError, ValueError):
    return False
  return bool(rows) and rows[-1].get("progress", 0.0) >= 1.0 - 1e-9 and os.path.isdir(os.path.join(where, "checkpoints"))


def preflight(comparison, specs: list[RunSpec], confirm: bool, workdir: str = "", phase: str = "tune",
              here: bool = True) -> None:
  """Every run's config built and validated and the size cap, then RST calibration of missing
  step kinds and the methods' preparation (``prepare_runs``): all before any run starts; with
  ``here=False`` (a worker pool, a cluster) the preparation runs in a process of its own, so
  this one never opens the accelerators its workers need."""
  for spec in specs:
    try:
      run_config(comparison, spec)
    except ValueError as e:
      raise ValueError(f"{spec.setting.label}, budget {spec.budget:g}, seed {spec.seed}: {e}") from None
  if len(specs) > comparison.max_runs and not confirm:
    raise ValueError(f"this comparison makes {len(specs)} runs, more than max_runs={comparison.max_runs}; "
                     "pass --yes to run them all, or raise max_runs in the comparison config")
  if here:
    prepare_runs(comparison, specs)
    return
  cmd = _command(comparison, workdir, f"--prepare={phase}")
  if subprocess.run(cmd, check=False).returncode:
    raise ValueError(f"preparing the runs failed (calibration or a method's preparation; its output is above): "
                     f"{shlex.join(cmd)}")


def prepare_runs(comparison, specs: list[RunSpec]) -> None:
  """RST calibration of missing step kinds (once per config: seeds and budget values change no
  step kind) and each method's preparation (once per config with its seed and budget: RHO
  loss's IL store depends on both)."""
  from raptr_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  calibrated, prepared = set(), set()
  for spec in specs:
    cfg = run_config(comparison, spec)
    what = cfg.to_dict()
    key = repr(what)
    what.pop("seed")
    what["budget"].pop("value")
    if cfg.budget.unit.startswith("rst") and comparison.calibrate_missing and repr(what) not in calibrated:
      calibrated.add(repr(what))
      _calibrate_missing(cfg, train_lib)
    if key not in prepared:
      prepared.add(key)
      prepare(cfg)


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


DIVERGED = "diverged.json"  # a run that stopped on non-finite metrics: a result (infinite loss)


def train_one(comparison, spec: RunSpec, workdir: str, quiet: bool = True) -> None:
  """Trains one run; one that diverges (non-finite loss, e.g. a grid's too-high LR) is recorded
  as diverged (``diverged.json``) and ranks last, instead of stopping the sweep."""
  from raptr_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  where = os.path.join(workdir, spec.key)
  cfg = run_config(comparison, spec, quiet)
  print(f"== budget {spec.budget:g} {cfg.budget.unit}, {spec.setting.label}, seed {spec.seed}: {where}")
  try:
    train_lib.train(cfg, where)
  except train_lib.TrainingError as e:
    if "non-finite" not in str(e):
      raise
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, DIVERGED), "w") as f:
      json.dump({"error": str(e)}, f)
    print(f"== {spec.key}: diverged, counted as an infinite loss (delete {where} to run it again): {e}")


def _command(comparison, workdir: str, *extra: str) -> list[str]:
  """This comparison's command (with the command line's seed and baseline options) plus ``extra``."""
  flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
           for k, v in comparison.overrides.items()]
  return [sys.executable, "-m", "raptr_jax.compare", f"--config={comparison.path}", f"--workdir={workdir}",
          *flags, *extra]


def _worker_command(comparison, workdir: str, spec: RunSpec) -> list[str]:
  return _command(comparison, workdir, f"--only={spec.key}")


def execute(comparison, specs: list[RunSpec], workdir: str, workers: int = 1, platform: str = "cpu",
            worker_devices: int = 1, quiet: bool = True) -> None:
  """Trains the runs of ``specs`` that are not finished: here, or on ``workers`` local worker
  processes with devices of their own."""
  pending = []
  for spec in specs:
    if finished(os.path.join(workdir, spec.key)):
      print(f"== {spec.key}: already complete")
    else:
      pending.append(spec)
  if workers <= 1:
    for spec in pending:
      train_one(comparison, spec, workdir, quiet)
    return
  _pool(comparison, pending, workdir, workers, platform, worker_devices)


def _pool(comparison, pending, workdir, workers, platform, worker_devices) -> None:
  """Keeps ``workers`` worker processes busy until every run is done; a failed run is reported
  at the end with its log, the others go on. SIGTERM / SIGINT are passed on to the workers
  (each checkpoints its run) before this process stops."""
  queue, running, failed, done = list(pending), {}, [], 0
  free = list(range(workers))

  def stop(signum, frame):  # pylint: disable=unused-argument
    for proc, _, _, _ in running.values():
      proc.send_signal(signal.SIGTERM)
    for proc, _, _, _ in running.values():
      proc.wait()
    sys.exit(f"comparison stopped by {signal.Signals(signum).name}: {len(running)} run(s) checkpointed, "
             f"{len(queue)} not started; re-run the same command to continue")

  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while queue or running:
      while queue and free:
        spec, slot = queue.pop(0), free.pop(0)
        where = os.path.join(workdir, spec.key)
        os.makedirs(where, exist_ok=True)
        log = open(os.path.join(where, "worker.log"), "a")  # pylint: disable=consider-using-with
        env = sweep.worker_env(platform, slot, worker_devices, os.environ) | {"RAPTR_PARENT_PID": str(os.getpid())}
        proc = subprocess.Popen(_worker_command(comparison, workdir, spec), stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        running[proc.pid] = (proc, spec, slot, log)
        print(f"== worker {slot}: {spec.key} (pid {proc.pid}; log {where}/worker.log)")
      time.sleep(0.2)
      for pid, (proc, spec, slot, log) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[pid]
        free.append(slot)
        done += 1
        if proc.returncode:
          failed.append(spec)
          print(f"== worker {slot}: {spec.key} FAILED (exit {proc.returncode}; see its worker.log)")
        else:
          print(f"== worker {slot}: {spec.key} done ({done}/{len(pending)})")
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if failed:
    logs = "\n".join(f"  {os.path.join(workdir, s.key, 'worker.log')}" for s in failed)
    raise ValueError(f"{len(failed)} of {len(pending)} runs failed; their logs:\n{logs}\n"
                     "fix the cause and re-run the same command (finished runs are skipped)")


def _die_with_parent() -> None:
  """In a worker of ``_pool`` (Linux): SIGTERM when the comparison process dies, even by
  SIGKILL, so the worker checkpoints and releases its run instead of training on unwatched."""
  parent = os.environ.get("RAPTR_PARENT_PID")
  if not parent:
    return
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: workers outlive a killed parent
    return
  if os.getppid() != int(parent):  # it died before the line above
    sys.exit("the comparison process that started this worker is gone")


def emit(comparison, specs: list[RunSpec], workdir: str, folder: str) -> str:
  """Writes one command per pending run into ``folder/runs.txt`` and a Slurm array over it."""
  pending = [s for s in specs if not finished(os.path.join(workdir, s.key))]
  os.makedirs(folder, exist_ok=True)
  commands = os.path.join(folder, "runs.txt")
  with open(commands, "w") as f:
    f.writelines(shlex.join(_worker_command(comparison, workdir, s)) + "\n" for s in pending)
  with open(os.path.join(folder, "slurm.sbatch"), "w") as f:
    f.write(f"""#!/bin/bash
# One array task per run of {comparison.path} ({len(pending)} pending). Submit from the directory
# the comparison was started in: sbatch {folder}/slurm.sbatch  (add your partition, GPUs, time)
#SBATCH --array=0-{max(len(pending) - 1, 0)}
#SBATCH --job-name=raptr-compare
#SBATCH --output={folder}/slurm-%A_%a.log
#SBATCH --signal=TERM@120
cd {shlex.quote(os.getcwd())}
eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands)})"
""")
  print(f"wrote {len(pending)} run command(s) to {commands} and a Slurm array {folder}/slurm.sbatch; when they "
        "are done, run this comparison again (without --emit) for the tables")
  return commands


def collect(specs: list[RunSpec], workdir: str) -> dict:
  """{(budget, Setting): {seed: (train, val, sets)} of its finished runs}."""
  results = {}
  for spec in specs:
    where = os.path.join(workdir, spec.key)
    entry = results.setdefault((spec.budget, spec.setting), {})
    if os.path.exists(os.path.join(where, DIVERGED)):
      entry[spec.seed] = (float("inf"), float("inf"), {})
    elif finished(where):
      rows = read_metrics(where)
      entry[spec.seed] = (*final_losses(rows), final_set_losses(rows))
  return results


def run_all(comparison, workdir: str, quiet: bool = True, workers: int = 1, platform: str = "cpu",
            worker_devices: int = 1, confirm: bool = False, emit_to: str = ""):
  """Runs (or emits) every run of the phases that is not finished (tuning, the chosen settings'
  final seeds, then the precision target's rounds); returns (the chosen settings' reported
  results {(budget, method): {seed: finals}}, every setting's tuning results {(budget, Setting):
  {seed: finals}}, the chosen {(budget, method): Setting}), or None after ``emit_to`` wrote
  pending runs."""
  tune = tuning_runs(comparison)
  here = workers <= 1 and not emit_to
  if not here and not comparison.path:
    raise ValueError("workers > 1 and emit re-run the comparison command on a config file; write the "
                     "comparison dict into a file's get_comparison() (as configs/compare_small.py) for them")
  preflight(comparison, tune, confirm, workdir, "tune", here)
  for phase in ("tune", "final"):
    specs = tune if phase == "tune" else final_runs(comparison, sweep.select_best(collect(tune, workdir),
                                                                                   comparison.settings))
    if phase == "final" and specs:
      preflight(comparison, specs, True, workdir, "final", here)
    if emit_to and any(not finished(os.path.join(workdir, s.key)) for s in specs):
      emit(comparison, specs, workdir, os.path.join(emit_to, phase))
      return None
    execute(comparison, specs, workdir, workers, platform, worker_devices, quiet)
  every = collect(tune, workdir)
  missing = [f"{s.label} at {b:g}" for (b, s), finals in every.items() if not finals]
  if missing:
    raise ValueError(f"runs without results: {', '.join(missing[:5])}; re-run the same command")
  best = sweep.select_best(every, comparison.settings)
  for _ in range(comparison.max_seeds or 0):  # the precision target: a round adds one seed or two
    specs = seed_round(comparison, best, workdir)
    if not specs:
      break
    print(f"== precision target: {len(specs)} run(s) with added seeds: " + ", ".join(s.key for s in specs))
    preflight(comparison, specs, True, workdir, "seeds", here)
    if emit_to:
      emit(comparison, specs, workdir, os.path.join(emit_to, "seeds"))
      return None
    execute(comparison, specs, workdir, workers, platform, worker_devices, quiet)
    stuck = [s.key for s in specs if not finished(os.path.join(workdir, s.key))]
    if stuck:
      raise ValueError(f"runs did not finish: {', '.join(stuck[:5])}; re-run the same command")
  return reported(comparison, best, workdir), every, best


def _seed_flags(parser, args, argv) -> dict:
  """{key: value} of the command line's seed and baseline options; one given twice is refused
  (argparse would keep the last silently)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  for key in compare_seeds.CLI_KEYS:
    flag = f"--{key}"
    if sum(a == flag or a.startswith(flag + "=") for a in argv) > 1:
      parser.error(f"{flag} is given twice")
  out = {}
  for key in compare_seeds.CLI_KEYS:
    value = getattr(args, key)
    if value is None:
      continue
    if key == "seeds":
      try:
        value = [int(v) for v in value.split(",") if v.strip()]
      except ValueError:
        parser.error(f"--seeds takes integers separated by commas (e.g. 0,1,2), got {getattr(args, key)!r}")
    out[key] = value
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.compare", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="comparison config, e.g. configs/compare_small.py")
  parser.add_argument("--workdir", default=None, help="default: runs/<comparison name>")
  parser.add_argument("--workers", type=int, default=1, help="runs at once, each in a worker process of its own")
  parser.add_argument("--platform", default="", help="the workers' devices: cpu | gpu | tpu (default: this one's)")
  parser.add_argument("--worker_devices", type=int, default=1, help="devices per worker")
  parser.add_argument("--emit", default="", help="write the pending runs' commands (and a Slurm array) here")
  parser.add_argument("--only", default="", help="train only this run (a worker's job)")
  parser.add_argument("--yes", action="store_true", help="run a sweep larger than max_runs")
  parser.add_argument("--seeds", dest="seeds", default=None,
                      help="the initial seeds, e.g. 0,1,2 (replaces the config's)")
  parser.add_argument("--seeds.until_ci", dest="seeds.until_ci", type=float, default=None,
                      help="precision target: add seeds while a paired interval contains 0 and is wider than this")
  parser.add_argument("--seeds.max", dest="seeds.max", type=int, default=None, help="the most seeds a method may get")
  parser.add_argument("--baseline", default=None, help="the method the others are compared with (paired by seed)")
  parser.add_argument("--prepare", default="", choices=("", "tune", "final", "seeds"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  overrides = _seed_flags(parser, args, argv)
  workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
  try:
    comparison = load_comparison(args.config, overrides)
    if args.prepare:  # a pool's preparation, in a process of its own (the parent holds no device)
      tune = tuning_runs(comparison)
      best = (lambda: sweep.select_best(collect(tune, workdir), comparison.settings))
      specs = {"tune": lambda: tune, "final": lambda: final_runs(comparison, best()),
               "seeds": lambda: seed_round(comparison, best(), workdir)}[args.prepare]()
      prepare_runs(comparison, specs)
      return
    if args.only:
      specs = every_run(comparison)
      if args.only not in specs:
        raise ValueError(f"--only={args.only!r} is not a run of {args.config}")
      _die_with_parent()
      train_one(comparison, specs[args.only], workdir)
      return
    platform = args.platform or (_this_platform() if args.workers > 1 else "cpu")
    out = run_all(comparison, workdir, workers=args.workers, platform=platform, worker_devices=args.worker_devices,
                  confirm=args.yes, emit_to=args.emit)
  except (ValueError, OSError, RuntimeError) as e:  # config, data, checkpoint, busy workdir, NaN: one message
    sys.exit(f"error: {e}")
  if out is None:
    return
  report = write_report(comparison, workdir, out)
  print(report.table)
  if report.settings_table:
    print(report.settings_table)
  for path in report.plots:
    print(f"plot: {path}")
  if report.undecided:
    print(f"undecided against {comparison.baseline}: {', '.join(report.undecided)}")


@dataclasses.dataclass(frozen=True)
class Report:
  table: str            # results.md: the chosen setting of each method at each budget
  settings_table: str   # all_settings.md when a method was tuned ("" otherwise)
  plots: list[str]      # loss curves, then tuning plots
  chosen: dict          # {(budget, method): {seed: (train, validation, {set: loss})}} as reported
  paired: dict          # {(budget, method): stats.Paired} of the final validation loss vs the baseline
  undecided: list[str]  # "method at budget (n=...)" still undecided under a precision target


def compare(comparison, workdir: str, quiet: bool = True, confirm: bool = False) -> Report:
  """Runs every pending run of ``comparison`` (a config file's path, a dict of its keys, or a
  loaded comparison) in this process and writes the tables and plots into ``workdir``: the
  comparison runner as a function (notebooks, scripts). Re-calling it skips finished runs."""
  if not isinstance(comparison, argparse.Namespace):
    comparison = load_comparison(comparison)
  return write_report(comparison, workdir, run_all(comparison, workdir, quiet=quiet, confirm=confirm))


def write_report(comparison, workdir: str, out) -> Report:
  chosen, every, best = out
  unit = load_config(comparison.config, comparison.common).budget.unit
  tried = compare_seeds.settings_tried(comparison)
  tuned = any(n > 1 for n in tried.values())
  notes, undecided = compare_seeds.precision_notes(comparison, chosen)
  biased = [m for m in comparison.methods if compare_seeds.is_tuned(comparison, m)
            and not compare_seeds.fresh_only(comparison, m)]
  if biased:
    notes.append(compare_report.BIASED_NOTE.format(methods=", ".join(biased)))
  table = write_tables(chosen, workdir, unit, {k: s.name for k, s in best.items()}, comparison.baseline,
                       tried if tuned else None, notes)
  settings_table = write_settings_table(every, workdir, unit, comparison.baseline) if tuned else ""
  rows = lambda spec: _rows(os.path.join(workdir, spec.key))
  curves = {b: {m: {seed: rows(RunSpec(b, best[(b, m)], seed)) for seed in chosen[(b, m)]}
                for m in comparison.methods if (b, m) in chosen} for b in map(float, comparison.budgets)}
  write_eval_points(curves, workdir, unit, {k: s.name for k, s in best.items()})
  paths = plot_curves(curves, workdir, unit)
  tuning = {(b, m): [(s.name, {seed: rows(RunSpec(b, s, seed)) for seed in comparison.seeds}, s == best[(b, m)])
                     for s in comparison.settings if s.method == m]
            for b in map(float, comparison.budgets) for m in comparison.methods}
  return Report(table, settings_table, paths + plot_tuning(tuning, workdir, unit), chosen,
                compare_seeds.paired_val(comparison, chosen), undecided)


def _rows(where: str) -> list[dict]:
  """A run's metrics rows ([] for a run that stopped before logging any)."""
  return read_metrics(where) if os.path.exists(os.path.join(where, "metrics.jsonl")) else []


def _this_platform() -> str:
  """This machine's JAX backend, asked of a subprocess (this one must not open the devices)."""
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                       text=True, check=False)
  backend = (out.stdout.strip().splitlines() or ["cpu"])[-1]
  return "gpu" if backend in ("cuda", "rocm") else backend


if __name__ == "__main__":
  main()
