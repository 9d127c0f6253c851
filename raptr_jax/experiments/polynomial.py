"""The polynomial experiment of RaPTr (Panigrahi et al., 2024, Section 3, Fig. 2, Appendix D.3).

Data: x uniform on {-1, +1}^d (d = 100); the label is a sum of basis polynomials
F*(x) = sum_{l <= k} sum_{j <= m} c_{l,j} prod_{i in S_{l,j}} x_i with c ~ N(0, 1) and S_{l,j} a
random l-subset of the first t = 20 variables, m = 20 per degree l = 1..k = 10. We divide F* by
sqrt(sum c^2) so that E[F*^2] = 1 (the evaluation loss is then the unexplained share of the
label's variance; the paper does not say how it scales F*).

Model: a 20-layer residual network whose blocks are one MLP with 4d hidden ReLU units, on the
d-dimensional input as residual stream, then a linear head to a scalar; square loss. The paper
does not say whether the blocks are normalised; we use pre-RMSNorm blocks (Section 5 shows
normalisation matters for the stability of subnetwork training).

Methods, all with the same optimizer, LR schedule, batch and steps:
* ``baseline``: the full network every step.
* ``raptr``: stages (p, I) = (8/20, {}), (12/20, {}), (16/20, {}), (20/20, {}) with lengths set
  for an average of 16 of 20 layers, 20% fewer layer-FLOPs (Appendix E: Proportional lengths
  give exactly 16 here), h_sqrt scaling; selections from ``methods/raptr.py``.
* ``pld``: progressive layer dropping with theta_bar = 0.6 (``methods/pld.py``); its expected
  FLOPs are ~81% of the baseline's (Algorithm 2's depth schedule keeps 1 - 0.4 * 19/40 of the
  layers once theta(t) reaches 0.6).

Component error (Section 3): c_hat_{l,j} = E_x[F(x) prod_{i in S_{l,j}} x_i], a Monte-Carlo mean
over ``eval_samples`` fresh inputs, and per degree sum_j (c - c_hat)^2 / sum_j c^2.

    python -m raptr_jax.experiments.polynomial --config=configs/polynomial.py --workdir=runs/polynomial

writes ``results.json``, ``table.md`` (final evaluation loss, FLOPs and per-degree error of each
method) and ``polynomial.png`` (Fig. 2: loss curves and per-degree errors over training).
"""
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from raptr_jax import plan as plan_lib
from raptr_jax.methods import pld, raptr
from raptr_jax.models.layers import rms_norm
from raptr_jax.models.selection import LayerSelection

METHODS = ("baseline", "raptr", "pld")


@dataclasses.dataclass(frozen=True)
class Target:
  coefficients: np.ndarray   # [k, m] float32, normalised so that E[F*^2] = 1
  subsets: np.ndarray        # [k, m, k] int32 variable indices; entries past degree l are -1

  def basis(self, x):
    """[n, k, m] values of every basis polynomial prod_{i in S} x_i at x [n, d] in {-1, +1}."""
    gathered = jnp.take(x, jnp.maximum(jnp.asarray(self.subsets), 0), axis=1)   # [n, k, m, k]
    return jnp.prod(jnp.where(jnp.asarray(self.subsets) >= 0, gathered, 1.0), axis=-1)

  def __call__(self, x):
    return jnp.einsum("nkm,km->n", self.basis(x), jnp.asarray(self.coefficients))


def make_target(seed: int, relevant: int, max_degree: int, per_degree: int) -> Target:
  rng = np.random.default_rng(seed)
  coefficients = rng.standard_normal((max_degree, per_degree))
  subsets = -np.ones((max_degree, per_degree, max_degree), np.int32)
  for l in range(1, max_degree + 1):  # m distinct monomials per degree (orthogonal components)
    if math.comb(relevant, l) < per_degree:
      raise ValueError(f"only {math.comb(relevant, l)} monomials of degree {l} on {relevant} variables; "
                       f"per_degree={per_degree} distinct ones do not exist")
    chosen = set()
    while len(chosen) < per_degree:
      chosen.add(tuple(np.sort(rng.choice(relevant, l, replace=False))))
    for j, subset in enumerate(sorted(chosen)):
      subsets[l - 1, j, :l] = subset
  coefficients /= np.sqrt(np.sum(coefficients ** 2))
  return Target(coefficients.astype(np.float32), subsets)


def sample_inputs(key, n: int, dim: int):
  return jnp.where(jax.random.bernoulli(key, 0.5, (n, dim)), 1.0, -1.0)


