"""Realized step time of RaPTr subnetworks against their analytic FLOP ratio, in one run.

    python bench/bench_subnetwork.py                     # the ~350M decoder: k = L/2, 2L/3 of L = 24
    python bench/bench_subnetwork.py --preset=tiny       # CPU smoke run
    python bench/bench_subnetwork.py --width             # also Attention-/MLP-RaPTr at half width
    python bench/bench_subnetwork.py --pld=0.5           # also PLD at a budget fraction (keep ~ theta(t))
    python bench/bench_subnetwork.py --stacking          # also layer-stacking depths L/4, L/2 (views)
    python bench/bench_subnetwork.py --random_ltd        # also random-LTD kept lengths S/8 .. S/2

Each variant is a stage of one plan (fixed-count k-of-L selections gathered from the stacked
params inside the jitted step), timed on the same device, params and batch as the full model,
in interleaved rounds (full, k1, k2, full, ...) so drift hits all alike. The analytic ratio is
``flops.StageFlops`` of the stage over the full step's: embedding, head and loss included, so
it is what a perfectly efficient k-layer step would take. The paper reports 0.84 t realized
against 0.83 t theoretical for UL2 (Section 4.2).
"""
import argparse
import statistics

import report
from bench_step import PRESETS, bench_config, time_step
from raptr_jax import train as train_lib
from raptr_jax.data.pipeline import synthetic_batch


def variants(cfg, fractions, width: bool, pld_at: float | None, stacking: bool = False,
             random_ltd: bool = False):
  """(name, config) pairs: one config per plan (depth stages share one, width axes one each)."""
  L = cfg.model.num_layers
  ks = sorted({max(1, round(f * L)) for f in fractions} - {L})
  depth = cfg.copy_and_resolve_references()
  depth.method.name = "raptr"
  n = len(ks) + 1
  depth.method.raptr.update(stages=tuple((k / L, (), 1.0 / n) for k in ks) + ((1.0, (), 1.0 - len(ks) / n),),
                            scaling="none")
  out = [("depth", depth)]
  if width:
    for axis, units in (("heads", cfg.model.num_heads), ("mlp", 4)):
      c = cfg.copy_and_resolve_references()
      c.method.name = "raptr"
      c.method.raptr.update(axis=axis, schedule=f"{units // 2}-{units}", lengths="equal")
      out.append((axis, c))
  if stacking:  # a depth-k stacking stage runs the k-layer view of the full parameters
    c = cfg.copy_and_resolve_references()
    depths = sorted({max(1, L // 4), max(1, L // 2)} - {L}) + [L]
    c.method.name = "stacking"
    c.method.stacking.update(depths=tuple(depths),
                             grow_at=tuple((i + 1) / len(depths) for i in range(len(depths) - 1)))
    out.append(("stacking", c))
  if random_ltd:  # kept lengths S/8, S/4, 3S/8, S/2 on all but the first and last layer
    c = cfg.copy_and_resolve_references()
    eighth = max(1, cfg.data.seq_len // 8)
    c.method.name = "random_ltd"
    c.method.random_ltd.update(min_value=eighth, max_value=5 * eighth, seq_per_step=eighth,
                               require_fraction=0.8, lr="budget")
    out.append(("random_ltd", c))
  if pld_at is not None:
    c = cfg.copy_and_resolve_references()
    c.method.name = "pld"
    out.append((f"pld@{pld_at:g}", c))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="350m", choices=sorted(PRESETS))
  parser.add_argument("--fractions", default="0.5,0.6667", help="k / L of the depth subnetworks")
  parser.add_argument("--width", action="store_true", help="also heads / MLP parts at half width")
  parser.add_argument("--pld", type=float, default=None, help="also PLD at this budget fraction")
  parser.add_argument("--stacking", action="store_true", help="also layer-stacking depths L/4 and L/2")
  parser.add_argument("--random_ltd", action="store_true", help="also random-LTD at S/8, S/4, 3S/8, S/2")
  parser.add_argument("--set", action="append", default=[], help="section.field=value override")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="", help="write the figures to this file")
  args = parser.parse_args()
  base = bench_config(args.preset, args.set)
  fractions = [float(f) for f in args.fractions.split(",")]
  rows, full_s, group_full = [], None, None
  for group, cfg in variants(base, fractions, args.width, args.pld, args.stacking, args.random_ltd):
    run = train_lib.setup(cfg)
    state = run.init()
    batch = run.device_batch(synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, run.model_cfg.vocab_size,
                                             family=cfg.model.family, target_len=cfg.data.target_len))
    fl = run.stage_flops
    # (label, stage, budget fraction) to time; PLD also at 0, where it keeps every layer.
    pld_run = group.startswith("pld")
    points = ([("all kept", run.plan.stages[0], 0.0), (f"at {args.pld:g}", run.plan.stages[0], args.pld)]
              if pld_run else [(s.name, s, 0.5) for s in run.plan.stages])
    times = {label: [] for label, _, _ in points}
    for r in range(args.rounds):
      for label, s, at in points:
        state, _, t, _ = time_step(run.steps.train_step(s), state, batch, args.warmup if r == 0 else 1,
                                   args.steps, at)
        times[label] += t
    medians = {label: statistics.median(t) for label, t in times.items()}
    if not pld_run:  # the plan's last stage is this group's full model
      group_full = medians[points[-1][0]]
      if full_s is None:
        full_s = group_full
        rows.append(("full model", full_s, 1.0, 1.0))
      points = points[:-1]
    for label, s, at in points:
      reference = group_full if not pld_run else full_s
      rows.append((f"{group}: {label}", medians[label], medians[label] / reference, fl(s, at) / fl.full))
  print(f"preset {args.preset}: {base.model.num_layers} layers, d={base.model.d_model}, batch {base.data.batch_size} "
        f"x seq {base.data.seq_len}; median of {args.rounds} x {args.steps} steps per variant")
  print(f"{'variant':40s} {'step ms':>9s} {'realized':>9s} {'analytic':>9s} {'diff':>7s}")
  for name, s, realized, analytic in rows:
    print(f"{name:40s} {s * 1e3:9.2f} {realized:9.3f} {analytic:9.3f} {(realized / analytic - 1):+7.1%}")
  report.write(args.json, {"preset": args.preset, "rows": [
      {"variant": name, "step_ms": s * 1e3, "realized": realized, "analytic": analytic} for name, s, realized, analytic in rows]})


if __name__ == "__main__":
  main()
