"""The pure train and eval steps, jitted with shardings and donation over the mesh.

``train_step(state, batch, key, progress) -> (state, metrics)``: ``progress`` is the budget
fraction at the start of the step (it sets the LR and any time schedule of the selection);
``key`` is the step's PRNG key, from which a stage's ``select`` draws its layer/token/width
selection, so one compiled step serves a whole stage.

A stage with a ``view`` (stacking, growth) runs the smaller model whose parameters are the
leading slices of the full parameter tree: its loss is a function of those slices only, so the
step costs what the smaller model costs, and the parameters outside the view (layers not yet
grown) are frozen: their values and optimizer state stay bit-identical (``optim.freeze_inactive``
with box masks). A method acts through its selection, its ``value_and_grad`` and its
``transform_updates`` (``methods/base.py``); the step never asks which method it runs.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from raptr_jax import sharding as shd
from raptr_jax.models.selection import selection_rows
from raptr_jax.optim import gnb_hessian_estimate, layer_activity, sophia_metrics



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything a step needs besides arrays: model structure, loss, optimizer, shardings."""
  graphdef: Any             # the full model
  view: Callable            # stage.view (dict | None) -> (graphdef, abstract view params | None)
  loss_fn: Callable
  logits_fn: Callable
  optimizer: Any            # raptr_jax.optim.Optimizer
  lr_fn: Callable           # budget fraction -> learning rate
  mesh: jax.sharding.Mesh
  state_shardings: Any
  num_layers: int
  batch_fields: tuple[str, ...]   # the batch arrays the family's loss reads
  packed: bool = True       # False: one causal row per example, no masks (benchmarks)
  wrap_select: Callable = lambda select: select  # family hook (t5: one selection per stack)
  method: Any = None        # methods.Method: per-step batch / loss / gradient transforms
  axes: Any = None          # logical axis names of each parameter (growth operators read them)
  model_cfg: Any = None     # models.ModelConfig of the full model
  microbatches: int = 1     # gradient accumulation: the batch's rows in this many scanned parts

  @property
  def tx(self):
    return self.optimizer.tx


def _fit(sharding: NamedSharding, shape) -> NamedSharding:
  """Keeps a param's sharding for a same-shaped state leaf, else replicates (factored stats)."""
  spec = tuple(sharding.spec)
  if len(spec) != len(shape):
    return NamedSharding(sharding.mesh, P())
  for axes, dim in zip(spec, shape):
    if axes is None:
      continue
    size = 1
    for a in (axes,) if isinstance(axes, str) else axes:
      size *= sharding.mesh.shape[a]
    if dim % size:
      return NamedSharding(sharding.mesh, P())
  return sharding


def init_fn(model_factory: Callable, tx) -> Callable:
  def init():
    params = nnx.to_pure_dict(nnx.state(model_factory(), nnx.Param))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def state_shardings(abstract_state: TrainState, axes_tree, mesh, tx) -> TrainState:
  params = shd.param_shardings(abstract_state.params, axes_tree, mesh)
  repl = shd.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda p, s: s, abstract_state.opt_state, params,
                              transform_non_params=lambda _: repl)
  opt = jax.tree.map(lambda s, a: _fit(s, a.shape) if isinstance(s, NamedSharding) else repl,
                     opt, abstract_state.opt_state)
  return TrainState(repl, params, opt)


def batch_shardings(mesh, fields):
  return {k: shd.batch_sharding(mesh) for k in fields}


def view_params(params, view_shapes):
  """The leading slices of each parameter that make up a view's (smaller) model."""
  if view_shapes is None:
    return params
  return jax.tree.map(lambda p, v: p if p.shape == v.shape else p[tuple(slice(0, n) for n in v.shape)],
                      params, view_shapes)


def view_activity(params, view_shapes):
  """Activity masks for ``optim.freeze_inactive``: True inside each parameter's view box."""
  def box(p, v):
    if p.shape == v.shape:
      return jnp.ones((), bool)
    inside = [jax.lax.broadcasted_iota(jnp.int32, p.shape, axis) < n for axis, n in enumerate(v.shape)]
    return functools.reduce(jnp.logical_and, inside)
  return jax.tree.map(box, params, view_shapes)


def split_microbatches(batch, count: int, mesh):
  """[B, ...] arrays -> [count, B / count, ...]: microbatch i is the rows i, i + count, ... (strided:
  on a mesh that splits B into contiguous blocks, every device holds rows of every microbatch, so
  each microbatch is as sharded as the batch)."""
  spec = shd.batch_sharding(mesh).spec
  def split(x):
    parts = jnp.moveaxis(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 1, 0)
    return jax.lax.with_sharding_constraint(parts, NamedSharding(mesh, P(None, *spec)))
  return jax.tree.map(split, batch)