def init_params(key, dim: int, num_layers: int, hidden_mult: int):
  h = hidden_mult * dim
  k1, k2, k3 = jax.random.split(key, 3)
  return {"norm": jnp.ones((num_layers, dim)),
          "w1": jax.random.normal(k1, (num_layers, dim, h)) * (2.0 / dim) ** 0.5,
          "w2": jax.random.normal(k2, (num_layers, h, dim)) * (1.0 / h) ** 0.5 / (2 * num_layers) ** 0.5,
          "final_norm": jnp.ones((dim,)),
          "head": jax.random.normal(k3, (dim,)) * dim ** -0.5}


def forward(params, x, selection: LayerSelection | None = None):
  """F(x) [n] of the residual MLP; ``selection`` as in the transformer core: gathered layers,
  their branch scales, and ``active`` layers run under ``lax.cond``."""
  stack = {k: params[k] for k in ("norm", "w1", "w2")}
  num_layers = stack["w1"].shape[0]
  if selection is None:
    selection = LayerSelection.full(num_layers)
  else:
    stack = jax.tree.map(lambda a: jnp.take(a, selection.indices, axis=0), stack)

  def block(h, p, s):
    return h + s * jax.nn.relu(rms_norm(h, p["norm"], 1e-6) @ p["w1"]) @ p["w2"]

  def step(h, layer):
    p, s, active = layer
    if active is None:
      return block(h, p, s), None
    return jax.lax.cond(active, lambda h: block(h, p, s), lambda h: h, h), None

  h = jax.lax.scan(step, x, (stack, selection.scales, selection.active))[0]
  return rms_norm(h, params["final_norm"], 1e-6) @ params["head"]


def method_plan(name: str, cfg) -> plan_lib.Plan:
  """The plan of ``name`` (stages over the run's steps, from the methods' own modules)."""
  L, steps = cfg.model.num_layers, float(cfg.train.steps)
  if name == "baseline":
    return plan_lib.baseline_plan("steps", steps, 1)
  if name == "raptr":
    model = ml_collections.ConfigDict(dict(num_layers=L, num_heads=1, mlp_dim=1))
    return plan_lib.Plan(raptr.plan_stages(cfg.raptr, model), "steps", steps, 1)
  if name == "pld":
    return plan_lib.Plan(pld.plan_stages(cfg.pld, L), "steps", steps, 1)
  raise ValueError(f"unknown method {name!r}; the experiment runs {METHODS}")


def component_errors(f, target: Target, x):
  """Per-degree relative error of the coefficients estimated from ``f`` = F(x) [n] (Section 3)."""
  c_hat = jnp.einsum("n,nkm->km", f, target.basis(x)) / x.shape[0]
  c = jnp.asarray(target.coefficients)
  return jnp.sum((c - c_hat) ** 2, axis=1) / jnp.sum(c ** 2, axis=1)


def train_method(name: str, cfg, target: Target, eval_x, log=print) -> dict:
  """Trains one method; returns its curves (eval loss, per-degree errors) and FLOPs used."""
  plan = method_plan(name, cfg)
  c = cfg.train
  lr = optax.warmup_cosine_decay_schedule(0.0, c.lr, int(c.warmup * c.steps), c.steps, c.lr * c.final_lr)
  tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adam(lr))
  key = jax.random.key(cfg.seed)
  params = init_params(jax.random.fold_in(key, 1), cfg.data.dim, cfg.model.num_layers, cfg.model.hidden_mult)
  opt_state = tx.init(params)
  eval_y = target(eval_x)

  def make_step(select):
    @jax.jit
    def step(params, opt_state, step_key, progress):
      x = sample_inputs(jax.random.fold_in(step_key, 0), c.batch_size, cfg.data.dim)
      sel = None if select is None else select(jax.random.fold_in(step_key, 1), None, progress).layers
      loss, grads = jax.value_and_grad(lambda p: jnp.mean((forward(p, x, sel) - target(x)) ** 2))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      runs = jnp.float32(cfg.model.num_layers) if sel is None else (
          jnp.float32(sel.indices.shape[0]) if sel.active is None else jnp.sum(sel.active, dtype=jnp.float32))
      return optax.apply_updates(params, updates), opt_state, loss, runs
    return step

  evaluate = jax.jit(lambda p: (jnp.mean((forward(p, eval_x) - eval_y) ** 2), component_errors(forward(p, eval_x), target, eval_x)))
  steps_of = {}
  curve = {"step": [], "eval_loss": [], "degree_error": []}
  layers_run = jnp.float32(0.0)
  start = time.perf_counter()
  for i in range(c.steps):
    stage = plan.stages[plan.stage_index(i / c.steps)]
    if stage.shape not in steps_of:
      steps_of[stage.shape] = make_step(stage.select)
    params, opt_state, loss, runs = steps_of[stage.shape](params, opt_state, jax.random.fold_in(key, 100 + i),
                                                          jnp.float32(i / c.steps))
    layers_run = layers_run + runs
    if (i + 1) % c.eval_every == 0 or i + 1 == c.steps:
      ev, err = jax.device_get(evaluate(params))
      curve["step"].append(i + 1)
      curve["eval_loss"].append(float(ev))
      curve["degree_error"].append([float(e) for e in err])
      log(f"{name:8s} step {i + 1:6d}: train {float(loss):.4f}  eval {float(ev):.4f}  "
          f"degree errors {' '.join(f'{e:.2f}' for e in err)}")
  return {"method": name, "curve": curve, "wall_s": time.perf_counter() - start,
          "relative_layer_flops": float(layers_run) / (c.steps * cfg.model.num_layers),
          "stage_ends": [int(round(s.end * c.steps)) for s in plan.stages[:-1]]}


