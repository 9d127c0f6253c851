"""The training loop's host share: its wall time per step against the compiled step's own time.

    python bench/host_share.py                                  # the default job (configs/ul2.py)
    python bench/host_share.py --variants=default,checkpoints --steps=60
    python bench/host_share.py --config=configs/ul2.py:tiny --steps=24 --window=6   # seconds

Each variant trains the config through ``train.train`` (the real loop: built-in corpus, the
prefetching stream, device transfers, metrics, TensorBoard, checkpoints) for ``--steps`` steps,
evaluation off, and reads its steady-state wall time per step from ``metrics.jsonl`` (the
loop's own ``step_time``, compiling steps left out; the first ``--window`` steps are dropped).
Then, in the same process, the same compiled functions run back to back on one device-resident
batch of the same stream: the train step (and Sophia-G's Hessian step at its interval, batch
selection's scoring passes at the run's measured passes per step). The host share is
``1 - device time / loop time``: what the loop adds per step (reading and packing data, the
device transfer, host decisions, metric fetches, checkpoint writes) that the device does not
hide. Target (issue 35): under 3% for the default decoder once compiled.

Variants: ``default``; ``selective_backprop`` (batch selection: scoring passes and host-side
keep decisions); ``sophia_g`` (a Hessian pass every 10 steps); ``checkpoints`` (a checkpoint
every 10 steps, asynchronous).
"""
import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

import report
from raptr_jax import train as train_lib
from raptr_jax.config import apply_overrides, load_config
from raptr_jax.data import pipeline
from raptr_jax.metrics import read_metrics
from raptr_jax.plan import is_hessian_step

VARIANTS = {
    "default": [],
    "selective_backprop": ["method.name=selective_backprop"],
    "sophia_g": ["optimizer.name=sophia_g"],
    "checkpoints": ["checkpoint.every=10"],
}


def variant_config(config: str, variant: str, steps: int, window: int, overrides):
  cfg = load_config(config)
  apply_overrides(cfg, ["budget.unit=steps", f"budget.value={steps}", f"log.every={window}", "eval.every=0",
                        "eval.at_start=False", "eval.batches=1", "log.progress_bar=False", "checkpoint.every=0"]
                  + VARIANTS[variant] + list(overrides))
  return cfg


def loop_time(cfg, workdir: str, window: int) -> tuple[float, dict]:
  """(seconds per step in the loop's steady state, its last steady-state metrics row)."""
  train_lib.train(cfg, workdir)
  rows = [r for r in read_metrics(workdir) if "step_time" in r and r["step"] > window]
  if not rows:
    raise SystemExit(f"no steady-state rows in {workdir}/metrics.jsonl: raise --steps above 2 x --window")
  return sum(r["step_time"] for r in rows) / len(rows), rows[-1]


def passes_per_step(plan, row) -> float:
  """Scoring passes per step of a batch-selection run, from the tokens it charged."""
  if plan.scoring is None:
    return 0.0
  plain = row["step"] * plan.tokens_per_step
  return max(0.0, row["tokens"] - plain) / plan.scoring.tokens / row["step"]


def device_time(cfg, loop_row: dict, steps: int) -> tuple[float, float]:
  """(seconds per step of the compiled functions alone, back to back on one device batch;
  scoring passes per step of the loop whose last metrics row is ``loop_row``)."""
  run = train_lib.setup(cfg)
  passes = passes_per_step(run.plan, loop_row)
  state = run.init()
  scoring = run.plan.scoring
  rows = scoring.rows if scoring else cfg.data.batch_size
  stream = pipeline.build_train_stream(cfg.data, rows, cfg.seed, 1, 0, 1)
  host = stream.next_batch()
  if scoring:
    train_rows = {k: v[:cfg.data.batch_size] for k, v in host.items()}
    batch = run.device_batch(train_rows)
    candidates = run.device_batch(host)
  else:
    batch = run.device_batch(host)
  stage = run.plan.stages[0]
  interval = run.steps.ctx.optimizer.hessian_interval

  def timed(fn, n):
    out = fn()
    jax.block_until_ready(out)  # compile
    out = fn()
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(n):
      out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n

  holder = {"state": state}

  def train_step(hessian=False):
    def call():
      args = (holder["state"], batch, jax.random.key(0), jnp.float32(0.5)) + ((batch,) if hessian else ())
      holder["state"], m = run.steps.train_step(stage, hessian)(*args)
      return m
    return call

  seconds = timed(train_step(), steps)
  if interval:
    hessian_s = timed(train_step(True), max(2, steps // interval))
    share = sum(is_hessian_step(i, interval) for i in range(steps)) / steps
    seconds = (1 - share) * seconds + share * hessian_s
  if scoring:
    from raptr_jax.data.pipeline import MAX_SEGMENTS  # pylint: disable=g-import-not-at-top
    score = run.steps.score_step(MAX_SEGMENTS)
    seconds += passes * timed(lambda: score(holder["state"].params, candidates), steps)
  return seconds, passes


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/ul2.py")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--steps", type=int, default=80, help="loop steps per variant")
  parser.add_argument("--window", type=int, default=20, help="steps per metrics row; the first is dropped")
  parser.add_argument("--set", action="append", default=[], help="section.field=value override")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  rows = []
  for variant in args.variants.split(","):
    cfg = variant_config(args.config, variant, args.steps, args.window, args.set)
    with tempfile.TemporaryDirectory() as workdir:
      loop_s, loop_row = loop_time(cfg, workdir, args.window)
    device_s, passes = device_time(cfg, loop_row, max(args.window, 10))
    row = dict(variant=variant, loop_ms=loop_s * 1e3, device_ms=device_s * 1e3, host_share=1 - device_s / loop_s,
               passes_per_step=passes)
    rows.append(row)
    print(f"{variant:>18}: loop {row['loop_ms']:.1f} ms/step, compiled functions {row['device_ms']:.1f} ms/step, "
          f"host share {row['host_share']:.1%}", flush=True)
  print("\n| variant | loop per step | compiled step | host share |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['loop_ms']:.1f} ms | {r['device_ms']:.1f} ms | {r['host_share']:.1%} |")
  figures = {"config": args.config, "steps": args.steps, "overrides": args.set, "rows": rows}
  report.write(args.json, figures)
  return figures


if __name__ == "__main__":
  main()
