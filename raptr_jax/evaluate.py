"""Downstream evaluation of a checkpoint: zero- / few-shot ranking, LAMBADA, fine-tuning.

    python -m raptr_jax.evaluate --config=configs/ul2.py --workdir=runs/ul2            # every task
    python -m raptr_jax.evaluate --config=configs/ul2.py --workdir=runs/ul2 --tasks=piqa,copa,lambada --shots=0,1,5
    python -m raptr_jax.evaluate --config=configs/bert.py --workdir=runs/bert --tasks=finetune_rt,finetune_boolq

The checkpoint is the newest one in ``WORKDIR/checkpoints`` written under the same config
(any method: evaluation runs the full model), or ``--step``. Ranking tasks
(``downstream/tasks.py``: hellaswag, piqa, arc_easy, arc_challenge, boolq, winogrande, copa)
report ``acc`` and ``acc_norm`` at each of ``--shots``; ``lambada`` its last-word ``acc`` and
``ppl`` (decoder and UL2 models; T5 ranks too, LAMBADA is for decoders); ``finetune_rt`` and
``finetune_boolq`` fine-tune a copy of the model (BERT with a classification head, T5 text to
text, decoders on the label word; ``downstream/finetune.py``). ``--limit`` caps the questions
per task (the first ones, in the sets' order). The data comes from PyPI wheels fetched once into
a cache (``downstream/fetch.py``). Results go to ``WORKDIR/downstream/results.md`` and
``results.json`` only when every task is done, so a partial evaluation never looks finished.
"""
import argparse
import datetime
import json
import os
import sys

from raptr_jax.downstream.suite import metrics_row, run_tasks  # noqa: F401  (re-exported)
from raptr_jax.downstream.tasks import FINETUNE, TASKS, parse_tasks  # noqa: F401  (re-exported)

def markdown(results: dict, header: str) -> str:
  lines = [header, "", "| task | metric | value | n | chance |", "|---|---|---|---|---|"]
  for task, r in results.items():
    for m in ("acc", "acc_norm", "ppl", "f1"):
      if m in r:
        chance = f"{r['chance']:.3f}" if "chance" in r and m != "ppl" else "-"
        lines.append(f"| {task} | {m} | {r[m]:.4f} | {r['n']} | {chance} |")
  return "\n".join(lines) + "\n"


def restore(cfg, workdir: str, step: int | None = None):
  """(run, step, the full model's params, checkpoint meta) of the newest checkpoint of
  ``workdir`` written under ``cfg`` (or of ``step``); a workdir that holds only an import
  (``python -m raptr_jax.hf import``) gives the imported parameters at step 0."""
  from raptr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax import pretrained  # pylint: disable=g-import-not-at-top
  from raptr_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  cfg, source = pretrained.resolve(cfg, workdir)
  run = train_lib.setup(cfg, need_costs=False)
  where = os.path.join(workdir, "checkpoints")
  if not ckpt_lib.Checkpointer.has_steps(where) and step in (None, 0) and pretrained.has_import(workdir):
    return run, 0, pretrained.load(run, run.init(), source).params, {"progress": 0.0, "stage": 0}
  checkpointer = ckpt_lib.Checkpointer(where, 0, False, writer=False)
  try:
    if not checkpointer.all_steps():
      raise ValueError(f"no checkpoint in {where}; train first (python -m raptr_jax.main --config=... "
                       f"--workdir={workdir}) or give the --workdir of a trained run")
    expected = train_lib.run_meta(cfg, run.model_cfg)
    if step is None:
      step, state, meta, _ = checkpointer.restore_latest(run.abstract_state, expected)
    else:
      if step not in checkpointer.all_steps():
        raise ValueError(f"no checkpoint of step {step} in {where}; it has {checkpointer.all_steps()}")
      state, meta = checkpointer.restore(step, run.abstract_state, expected)
  finally:
    checkpointer.close()
  return run, step, state.params, meta


def evaluate_checkpoint(cfg, workdir: str, names, shots=(0,), limit: int = 0, step: int | None = None,
                        cache: str = "", progress: bool = True, output: str = "") -> dict:
  """Restores the checkpoint of ``workdir`` (the newest, or ``step``), runs the tasks and writes
  the tables; returns the results."""
  names = parse_tasks(names, cfg.model.family)
  run, step, params, meta = restore(cfg, workdir, step)
  results = run_tasks(run, params, names, shots, limit, cache, progress, cfg)
  out = output or os.path.join(workdir, "downstream")
  os.makedirs(out, exist_ok=True)
  record = {"step": step, "progress": meta.get("progress"), "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "tasks": results, "limit": limit, "shots": list(shots)}
  header = (f"Downstream results of {workdir} at step {step} ({cfg.model.family}, {cfg.method.name}"
            f"{f', first {limit} questions per task' if limit else ''})")
  for name, text in (("results.json", json.dumps(record, indent=1)), ("results.md", markdown(results, header))):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.evaluate", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="the run's config file[:preset]")
  parser.add_argument("--workdir", required=True, help="the run's workdir (its checkpoints)")
  parser.add_argument("--tasks", default="all", help=f"comma list of {', '.join(TASKS)}; or all, cheap")
  parser.add_argument("--shots", default="0", help="comma list of k for ranking tasks, e.g. 0,1,5")
  parser.add_argument("--limit", type=int, default=0, help="questions per task (0: all)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--output", default="", help="folder for results.md / .json (default WORKDIR/downstream)")
  parser.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
  try:
    shots = [int(k) for k in args.shots.split(",") if k.strip()]
    if any(k < 0 for k in shots):
      raise ValueError(f"--shots takes k >= 0, got {args.shots!r}")
    cfg = load_config(args.config, args.overrides)
    results = evaluate_checkpoint(cfg, args.workdir, args.tasks, shots, args.limit, args.step,
                                  cfg.downstream.cache_dir, True, args.output)
  except (ValueError, OSError, RuntimeError) as e:  # FetchError is an OSError
    sys.exit(f"error: {e}")
  print(markdown(results, f"{args.workdir}"))
  print(f"tables in {args.output or os.path.join(args.workdir, 'downstream')}/results.md and results.json")


if __name__ == "__main__":
  main()