def accumulate(grads_of, params, batch, selection, count: int, mesh):
  """Gradient accumulation: ``grads_of(params, batch, selection) -> ((loss, aux), grads)`` over
  ``count`` microbatches in a ``lax.scan``, each weighted by its share of the loss tokens, so the
  result is the full batch's token-mean loss and its gradient (up to float summation order).

  The selection is drawn once per step for the whole batch (RaPTr, PLD, growth: one subnetwork per
  optimizer step, as the papers define a step; random-LTD's per-example token draws are split with
  the rows: ``selection_rows``), so accumulating never changes what a step computes."""
  parts = split_microbatches(batch, count, mesh)
  shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], parts),
                          selection_rows(selection, 0, count))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

  def body(carry, xs):
    index, part = xs
    (loss, aux), grads = grads_of(params, part, selection_rows(selection, index, count))
    w = aux["loss_tokens"].astype(jnp.float32)
    aux = {k: (v if k in _SUMMED else jax.tree.map(lambda a: w * a, v)) for k, v in aux.items()}
    weighted = ((w * loss, aux), jax.tree.map(lambda g: w * g, grads))
    return jax.tree.map(lambda c, x: c + x.astype(jnp.float32), carry, weighted), None

  ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(count), parts))
  norm = 1.0 / jnp.maximum(aux["loss_tokens"], 1.0)
  aux = {k: (v if k in _SUMMED else jax.tree.map(lambda a: a * norm, v)) for k, v in aux.items()}
  grads = jax.tree.map(lambda g, p: (g * norm).astype(p.dtype), grads, params)
  return (loss * norm, aux), grads


_SUMMED = ("loss_sum", "loss_tokens")  # aux totals over the batch (the rest: token-weighted means)


def make_train_step(ctx: StepContext, stage, hessian: bool = False):
  """The jitted step of a stage; ``hessian=True`` adds Sophia-G's GNB pass on its own batch:
  ``train_step(state, batch, key, progress, hessian_batch)``."""
  opt = ctx.optimizer
  select = ctx.wrap_select(stage.select) if stage.select is not None else None
  graphdef, view_shapes = ctx.view(stage.view)
  model_of = lambda params: nnx.merge(graphdef, view_params(params, view_shapes))
  method = ctx.method
  loss_fn = ctx.loss_fn

  value_and_grad = None
  if method is not None and method.value_and_grad is not None:
    value_and_grad = method.value_and_grad(ctx, model_of)

  def train_step(state: TrainState, batch, key, progress, hessian_batch=None):
    selection = select(key, batch, progress) if select is not None else None

    def loss_of(params):
      return loss_fn(model_of(params), batch, selection, ctx.packed)

    def grads_of(params, batch, selection):
      if value_and_grad is not None:
        return value_and_grad(params, batch, selection)
      return jax.value_and_grad(lambda p: loss_fn(model_of(p), batch, selection, ctx.packed), has_aux=True)(params)

    if ctx.microbatches > 1:
      (loss, aux), grads = accumulate(grads_of, state.params, batch, selection, ctx.microbatches, ctx.mesh)
    else:
      (loss, aux), grads = grads_of(state.params, batch, selection)
    extra = {}
    if hessian:
      hkey = jax.random.fold_in(key, 1)
      hsel = select(hkey, hessian_batch, progress) if select is not None else None
      logits_of = lambda p: ctx.logits_fn(model_of(p), hessian_batch, hsel, ctx.packed)
      extra["hessian_estimate"] = gnb_hessian_estimate(
          logits_of, state.params, jax.random.fold_in(key, 2), hessian_batch["weights"],
          opt.hessian_grad_clip)
    if opt.needs_obj_fn:
      extra["obj_fn"] = lambda p: loss_of(p)[0]
    if view_shapes is not None:  # parameters outside the view (not yet grown) stay as they are
      extra["active"] = view_activity(state.params, view_shapes)
    elif opt.freeze_inactive and selection is not None and selection.layer_selections():
      extra["active"] = layer_activity(state.params, {
          k: s.mask(jax.tree.leaves(state.params[k])[0].shape[0])
          for k, s in selection.layer_selections().items()})
    updates, opt_state = opt.tx.update(grads, state.opt_state, state.params, **extra)
    if method is not None and method.transform_updates is not None:
      updates = method.transform_updates(updates, progress)
    lr = ctx.lr_fn(progress)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    metrics = {"loss": loss, "lr": lr, "grad_norm": optax.global_norm(grads),
               "update_norm": lr * optax.global_norm(updates), "loss_tokens": aux["loss_tokens"],
               **sophia_metrics(opt_state), **aux.get("method_metrics", {})}
    return TrainState(state.step + 1, params, opt_state), metrics

  repl = shd.replicated(ctx.mesh)
  in_shardings = (ctx.state_shardings, batch_shardings(ctx.mesh, ctx.batch_fields), repl, repl)
  if hessian:
    in_shardings += (batch_shardings(ctx.mesh, ctx.batch_fields),)
  return jax.jit(shd.on_mesh(train_step, ctx.mesh), in_shardings=in_shardings, out_shardings=(ctx.state_shardings, repl),
                 donate_argnums=(0,))


