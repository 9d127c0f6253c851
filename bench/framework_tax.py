"""The framework tax: the project's compiled train step against a plain-JAX step of the same model.

    python bench/framework_tax.py                        # d=512, 8 layers, seq 256, batch 8, float32
    python bench/framework_tax.py --variants=full        # the full model only
    python bench/framework_tax.py --preset=tiny --rounds=2 --steps=2     # seconds (the test's size)
    python bench/framework_tax.py --json=tax.json        # also write the figures

For each variant the project's train step (``train.setup`` on synthetic tokens: one causal row
per example, the default decoder, AdamW, the stage's selection drawn inside the step) and the
plain-JAX step of ``plain_jax.py`` (the same model, optimizer and subnetwork written out
directly) start from the same parameters and batch and are timed in interleaved rounds in this
one process (``--steps`` steps per round, blocked at the end of each round); the figure is the
ratio of their median step times. Variants:

* ``full``: the full model;
* ``raptr``: a RaPTr stage running k = L/2 of the L layers (first and last fixed, no output
  scaling), against the plain gather of k layers;
* ``random_ltd``: a random-LTD stage keeping r = S/2 tokens in every layer but the first and
  last, against the plain per-layer gather / scatter.

Before timing, each variant checks that the two compute the same thing: the full model's losses
over three steps from the same parameters agree (relative 1e-4 in float32); a subnetwork's loss
under the same layer / token draw agrees. Target (issue 35): the project's step within 5% of the
reference (ratio <= 1.05).
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import plain_jax
import report
from bench_step import bench_config
from bench_subnetwork import variants as plan_variants
from raptr_jax import train as train_lib
from raptr_jax.data.pipeline import synthetic_batch
from raptr_jax.models.selection import LayerSelection, Selection, TokenSelection

PRESETS = {
    "cpu": ["model.d_model=512", "model.num_layers=8", "model.num_heads=8", "model.head_dim=64",
            "model.mlp_dim=1536", "model.vocab_size=8192", "data.seq_len=256", "data.batch_size=8"],
    "tiny": ["model.d_model=64", "model.num_layers=4", "model.num_heads=2", "model.head_dim=32",
             "model.mlp_dim=128", "model.vocab_size=512", "data.seq_len=32", "data.batch_size=2"],
}
TOTAL_STEPS = 1000  # the budget the LR schedule is read at (both steps get the same LR)


def config(preset: str, overrides):
  # bench_step's tiny preset with the default decoder's architecture (gated MLP) and float32
  return bench_config("tiny", ["model.gated_mlp=True", "model.dtype=float32", "data.source=synthetic"]
                      + PRESETS[preset] + list(overrides))


def project_variant(cfg, name: str):
  """(run, stage) of the project for a variant: the full model, RaPTr at L/2, random-LTD at S/2."""
  if name == "full":
    run = train_lib.setup(cfg)
    return run, run.plan.stages[0]
  plans = dict(plan_variants(cfg, [0.5], width=False, pld_at=None, random_ltd=name == "random_ltd"))
  run = train_lib.setup(plans["depth" if name == "raptr" else name])
  if name == "raptr":
    return run, run.plan.stages[0]
  half = cfg.data.seq_len // 2
  return run, next(s for s in run.plan.stages if s.token_drop and s.token_drop["layers"][0] == half)


def reference_loss(name: str, cfg):
  L, S = cfg.model.num_layers, cfg.data.seq_len
  return {"full": plain_jax.full_loss, "raptr": plain_jax.raptr_loss(L // 2),
          "random_ltd": plain_jax.random_ltd_loss(S // 2)}[name]


def fresh_state(run, params):
  """The project's initial train state holding (a device copy of) ``params``."""
  return dataclasses.replace(run.init(), params=jax.tree.map(jnp.array, params))


@dataclasses.dataclass
class Pair:
  """A variant's project step and plain-JAX step on the same parameters and batch."""
  run: object
  stage: object
  step_fn: object     # the project's compiled train step of ``stage``
  params: dict        # host copy of the initial parameters both start from
  batch: dict         # the project's device batch
  ref_batch: dict     # the same tokens for the plain step
  ref_step: object
  opt_state: object   # the plain step's initial optimizer state


def setup_pair(name: str, cfg) -> Pair:
  run, stage = project_variant(cfg, name)
  params = jax.device_get(run.init().params)
  host = synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, run.model_cfg.vocab_size)
  lr_fn = run.steps.ctx.lr_fn
  tx = plain_jax.adamw(params, lambda count: lr_fn(count / TOTAL_STEPS))
  return Pair(run, stage, run.steps.train_step(stage), params, run.device_batch(host),
              {k: jnp.asarray(host[k]) for k in ("inputs", "targets")},
              plain_jax.make_step(reference_loss(name, cfg), tx), tx.init(params))


