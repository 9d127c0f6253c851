"""Cost of a batch-selection step (scoring passes + train step) against a baseline step, in one run.

    python bench/bench_selection.py --preset=bert_base   # crammed BERT of No Train No Gain
    python bench/bench_selection.py --preset=bert_tiny   # CPU smoke run (any bench_step preset)

On one device, params and synthetic batches, in interleaved rounds: the baseline train step; a
forward-only scoring pass of ``batch`` rows and of ``2 x batch`` rows (RHO loss's mega-batch),
each with its device-to-host copy; and the whole selective-backprop step as the loop runs it
(``SelectiveBackpropFeed.next_batch``: scoring passes, the host's keep decisions and gather, the
train step on the chosen rows, beta = 1). Reported: milliseconds per step and the ratio to the
baseline step. The analytic cost of a pass is about a third of a train step per row (forward
only), so selective backprop at beta = 1 (about 2 passes of ``batch`` rows) and RHO loss at 2x
(one pass of ``2 x batch``) both cost about 1.67 baseline steps before host overhead.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import report
from bench_step import PRESETS, bench_config
from raptr_jax import train as train_lib
from raptr_jax.data.pipeline import synthetic_batch
from raptr_jax.methods import batch_selection
from raptr_jax.methods.selective_backprop import SelectiveBackpropFeed


class CycleStream:
  """Synthetic candidate batches, a few distinct ones in turn."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def next_batch(self):
    self.i += 1
    return self.batches[self.i % len(self.batches)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="bert_base", choices=sorted(PRESETS))
  parser.add_argument("--set", action="append", default=[], help="section.field=value override")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="", help="write the figures to this file")
  args = parser.parse_args()
  cfg = bench_config(args.preset, args.set)
  run = train_lib.setup(cfg, need_costs=False)
  b, n, v = cfg.data.batch_size, cfg.data.seq_len, run.model_cfg.vocab_size
  make = lambda rows, seed: synthetic_batch(rows, n, v, seed=seed, family=cfg.model.family,
                                            target_len=cfg.data.target_len)
  batch = run.device_batch(make(b, 0))
  candidates = {rows: [make(rows, s) for s in range(3)] for rows in (b, 2 * b)}
  state = run.init()
  train_step = run.steps.train_step(run.plan.stages[0])
  score = run.steps.score_step(1)
  feed = SelectiveBackpropFeed(run, CycleStream(candidates[b]), seed=0, beta=1.0, history=5000)
  key, at = jax.random.key(0), jnp.float32(0.5)

  def baseline(state, i):
    state, m = train_step(state, batch, key, at)
    jax.block_until_ready(m)
    return state

  def scoring(rows):
    def fn(state, i):
      device = run.device_batch(candidates[rows][i % 3])
      batch_selection.fetch(score(state.params, device)[0])
      return state
    return fn

  def selective_backprop(state, i):
    chosen, _ = feed.next_batch(state.params, i)
    state, m = train_step(state, run.device_batch(chosen), key, at)
    jax.block_until_ready(m)
    return state

  variants = {"baseline train step": baseline, f"scoring pass, {b} rows": scoring(b),
              f"scoring pass, {2 * b} rows (RHO 2x)": scoring(2 * b),
              "selective backprop step (beta 1)": selective_backprop}
  times = {name: [] for name in variants}
  for name, fn in variants.items():  # compile and warm up
    state = fn(fn(state, 0), 1)
  for _ in range(args.rounds):
    for name, fn in variants.items():
      for i in range(args.steps):
        t = time.perf_counter()
        state = fn(state, i)
        times[name].append(time.perf_counter() - t)
  base = statistics.median(times["baseline train step"])
  print(f"preset {args.preset}: {cfg.model.num_layers} layers, d={cfg.model.d_model}, batch {b} x seq {n}, "
        f"{jax.devices()[0].device_kind}; median of {args.rounds} x {args.steps}")
  for name in variants:
    t = statistics.median(times[name])
    print(f"{name:40s} {t * 1e3:9.2f} ms  {t / base:5.2f} x baseline")
  rho = base + statistics.median(times[f"scoring pass, {2 * b} rows (RHO 2x)"])
  print(f"{'RHO loss step (2x: pass + train step)':40s} {rho * 1e3:9.2f} ms  {rho / base:5.2f} x baseline")
  passes = feed.totals["passes"] / (args.rounds * args.steps + 2)  # + the 2 warm-up steps
  print(f"selective backprop: {feed.totals['passes']} passes, share kept {feed.metrics()['select/share']:.2f}, "
        f"{passes:.2f} passes per step")
  medians = {name: statistics.median(t) for name, t in times.items()}
  report.write(args.json, {"preset": args.preset, "rows": [{"variant": name, "ms": t * 1e3, "x_baseline": t / base}
                                                           for name, t in medians.items()],
                           "rho_x_baseline": rho / base, "passes_per_step": passes})


if __name__ == "__main__":
  main()