def make_eval_step(ctx: StepContext, stage=None):
  """Summed loss and token count of one batch under the model a stage has (the full model, or
  a stage's ``view`` with its ``eval_select`` masks): ``eval_step(params, batch, progress)``."""
  view = stage.view if stage is not None else None
  eval_select = stage.eval_select if stage is not None else None
  if eval_select is not None:
    eval_select = ctx.wrap_select(lambda key, batch, progress: stage.eval_select(progress))
  graphdef, view_shapes = ctx.view(view)

  def eval_step(params, batch, progress):
    model = nnx.merge(graphdef, view_params(params, view_shapes))
    selection = eval_select(jax.random.key(0), batch, progress) if eval_select is not None else None
    _, aux = ctx.loss_fn(model, batch, selection, ctx.packed)
    return aux["loss_sum"], aux["loss_tokens"]

  repl = shd.replicated(ctx.mesh)
  return jax.jit(shd.on_mesh(eval_step, ctx.mesh), in_shardings=(ctx.state_shardings.params, batch_shardings(ctx.mesh, ctx.batch_fields),
                                          repl), out_shardings=(repl, repl))


def make_score_step(ctx: StepContext, max_segments: int):
  """The forward-only scoring pass of batch selection: ``score_step(params, batch)`` -> the summed
  token loss and the loss weight of every packed example, ``[rows, max_segments]`` each (column
  ``s`` is segment ``s + 1`` of the row, the example whose id is ``example_ids[row, s]``), under
  the full model. A row's loss is the ratio of its sums (masked-token mean for MLM, per-target
  mean for span corruption)."""

  def score_step(params, batch):
    _, aux = ctx.loss_fn(nnx.merge(ctx.graphdef, params), batch, None, ctx.packed)
    per_row = jax.vmap(lambda values, segments: jax.ops.segment_sum(values, segments, max_segments + 1))
    losses = per_row(aux["token_loss"], aux["token_segment"])[:, 1:]
    weights = per_row(aux["token_weight"], aux["token_segment"])[:, 1:]
    return losses, weights

  rows = shd.batch_sharding(ctx.mesh)
  return jax.jit(shd.on_mesh(score_step, ctx.mesh), in_shardings=(ctx.state_shardings.params, batch_shardings(ctx.mesh, ctx.batch_fields)),
                 out_shardings=(rows, rows))


def eval_key(stage):
  """Stages that evaluate the same model share one compiled eval step."""
  if stage is None:
    return None
  view = tuple(sorted(stage.view.items())) if stage.view else None
  return (view, stage.shape if stage.eval_select is not None else None)


class StepCache:
  """One compiled train step per distinct (stage shape, with or without a Hessian pass), one
  eval step per distinct evaluated model, and the scoring pass of batch selection."""

  def __init__(self, ctx: StepContext):
    self.ctx = ctx
    self._steps = {}
    self._evals = {}
    self._score = {}

  def train_step(self, stage, hessian: bool = False):
    key = (stage.shape, hessian)
    if key not in self._steps:
      self._steps[key] = make_train_step(self.ctx, stage, hessian)
    return self._steps[key]

  def eval_step(self, stage=None):
    """``eval_step(params, batch, progress)`` of ``stage``'s model (None: the full model)."""
    key = eval_key(stage)
    if key not in self._evals:
      self._evals[key] = make_eval_step(self.ctx, stage)
    return self._evals[key]

  def score_step(self, max_segments: int):
    """``score_step(params, batch)`` of batch selection (``make_score_step``)."""
    if max_segments not in self._score:
      self._score[max_segments] = make_score_step(self.ctx, max_segments)
    return self._score[max_segments]

  @property
  def compiled_shapes(self):
    return tuple(self._steps)