def table(results, max_degree: int) -> str:
  head = "| method | eval loss | layer FLOPs | " + " | ".join(f"deg {l}" for l in range(1, max_degree + 1)) + " |"
  rule = "|" + "---|" * (3 + max_degree)
  rows = [head, rule]
  for r in results:
    err = r["curve"]["degree_error"][-1]
    rows.append(f"| {r['method']} | {r['curve']['eval_loss'][-1]:.4f} | {r['relative_layer_flops']:.3f} | "
                + " | ".join(f"{e:.3f}" for e in err) + " |")
  return "\n".join(rows) + "\n"


def plot(results, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (no pyplot: no backend switch)
  k = len(results[0]["curve"]["degree_error"][0])
  degrees = sorted({1, max(1, k // 3), max(1, k // 2), k})
  fig = Figure(figsize=(4 * (2 + len(degrees)), 3.4))
  axes = fig.subplots(1, 2 + len(degrees))
  colors = {"baseline": "black", "raptr": "tab:blue", "pld": "tab:red"}
  for r in results:
    col, steps = colors.get(r["method"]), r["curve"]["step"]
    axes[0].plot(steps, r["curve"]["eval_loss"], label=r["method"], color=col)
    errs = np.asarray(r["curve"]["degree_error"])
    axes[1].plot(np.arange(1, errs.shape[1] + 1), errs[-1], marker="o", label=r["method"], color=col)
    for ax, l in zip(axes[2:], degrees):
      ax.plot(steps, errs[:, l - 1], label=r["method"], color=col)
    if r["method"] == "raptr":
      for ax in [axes[0], *axes[2:]]:
        for end in r["stage_ends"]:
          ax.axvline(end, color="grey", lw=0.8)
  axes[0].set(title="evaluation loss", xlabel="step", yscale="log")
  axes[1].set(title="final component error", xlabel="degree", ylim=(0, None))
  for ax, l in zip(axes[2:], degrees):
    ax.set(title=f"degree {l} component error", xlabel="step", ylim=(0, 1.05))
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run(cfg, workdir: str, log=print) -> list[dict]:
  """Runs every method of ``cfg.methods``; writes results.json, table.md and polynomial.png."""
  for m in cfg.methods:
    if m not in METHODS:
      raise ValueError(f"unknown method {m!r} in methods; choose from {METHODS}")
  d = cfg.data
  if not 1 <= d.max_degree <= d.relevant <= d.dim:
    raise ValueError(f"need 1 <= max_degree ({d.max_degree}) <= relevant ({d.relevant}) <= dim ({d.dim})")
  os.makedirs(workdir, exist_ok=True)
  target = make_target(cfg.seed, d.relevant, d.max_degree, d.per_degree)
  eval_x = sample_inputs(jax.random.key(cfg.seed + 1), cfg.train.eval_samples, d.dim)
  results = [train_method(m, cfg, target, eval_x, log) for m in cfg.methods]
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": cfg.to_dict(), "results": results}, f, indent=1, default=list)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table(results, d.max_degree))
  plot(results, os.path.join(workdir, "polynomial.png"))
  log(table(results, d.max_degree) + f"outputs in {os.path.abspath(workdir)}: results.json, table.md, polynomial.png")
  return results


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.experiments.polynomial",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/polynomial.py", help="config file[:preset]")
  parser.add_argument("--workdir", default="runs/polynomial")
  parser.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax.config import apply_overrides, import_config  # pylint: disable=g-import-not-at-top
  try:
    cfg = apply_overrides(import_config(args.config), args.overrides)
    run(cfg, args.workdir)
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
