"""Times a family's train step on synthetic tokens: step time, tokens/s, MFU. No TensorFlow.

    python bench/bench_step.py                       # the ~350M decoder of bench/README.md
    python bench/bench_step.py --preset=bert_base    # crammed BERT; t5_base: T5 v1.1-base
    python bench/bench_step.py --preset=tiny         # a CPU smoke run (bert_tiny, t5_tiny too)
    python bench/bench_step.py --set model.remat=dots --set data.batch_size=32

MFU = analytic model FLOPs per step (flops.py: causal attention counted at half, no remat
recompute) / measured step time / (devices x bf16 peak). Compilation is excluded; the median of
``--steps`` timed steps after ``--warmup`` is reported.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import report
from raptr_jax import flops as flops_lib
from raptr_jax import train as train_lib
from raptr_jax.config import base_config
from raptr_jax.data.pipeline import synthetic_batch
from raptr_jax.config import apply_overrides

PRESETS = {
    # ~370M parameters: d=1024, 24 layers, 16 heads, MLP 4096, vocab 32k, seq 1024, batch 16.
    "350m": dict(model=dict(d_model=1024, num_layers=24, num_heads=16, head_dim=64, mlp_dim=4096,
                            gated_mlp=False, vocab_size=32768),
                 data=dict(seq_len=1024, batch_size=16)),
    "tiny": dict(model=dict(d_model=128, num_layers=2, num_heads=2, head_dim=64, mlp_dim=512,
                            gated_mlp=False, vocab_size=1024),
                 data=dict(seq_len=128, batch_size=4)),
    # Crammed BERT of No Train No Gain (16 layers of BERT-base width, ~120M), sparse MLM head.
    "bert_base": dict(model=dict(family="bert", d_model=768, num_layers=16, num_heads=12, head_dim=64,
                                 mlp_dim=3072, gated_mlp=False, position="learned", max_len=512,
                                 tied_embeddings=True, vocab_size=32768),
                      data=dict(objective="mlm", seq_len=128, batch_size=256)),
    # T5 v1.1-base of No Train No Gain: 12 + 12 layers, inputs 512, targets 114.
    "t5_base": dict(model=dict(family="t5", d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12,
                               head_dim=64, mlp_dim=2048, gated_mlp=True, position="relative",
                               vocab_size=32128),
                    data=dict(objective="span_corruption", seq_len=512, target_len=114, batch_size=48)),
    "bert_tiny": dict(model=dict(family="bert", d_model=128, num_layers=2, num_heads=2, head_dim=64, mlp_dim=512,
                                 position="learned", vocab_size=1024),
                      data=dict(objective="mlm", seq_len=128, batch_size=4)),
    "t5_tiny": dict(model=dict(family="t5", d_model=128, num_layers=2, num_heads=2, head_dim=64, mlp_dim=512,
                               position="relative", vocab_size=1024),
                    data=dict(objective="span_corruption", seq_len=128, target_len=32, batch_size=4)),
}


def bench_config(preset: str, overrides: list[str]):
  cfg = base_config()
  cfg.data.source = "synthetic"
  for section, values in PRESETS[preset].items():
    cfg[section].update(values)
  return apply_overrides(cfg, overrides)


def time_step(step_fn, state, batch, warmup: int, steps: int, progress: float = 0.5):
  """(state, compile seconds, per-step seconds, last metrics) of ``steps`` timed steps after
  the compiling call and ``warmup`` untimed ones; every step draws its own selection key."""
  t = time.perf_counter()
  state, m = step_fn(state, batch, jax.random.key(0), jnp.float32(progress))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  for i in range(warmup):
    state, m = step_fn(state, batch, jax.random.key(1 + i), jnp.float32(progress))
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step_fn(state, batch, jax.random.key(100 + i), jnp.float32(progress))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return state, compile_s, times, m


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="350m", choices=sorted(PRESETS))
  parser.add_argument("--set", action="append", default=[], help="section.field=value override")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--json", default="", help="write the figures to this file")
  args = parser.parse_args()
  cfg = bench_config(args.preset, args.set)
  run = train_lib.setup(cfg)
  state = run.init()
  step_fn = run.steps.train_step(run.plan.stages[0])
  batch = run.device_batch(synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, run.model_cfg.vocab_size,
                                           family=cfg.model.family, target_len=cfg.data.target_len))
  state, compile_s, times, m = time_step(step_fn, state, batch, args.warmup, args.steps)
  step_s = statistics.median(times)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  flops = flops_lib.family_train_flops(cfg.model.family, run.model_cfg, cfg.data.batch_size, cfg.data.seq_len,
                                      cfg.data.target_len)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  peak = flops_lib.device_peak_flops()
  mfu = f"{flops / step_s / (peak * jax.device_count()):.1%}" if peak else "n/a (unknown device peak)"
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}  jax {jax.__version__}")
  print(f"model: {cfg.model.family}, {params / 1e6:.0f}M params, {cfg.model.num_layers} layers, d={cfg.model.d_model}, "
        f"batch {cfg.data.batch_size} x seq {cfg.data.seq_len}, dtype {cfg.model.dtype}, remat {cfg.model.remat}")
  print(f"compile {compile_s:.1f}s | step {step_s * 1e3:.1f} ms (median of {args.steps}) | "
        f"{tokens / step_s:,.0f} tokens/s | {flops / step_s / 1e12:.1f} TFLOP/s | MFU {mfu} | loss {float(m['loss']):.3f}")
  report.write(args.json, {"preset": args.preset, "parameters": params, "compile_s": compile_s, "step_ms": step_s * 1e3,
                           "tokens_per_s": tokens / step_s, "tflops": flops / step_s / 1e12,
                           "mfu": flops / step_s / (peak * jax.device_count()) if peak else None})


if __name__ == "__main__":
  main()