def check_same_model(name, cfg, pair: Pair):
  """Asserts the two compute the same: full-model losses over 3 steps, or a subnetwork's loss
  under one explicit draw. Returns (project state, plain params, plain optimizer state, what
  was compared) to time from (the steps donate their inputs)."""
  from flax import nnx
  run, params, batch, ref_batch = pair.run, pair.params, pair.batch, pair.ref_batch
  step_fn, ref_step, opt_state = pair.step_fn, pair.ref_step, pair.opt_state
  L, S, B = cfg.model.num_layers, cfg.data.seq_len, cfg.data.batch_size
  if name == "full":
    state = fresh_state(run, params)
    ref_params = jax.tree.map(jnp.array, params)
    ours, theirs = [], []
    for i in range(3):
      state, m = step_fn(state, batch, jax.random.key(i), jnp.float32(i / TOTAL_STEPS))
      ref_params, opt_state, loss = ref_step(ref_params, opt_state, ref_batch, jax.random.key(i))
      ours.append(float(m["loss"]))
      theirs.append(float(loss))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, err_msg="the project's and the plain step differ")
    return state, ref_params, opt_state, f"losses over 3 steps agree: {ours[-1]:.6f} vs {theirs[-1]:.6f}"
  model = nnx.merge(run.steps.ctx.graphdef, params)
  key = jax.random.key(7)
  if name == "raptr":
    idx = plain_jax.raptr_layers(key, L, L // 2)
    selection = Selection(layers=LayerSelection(idx, jnp.ones(idx.shape, jnp.float32)))
  else:
    idx = plain_jax.kept_tokens(key, L - 2, B, S, S // 2)
    selection = Selection(tokens=TokenSelection(idx, layers=tuple(range(1, L - 1))))
  ours, _ = run.steps.ctx.loss_fn(model, batch, selection, False)
  theirs = reference_loss(name, cfg)(params, ref_batch, key)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5, err_msg=f"{name}: losses under one draw differ")
  return fresh_state(run, params), jax.tree.map(jnp.array, params), opt_state, f"loss under one draw agrees: {float(ours):.6f}"


def measure(name: str, cfg, rounds: int, steps: int) -> dict:
  pair = setup_pair(name, cfg)
  step_fn, ref_step, batch, ref_batch = pair.step_fn, pair.ref_step, pair.batch, pair.ref_batch
  state, ref_params, opt_state, check = check_same_model(name, cfg, pair)
  first_call = {}
  for i in range(3):  # the compile, then a call on the step's own output layout, then one more
    t = time.perf_counter()
    state, m = step_fn(state, batch, jax.random.key(i), jnp.float32(0.5))
    jax.block_until_ready(m)
    first_call.setdefault("project", time.perf_counter() - t)
    t = time.perf_counter()
    ref_params, opt_state, loss = ref_step(ref_params, opt_state, ref_batch, jax.random.key(i))
    jax.block_until_ready(loss)
    first_call.setdefault("reference", time.perf_counter() - t)
  ours, theirs = [], []
  for r in range(rounds):  # interleaved, alternating which goes first
    for who in ((0, 1) if r % 2 == 0 else (1, 0)):
      t = time.perf_counter()
      for i in range(steps):
        key = jax.random.key(1000 * r + i)
        if who == 0:
          state, m = step_fn(state, batch, key, jnp.float32(0.5))
        else:
          ref_params, opt_state, loss = ref_step(ref_params, opt_state, ref_batch, key)
      jax.block_until_ready(m if who == 0 else loss)
      (ours if who == 0 else theirs).append((time.perf_counter() - t) / steps)
  project_s, reference_s = statistics.median(ours), statistics.median(theirs)
  return dict(variant=name, stage=pair.stage.name, project_ms=project_s * 1e3, reference_ms=reference_s * 1e3,
              ratio=project_s / reference_s, check=check, rounds=rounds, steps=steps,
              first_call_s=first_call)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--variants", default="full,raptr,random_ltd")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--set", action="append", default=[], help="section.field=value override")
  parser.add_argument("--json", default="", help="write the figures to this file")
  args = parser.parse_args(argv)
  cfg = config(args.preset, args.set)
  m = cfg.model
  print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}  jax {jax.__version__}")
  print(f"model: d={m.d_model}, {m.num_layers} layers, {m.num_heads} heads of {m.head_dim}, MLP {m.mlp_dim} (gated), "
        f"vocab {m.vocab_size}, seq {cfg.data.seq_len}, batch {cfg.data.batch_size}, {m.dtype}")
  rows = []
  for name in args.variants.split(","):
    row = measure(name, cfg, args.rounds, args.steps)
    rows.append(row)
    print(f"{name:>10} ({row['stage']}): project {row['project_ms']:.1f} ms, plain JAX {row['reference_ms']:.1f} ms, "
          f"ratio {row['ratio']:.3f}  [{row['check']}]", flush=True)
  print("\n| variant | project step | plain-JAX step | ratio |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} ({r['stage']}) | {r['project_ms']:.1f} ms | {r['reference_ms']:.1f} ms | {r['ratio']:.3f} |")
  figures = {"preset": args.preset, "overrides": args.set, "rows": rows}
  report.write(args.json, figures)
  return figures


if __name__ == "__main__":
  main()
