"""Interlocking backprop: step time of each mode on one device, pipelined over K devices, and
modelled on K devices.

    python bench/bench_interlocking.py                       # ~370M decoder, K = 4 components of 6
    python bench/bench_interlocking.py --preset=tiny --set model.num_layers=4   # CPU smoke run
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python bench/bench_interlocking.py --preset=tiny --set model.num_layers=4   # + pipelined (fake devices)

On one device, params and a synthetic batch, in interleaved rounds: the baseline train step and
the train step of each mode (local, 2-wise, ..., end-to-end with heads). Every mode computes the
same forward passes and heads; they differ in the backward work (pass-through input gradients),
so on one device n-wise costs at least the end-to-end step. The K-device time is the
``interlocking_time`` model (Figure 2's critical path) from per-component times measured on
this device; its ratio to end-to-end is the speed-up the paper claims for K accelerators (2-wise
under half of end-to-end at 4 components). With K or more devices each mode also runs pipelined
(``mesh.stage = K``, data parallel over the rest; ``methods/interlocking_pipeline.py``): one
step fills and drains the pipe (K forward + n backward component times against the model's
steady-state 2n), so its ratio to end-to-end is (K + n) / 2K where components dominate. Fake
CPU devices share the host's cores: their pipelined times check the path, not the speed.
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
from raptr_jax.methods import interlocking, interlocking_time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="350m", choices=sorted(PRESETS))
  parser.add_argument("--set", action="append", default=[], help="section.field=value override")
  parser.add_argument("--components", type=int, default=4)
  parser.add_argument("--aux_head_layers", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="", help="write the figures to this file")
  args = parser.parse_args()
  base_cfg = bench_config(args.preset, args.set)
  K = args.components
  b, n = base_cfg.data.batch_size, base_cfg.data.seq_len
  key, at = jax.random.key(0), jnp.float32(0.5)
  pipelined = jax.device_count() >= K and jax.device_count() % K == 0
  variants, runs = {}, {}
  for mode in ["baseline"] + list(range(1, K + 1)):
    for piped in (False, True) if mode != "baseline" and pipelined else (False,):
      cfg = base_cfg.copy_and_resolve_references()
      if mode != "baseline":
        cfg.method.name = "interlocking"
        cfg.method.interlocking.update(components=K, n=mode, aux_head_layers=args.aux_head_layers)
      if piped:
        cfg.mesh.update(data=jax.device_count() // K, stage=K, fsdp=1, tensor=1)
      run = train_lib.setup(cfg, need_costs=False)
      batch = run.device_batch(synthetic_batch(b, n, run.model_cfg.vocab_size, seed=0, family=cfg.model.family))
      state = run.init()
      step = run.steps.train_step(run.plan.stages[0])
      name = "baseline" if mode == "baseline" else {1: "local (1-wise)", K: "end-to-end + heads"}.get(mode, f"{mode}-wise")
      name += " pipelined" if piped else ""
      runs[name] = (run, state, batch)
      variants[name] = (step, batch)
  states = {name: runs[name][1] for name in variants}
  times = {name: [] for name in variants}
  for name, (step, batch) in variants.items():  # compile and warm up
    for _ in range(2):
      states[name], m = step(states[name], batch, key, at)
    jax.block_until_ready(m)
  for _ in range(args.rounds):
    for name, (step, batch) in variants.items():
      for _ in range(args.steps):
        t = time.perf_counter()
        states[name], m = step(states[name], batch, key, at)
        jax.block_until_ready(m)
        times[name].append(time.perf_counter() - t)
  run, _, batch = runs["local (1-wise)"]  # the steps donated their inputs: the latest states
  pieces = interlocking_time.measure(run, states["local (1-wise)"], batch, steps=args.steps)
  split = run.method.split()
  e2e = interlocking_time.step_time(interlocking.Split(split.sizes, K), pieces)
  base = statistics.median(times["baseline"])
  print(f"preset {args.preset}: {base_cfg.model.num_layers} layers in {K} components, heads of "
        f"{args.aux_head_layers} blocks, d={base_cfg.model.d_model}, batch {b} x seq {n}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; median of {args.rounds} x {args.steps}")
  piped_e2e = statistics.median(times["end-to-end + heads pipelined"]) if pipelined else None
  print(f"{'mode':22s} {'1 device':>11s} {'x baseline':>10s} {'K devices (model)':>18s} {'x end-to-end':>12s}"
        + (f" {'pipelined (' + str(jax.device_count()) + ' dev)':>20s} {'x end-to-end':>12s}" if pipelined else ""))
  singles = [name for name in variants if not name.endswith(" pipelined")]
  rows = []
  for mode, name in enumerate(singles):
    t = statistics.median(times[name])
    modelled = interlocking_time.step_time(interlocking.Split(split.sizes, mode), pieces) if mode else None
    tail = f"{modelled * 1e3:15.2f} ms {modelled / e2e:12.2f}" if modelled else ""
    if modelled and pipelined:
      p = statistics.median(times[name + " pipelined"])
      tail += f" {p * 1e3:17.2f} ms {p / piped_e2e:12.2f}"
    print(f"{name:22s} {t * 1e3:8.2f} ms {t / base:10.2f} {tail}")
    rows.append({"mode": name, "one_device_ms": t * 1e3, "x_baseline": t / base,
                 "k_devices_modelled_ms": modelled * 1e3 if modelled else None,
                 "x_end_to_end": modelled / e2e if modelled else None})
  print("per component (ms): " + ", ".join(
      f"{k} {[round(v * 1e3, 2) for v in getattr(pieces, k)]}" for k in ("forward", "backward", "backward_input",
                                                                        "head", "update")))
  report.write(args.json, {"preset": args.preset, "components": K, "rows": rows})


if __name__ == "__main__":
  main()
