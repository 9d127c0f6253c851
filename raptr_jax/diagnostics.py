"""Stability diagnostics of RaPTr (Panigrahi et al., 2024, Section 5, Definition 5.2, Fig. 3).

For a checkpoint and some validation batches, per layer l = 1..L of the stack:

* ``norm``: ||y^(l)||_2, the mean over (non-padding) tokens of the L2 norm of layer l's output
  (``norm[0]`` is the stack's input, the embeddings); Fig. 3(b) expects linear growth in l.
* ``psi``: Psi_l = ||F_{-l}(x) - F(x)||_2, F(x) the stack's output (before the final norm) and
  F_{-l} the network with layer l skipped, mean over tokens; Fig. 3(c) plots Psi_l / Psi_1.
* ``loss_drop``: L(F_{-l}); the loss gap L(F) - (1/L) sum_l L(F_{-l}) of Fig. 3(d) and
  Theorem 5.3 (negative: the full model is better than its L-1 subnetworks on average).

F_{-l} runs the other L - 1 layers with unit scales (``scaling="none"``) or with the h_sqrt
scales RaPTr trains with (``"sqrt"``). For T5, layer l is skipped in the stacks that
``model.select_stacks`` names, and norms / Psi are those of the last such stack.

    python -m raptr_jax.diagnostics --config=configs/bert.py --workdir=runs/bert [--step=N]

prints the table and writes ``diagnostics.json`` and ``stability.png`` into the workdir.
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raptr_jax.methods.raptr import sqrt_scales
from raptr_jax.models.core import StackedLayers
from raptr_jax.models.selection import LayerSelection, Selection

SEGMENT_FIELDS = {"layers": "segment_ids", "encoder_layers": "encoder_segment_ids",
                  "decoder_layers": "decoder_segment_ids"}


def _drop_layer(l: int, num_layers: int, scaling: str) -> Selection:
  kept = np.delete(np.arange(num_layers), l)
  scales = sqrt_scales(kept, num_layers) if scaling == "sqrt" else jnp.ones(len(kept))
  return Selection(layers=LayerSelection(jnp.asarray(kept, jnp.int32), scales))


def _outputs_fn(run):
  """(params, batch, selection) -> (loss, {stack: [k + 1, B, T, d] layer outputs})."""
  ctx = run.steps.ctx

  def outputs(params, batch, selection):
    model = nnx.merge(ctx.graphdef, params)
    children = nnx.iter_children(model) if hasattr(nnx, "iter_children") else model.iter_children()
    stacks = {name: m for name, m in children if isinstance(m, StackedLayers)}
    for m in stacks.values():
      m.record_outputs = True
    loss, _ = ctx.loss_fn(model, batch, selection, ctx.packed)
    recorded = nnx.to_pure_dict(nnx.state(model, nnx.Intermediate))
    return loss, {name: jax.tree.leaves(recorded[name]["layer_outputs"])[0] for name in stacks}

  return outputs


def stability(run, params, batches, scaling: str = "none") -> dict:
  """Per-layer norms, Psi_l and the loss gap of ``params`` over ``batches`` (numpy dicts)."""
  ctx = run.steps.ctx
  L = run.model_cfg.num_layers
  if run.cfg.model.family == "t5" and run.model_cfg.decoder_layers != L:
    raise ValueError("diagnostics skip layer l in both T5 stacks: give them the same depth")
  wrap = lambda sel: ctx.wrap_select(lambda key, batch, progress: sel)(jax.random.key(0), None, 0.0)
  outputs = jax.jit(_outputs_fn(run))
  full_sel = wrap(Selection(layers=LayerSelection.full(L)))
  order = ("layers", "encoder_layers") + (("decoder_layers",) if run.cfg.model.select_stacks != "encoder" else ())
  norms, psi, loss_full, loss_drop = 0.0, np.zeros(L), 0.0, np.zeros(L)
  for batch in batches:
    batch = run.device_batch(batch)
    loss, outs = outputs(params, batch, full_sel)
    stack = [k for k in order if k in outs][-1]
    tokens = (batch[SEGMENT_FIELDS[stack]] > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(tokens), 1.0)
    per_token = lambda y: jnp.sqrt(jnp.sum(jnp.square(y.astype(jnp.float32)), axis=-1))
    final = outs[stack][-1]
    norms = norms + np.asarray(jnp.sum(per_token(outs[stack]) * tokens, axis=(1, 2)) / count)
    loss_full += float(loss)
    for l in range(L):
      loss_l, outs_l = outputs(params, batch, wrap(_drop_layer(l, L, scaling)))
      psi[l] += float(jnp.sum(per_token(outs_l[stack][-1] - final) * tokens) / count)
      loss_drop[l] += float(loss_l)
  n = max(len(batches), 1)
  norms, psi, loss_full, loss_drop = norms / n, psi / n, loss_full / n, loss_drop / n
  return {"stack": stack, "scaling": scaling, "norm": [float(v) for v in norms], "psi": psi.tolist(),
          "psi_ratio": (psi / psi[0]).tolist() if psi[0] > 0 else None, "loss": loss_full,
          "loss_drop": loss_drop.tolist(), "loss_gap": float(loss_full - loss_drop.mean()),
          "mean_psi_over_output_norm": float(psi.mean() / norms[-1])}


def report(result) -> str:
  lines = [f"stack {result['stack']!r}, F_-l with scaling={result['scaling']}",
           f"{'l':>3s} {'||y^(l)||':>11s} {'Psi_l':>10s} {'Psi_l/Psi_1':>12s} {'L(F_-l)':>9s}",
           f"{0:3d} {result['norm'][0]:11.4f}"]
  ratio = result["psi_ratio"] or [float("nan")] * len(result["psi"])
  for l, (norm, psi, r, loss) in enumerate(zip(result["norm"][1:], result["psi"], ratio, result["loss_drop"]), 1):
    lines.append(f"{l:3d} {norm:11.4f} {psi:10.4f} {r:12.4f} {loss:9.4f}")
  lines.append(f"L(F) = {result['loss']:.4f}; mean_l L(F_-l) = {np.mean(result['loss_drop']):.4f}; "
               f"loss gap L(F) - mean_l L(F_-l) = {result['loss_gap']:+.4f}; "
               f"mean_l Psi_l / ||F|| = {result['mean_psi_over_output_norm']:.4f}")
  return "\n".join(lines)


def plot(result, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (no pyplot: no backend switch)
  L = len(result["psi"])
  fig = Figure(figsize=(12, 3.4))
  axes = fig.subplots(1, 3)
  axes[0].plot(range(L + 1), result["norm"], marker="o")
  axes[0].set(title="(b) ||y^(l)||", xlabel="layer l")
  if result["psi_ratio"]:
    axes[1].plot(range(1, L + 1), result["psi_ratio"], marker="o")
  axes[1].set(title="(c) Psi_l / Psi_1", xlabel="layer l")
  axes[2].bar(range(1, L + 1), np.asarray(result["loss_drop"]) - result["loss"])
  axes[2].set(title=f"(d) L(F_-l) - L(F); gap {result['loss_gap']:+.4f}", xlabel="skipped layer l")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.diagnostics", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:preset] of the run")
  parser.add_argument("--workdir", required=True, help="the run's workdir (its checkpoints/)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--batches", type=int, default=4, help="validation batches to average over")
  parser.add_argument("--scaling", choices=("none", "sqrt"), default="none")
  parser.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
  try:
    cfg = load_config(args.config, args.overrides)
    run = train_lib.setup(cfg, need_costs=False)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(args.workdir, "checkpoints"), 0, False, writer=False)
    step = args.step if args.step is not None else checkpointer.latest_step()
    if step is None:
      raise ValueError(f"no checkpoint in {args.workdir}/checkpoints; train first (python -m raptr_jax.main "
                       f"--config={args.config} --workdir={args.workdir})")
    state, _ = checkpointer.restore(step, run.abstract_state, train_lib.run_meta(cfg, run.model_cfg))
    checkpointer.close()
    val = pipeline.build_stream(cfg.data, "validation", cfg.data.batch_size, cfg.seed, train=False)
    batches = [b for _, b in zip(range(args.batches), val)]
    result = stability(run, state.params, batches, args.scaling) | {"step": step}
  except (ValueError, OSError, ckpt_lib.CheckpointError) as e:
    sys.exit(f"error: {e}")
  print(f"checkpoint {args.workdir}/checkpoints/{step}, {len(batches)} validation batches\n" + report(result))
  with open(os.path.join(args.workdir, "diagnostics.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.workdir, "stability.png"))
  print(f"wrote {args.workdir}/diagnostics.json and stability.png")


if __name__ == "__main__":
  main()
