"""Builds RHO loss's irreducible-loss store: trains the IL model, then scores every training example.

    python -m raptr_jax.il_losses build --config=configs/bert.py:crammed_rho_loss [section.field=value ...]

1. The IL model: the run's config with ``method.name=baseline``, trained on the held-out share
   of the training data (``data.holdout_part=holdout``, ``data.holdout_share`` of the examples by
   id) for ``method.rho_loss.il_budget`` (0: the run's budget) in the run's budget unit, with
   ``method.rho_loss.il_overrides`` applied (default: the same architecture, as NTNG and
   Mindermann et al.). It trains in ``<store>.il_model/`` like any run: killed, it resumes.
2. One pass over every example of the other side (the examples RHO loss trains on), in corpus
   order, under the run's data config (so the masks are the ones training sees): each packed
   example's summed loss and loss weight under the IL model, saved in parts with the stream's
   position (``<store>.partial/``): killed, the pass resumes where it stopped.
3. The store (``data/il_store.py``) is renamed into place, with the data version it was built for
   and the IL model's cost (steps, wall-clock seconds, RST seconds when the budget is RST), which
   RHO loss reports but does not charge (NTNG Section 5.2: amortized over runs).

The store is reused by every run whose data version matches; another version is refused.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

from raptr_jax.data import il_store, pipeline


def il_model_config(cfg):
  """The IL model's run config from a RHO loss run's config."""
  from raptr_jax.config import apply_overrides, validate  # pylint: disable=g-import-not-at-top
  il = cfg.copy_and_resolve_references()
  il.method.name = "baseline"
  il.data.holdout_part = "holdout"
  if cfg.method.rho_loss.il_budget:
    il.budget.value = float(cfg.method.rho_loss.il_budget)
  apply_overrides(il, cfg.method.rho_loss.il_overrides)
  validate(il)
  return il


def _restore_params(il_cfg, workdir):
  from raptr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax import train  # pylint: disable=g-import-not-at-top
  run = train.setup(il_cfg, need_costs=False)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 0, False, writer=False)
  step = checkpointer.latest_step()
  state, meta = checkpointer.restore(step, run.abstract_state, train.run_meta(il_cfg, run.model_cfg))
  checkpointer.close()
  return run, state.params, meta


def build(cfg, store: str | None = None, save_every: int = 50, verbose: bool = True) -> str:
  """Builds (or finishes) the IL store of ``cfg`` (a ``rho_loss`` config); returns its path."""
  from raptr_jax import train  # pylint: disable=g-import-not-at-top
  path = store or il_store.default_path(cfg)
  if os.path.exists(os.path.join(path, "meta.json")):
    il_store.ILStore.load(path, cfg)  # refuses a store of other data
    if verbose:
      print(f"{path}: already built; delete it to rebuild")
    return path
  version, what = il_store.data_version(cfg)
  il_cfg = il_model_config(cfg)
  workdir = path + ".il_model"
  if verbose:
    print(f"IL model: {il_cfg.budget.value:g} {il_cfg.budget.unit} on the {cfg.data.holdout_share:.0%} "
          f"held-out share, in {workdir}")
  result = train.train(il_cfg, workdir)
  if result.get("stopped"):
    raise SystemExit(f"IL model training stopped at step {result['step']} (train.stop_at_step); re-run "
                     "this command to resume it")
  run, params, meta = _restore_params(il_cfg, workdir)
  # Scored in batches of 4 x data.batch_size rows; packed examples score the same in any row.
  stream = pipeline.build_stream(cfg.data, "train", 4 * cfg.data.batch_size, cfg.seed, train=False,
                                 holdout_part="rest")
  partial = il_store.PartialBuild(path, version)
  if partial.progress["data"] is not None:
    stream.set_state(partial.progress["data"])
  bar = None
  if verbose:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(desc="IL losses", unit=" examples", initial=partial.progress["examples"], dynamic_ncols=True,
               disable=None)
  pending, batches = [], 0
  from raptr_jax.methods.batch_selection import fetch  # pylint: disable=g-import-not-at-top
  for batch in stream:
    score = run.steps.score_step(batch["example_ids"].shape[1])
    losses, weights = (fetch(x) for x in score(params, run.device_batch(batch)))
    ids = batch["example_ids"][:, :losses.shape[1]]
    keep = ids >= 0
    pending.append((ids[keep], losses[keep], weights[keep]))
    batches += 1
    if bar is not None:
      bar.update(int(keep.sum()))
    if batches % save_every == 0:
      partial.add(*(np.concatenate(x) for x in zip(*pending)), stream.get_state())
      pending = []
  if pending:
    partial.add(*(np.concatenate(x) for x in zip(*pending)), stream.get_state())
  if bar is not None:
    bar.close()
  ids, loss_sum, weight = partial.arrays()
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"the training data has duplicate example ids ({len(ids) - len(np.unique(ids))}); "
                     "RHO loss joins by id and needs them unique")
  il_cost = {"steps": int(meta["step"]), "wall_s": float(meta.get("wall_s", 0.0)), "unit": il_cfg.budget.unit,
             "budget": float(il_cfg.budget.value), "eval_loss": result.get("eval/loss")}
  if il_cfg.budget.unit in ("rst_seconds", "rst_hours"):
    il_cost["rst_s"] = float(meta["progress"])
  il_store.write(path, ids, loss_sum, weight, {
      "version": version, "data": what, "examples": int(len(ids)), "il_model": il_cost,
      "il_workdir": os.path.abspath(workdir), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
      "mean_il_loss": float(loss_sum.sum() / max(weight.sum(), 1.0))})
  if verbose and jax.process_index() == 0:
    print(f"wrote {path}: {len(ids)} examples, mean IL loss {loss_sum.sum() / max(weight.sum(), 1.0):.4f} "
          f"(IL model: {il_cost['steps']} steps, {il_cost['wall_s']:.0f} s)")
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.il_losses", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="train the IL model and write the IL store of a rho_loss config")
  b.add_argument("--config", required=True, help="config file[:preset], e.g. configs/bert.py:tiny_rho_loss")
  b.add_argument("--store", default=None, help="store directory (default: method.rho_loss.store or il_store/<version>)")
  b.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
  try:
    cfg = load_config(args.config, args.overrides)
    if cfg.method.name != "rho_loss":
      raise ValueError(f"{args.config} runs method.name={cfg.method.name!r}; the IL store is for "
                       "rho_loss configs (e.g. configs/bert.py:crammed_rho_loss)")
    build(cfg, args.store)
  except (ValueError, OSError, ckpt_lib.CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
