"""The downstream tasks of a model in one call: what the evaluate command and a training run's
eval cadence (``downstream.tasks``) both run."""
import functools

from raptr_jax.downstream import tasks as tasks_lib
from raptr_jax.downstream.tasks import FINETUNE


@functools.lru_cache(maxsize=16)
def _questions(task: str, cache: str):
  return tasks_lib.load_lambada(cache) if task == "lambada" else tasks_lib.load_ranking(task, cache)


def load(names, cache: str = "") -> None:
  """Fetches and parses the data of the scoring tasks in ``names`` now (a training run calls
  this before its first step, so a failed fetch stops it there, not at its first eval)."""
  for task in names:
    if task not in FINETUNE:
      _questions(task, cache)


def run_tasks(run, params, names, shots=(0,), limit: int = 0, cache: str = "", progress: bool = True,
              finetune_cfg=None) -> dict:
  """{"<task>[_<k>shot]": {metric: value}} of ``names`` for the model of ``run`` with ``params``."""
  from raptr_jax.downstream import zero_shot  # pylint: disable=g-import-not-at-top
  from raptr_jax.downstream.scoring import Scorer  # pylint: disable=g-import-not-at-top
  results, scorer = {}, None
  for task in names:
    if task in FINETUNE:
      from raptr_jax.downstream import finetune  # pylint: disable=g-import-not-at-top
      results[task] = finetune.run_task(run, params, task, finetune_cfg, limit=limit, cache=cache, progress=progress)
      continue
    if scorer is None:  # one per run (its compiled buckets serve every eval of a training run)
      scorer = run.tools.get("downstream_scorer")
      if scorer is None:
        scorer = run.tools["downstream_scorer"] = Scorer(run, params, progress=progress)
      scorer.params, scorer.progress = params, progress
    items = _questions(task, cache)
    items = items[:limit] if limit else items
    if task == "lambada":
      results[task] = zero_shot.lambada(scorer, items)
    else:
      for k in shots:
        results[f"{task}_{k}shot"] = zero_shot.rank(scorer, items, k, task)
  return results


def metrics_row(results: dict) -> dict:
  """{"downstream/<task>/<metric>": value} for a metrics row."""
  return {f"downstream/{task}/{m}": v for task, r in results.items() for m, v in r.items()
          if m in ("acc", "acc_norm", "ppl", "f1")}
