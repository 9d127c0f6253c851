"""Building a run from a config: mesh, model, optimizer, the method's plan, the step cache.

``setup(cfg)`` is shared by the training loop, RST calibration, diagnostics, benchmarks and the
tests. It asks the run's method (``methods.get_method(cfg.method.name)``) for its stages and
its LR modifier and never branches on the method's name. RST step costs are attached by the
caller (``rst.attach_step_costs``), so this module does not depend on the RST tables.
"""
import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from raptr_jax import flops as flops_lib
from raptr_jax import plan as plan_lib
from raptr_jax import sharding as shd
from raptr_jax import step as step_lib
from raptr_jax.config import validate
from raptr_jax.data.build import build_objective
from raptr_jax.data.corruption import mlm_max_predictions, target_length
from raptr_jax.data.vocab import load_vocabulary
from raptr_jax.methods import Method, get_method
from raptr_jax.models import get_family, model_config
from raptr_jax.optim import build_optimizer, decay_mask, learning_rate


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step (also used by tests and tools)."""
  cfg: object
  mesh: jax.sharding.Mesh
  model_cfg: object
  plan: plan_lib.Plan
  steps: step_lib.StepCache
  init: object
  abstract_state: object
  stage_flops: flops_lib.StageFlops   # model FLOPs of a step of each plan stage
  method: Method
  tools: dict = dataclasses.field(default_factory=dict)  # per-run objects of tools (a downstream scorer)

  def device_batch(self, batch, local: bool = False):
    """A numpy batch as global arrays on the mesh: this host's rows of a global batch, or
    (``local``) a batch of this host's rows only (a sharded stream, ``pipeline.HostStream``)."""
    return device_batch(batch, self.mesh, self.steps.ctx.batch_fields, local)

  def transition(self, state, old_index: int, new_index: int):
    """The train state after entering stage ``new_index`` from ``old_index`` (growth), one
    boundary at a time."""
    for i in range(old_index, new_index):
      state = self.method.transition(state, self.plan.stages[i], self.plan.stages[i + 1], self.steps.ctx)
    return state


def budget_in_units(cfg) -> tuple[str, float]:
  """(clock unit, budget): RST budgets given in hours run on a clock in seconds."""
  if cfg.budget.unit == "rst_hours":
    return "rst_seconds", float(cfg.budget.value) * 3600.0
  return cfg.budget.unit, float(cfg.budget.value)


def build_plan(cfg, model_cfg=None) -> plan_lib.Plan:
  """The plan of stages the run's method makes (``model_cfg``: default the ``model`` section)."""
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  unit, budget = budget_in_units(cfg)
  method = get_method(cfg.method.name, cfg)
  stages = method.stages(cfg, model_cfg if model_cfg is not None else cfg.model)
  scoring = method.scoring(cfg)
  if scoring is not None:
    scoring = dataclasses.replace(scoring, tokens=scoring.rows * cfg.data.seq_len)
  return plan_lib.Plan(tuple(stages), unit, budget, tokens_per_step, scoring=scoring,
                       free_scoring=bool(cfg.budget.free_scoring))


def device_batch(batch, mesh, fields, local: bool = False):
  """A numpy batch onto the mesh as global arrays, each device given exactly its rows (a TPU
  mesh orders devices along the torus, so a host's rows need not be one contiguous block).

  A global batch (every host holds all of it) keeps its row order on the mesh, which batch
  selection relies on (it reads scores back by row). A ``local`` batch is this host's rows only
  (``pipeline.HostStream``): they fill, in order, the rows the mesh gives this host's devices."""
  sharding = shd.batch_sharding(mesh)
  n = len(batch[fields[0]])
  total = n * jax.process_count() if local else n
  if local:
    mine = host_batch_rows(sharding, total)
    if len(mine) != n:
      raise ValueError(f"this host's devices hold {len(mine)} of the batch's {total} rows, but its stream shards give "
                       f"{n}: with several hosts reading their own shards, mesh.data x mesh.fsdp must be a multiple "
                       f"of the {jax.process_count()} hosts (or set data.shards=1: every host reads the whole stream)")
    position = np.zeros(total, np.int64)
    position[mine] = np.arange(n)
  out = {}
  for k in fields:
    x = np.asarray(batch[k])
    pick = (lambda idx, x=x: x[idx]) if not local else (
        lambda idx, x=x: x[(position[np.arange(total)[idx[0]]], *idx[1:])])
    out[k] = jax.make_array_from_callback((total, *x.shape[1:]), sharding, pick)
  return out


@functools.lru_cache(maxsize=8)
def host_batch_rows(sharding, rows: int) -> np.ndarray:
  """The batch rows (sorted) that this host's devices hold under ``sharding`` (once per
  sharding and batch size, not every step)."""
  held = set()
  for index in sharding.addressable_devices_indices_map((rows,)).values():
    held.update(range(*index[0].indices(rows)))
  return np.asarray(sorted(held), np.int64)


def setup(cfg, devices=None) -> Run:
  """Builds a run (model, optimizer, plan, steps); RST step costs are not attached here.
  ``devices``: the mesh's (default all; compile-only devices of a topology in ``aot.py``)."""
  validate(cfg)
  mesh = shd.make_mesh(cfg.mesh, devices)
  hosts = len({d.process_index for d in mesh.devices.flat})
  dp = shd.data_parallel_size(mesh)
  micro = cfg.train.microbatches
  if cfg.data.batch_size % dp:
    raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the data-parallel "
                     f"size {dp} (mesh.data x mesh.fsdp); use a multiple of {dp}")
  if (cfg.data.batch_size // micro) % dp:  # only with micro > 1: then B / micro must split over dp too
    raise ValueError(f"train.microbatches={micro} makes microbatches of {cfg.data.batch_size // micro} rows, not "
                     f"divisible by the data-parallel size {dp} (mesh.data x mesh.fsdp): every device takes "
                     f"rows of every microbatch; use data.batch_size = a multiple of {dp * micro}, or fewer "
                     "microbatches")
  if cfg.data.batch_size % hosts:
    raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the {hosts} hosts")
  if (cfg.data.batch_size // hosts) % micro:
    raise ValueError(f"train.microbatches={micro} does not divide the {cfg.data.batch_size // hosts} rows of each of "
                     f"the {hosts} hosts (every host gives rows to every microbatch); use data.batch_size = a "
                     f"multiple of {hosts * micro}, or fewer microbatches")
  synthetic = cfg.data.source == "synthetic"
  vocab = None if synthetic else load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids)
  if not (cfg.model.vocab_size or vocab):
    raise ValueError("model.vocab_size must be set when the data source has no vocabulary")
  derived = {}
  if cfg.model.family == "bert":
    derived["max_predictions"] = mlm_max_predictions(cfg.data.seq_len, cfg.data.mlm_rate,
                                                     cfg.data.max_predictions)
  if not synthetic:  # objective errors (lengths, sentinels) now, not in the data thread
    build_objective(cfg.data.objective, vocab, cfg.data)
  method = get_method(cfg.method.name, cfg)
  derived |= method.model_fields(cfg)
  mcfg = model_config(cfg.model, vocab.vocab_size if vocab else 0, **derived)
  family = get_family(cfg.model.family)
  factory = lambda model_cfg=mcfg: family.module(model_cfg, rngs=nnx.Rngs(params=cfg.seed))
  graphdef, abstract_params = nnx.split(nnx.eval_shape(factory))
  axes = shd.logical_axes_tree(abstract_params)
  pure = nnx.to_pure_dict(abstract_params)
  optimizer = build_optimizer(method.optimizer_config(cfg.optimizer), mask=decay_mask(pure, axes))
  if optimizer.hessian_interval and family.logits_fn is None:
    raise ValueError(f"optimizer.name={cfg.optimizer.name!r} samples labels from the model's logits, "
                     f"which model.family={cfg.model.family!r} does not expose; use adamw, lion or sophia_h")
  init = step_lib.init_fn(factory, optimizer.tx)
  abstract = jax.eval_shape(init)
  shardings = step_lib.state_shardings(abstract, axes, mesh, optimizer.tx)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  plan = build_plan(cfg, mcfg)
  stage_flops = flops_lib.StageFlops(cfg.model.family, mcfg, cfg.data.batch_size, cfg.data.seq_len,
                                     target_length(cfg.data))
  plan = dataclasses.replace(plan, layer_cost_share=stage_flops.layer_share,
                             layer_tokens=stage_flops.layer_tokens)
  if plan.scoring is not None:
    rows = plan.scoring.rows
    if rows % dp or rows % hosts:
      raise ValueError(f"{method.name}: a scoring pass scores {rows} rows, which do not divide over the "
                       f"data-parallel size {dp} and {hosts} host(s); choose the method's "
                       "candidate / mega-batch multiple so that data.batch_size x it is a multiple of both")
    plan = dataclasses.replace(plan, scoring=dataclasses.replace(
        plan.scoring, layer_tokens=stage_flops.full_layer_tokens * rows / cfg.data.batch_size))
  s = cfg.schedule
  lr_fn = method.lr_schedule(cfg, plan, functools.partial(
      learning_rate, name=s.name, peak=s.peak, warmup=s.warmup, final=s.final))

  @functools.cache
  def view_of(items):
    if items is None:
      return graphdef, None
    gd, abstract_view = nnx.split(nnx.eval_shape(lambda: factory(dataclasses.replace(mcfg, **dict(items)))))
    return gd, nnx.to_pure_dict(abstract_view)

  view = lambda fields: view_of(tuple(sorted(fields.items())) if fields else None)
  ctx = step_lib.StepContext(graphdef, view, family.loss_fn, family.logits_fn, optimizer, lr_fn, mesh,
                             shardings, mcfg.num_layers, family.batch_fields, packed=not synthetic,
                             wrap_select=lambda select: family.wrap_select(select, cfg.model),
                             method=method, axes=axes, model_cfg=mcfg, microbatches=micro)
  init_jit = jax.jit(init, out_shardings=shardings)
  return Run(cfg, mesh, mcfg, plan, step_lib.StepCache(ctx), init_jit, abstract, stage_flops, method)


def evaluate(run: Run, params, batches, stage=None, fraction: float = 0.0) -> float:
  """Mean token loss over ``batches`` of the model ``stage`` runs (None: the full model)."""
  step = run.steps.eval_step(stage)
  total, count = 0.0, 0.0
  for batch in batches:
    s, c = step(params, run.device_batch(batch), np.float32(fraction))
    total, count = total + s, count + c
  return float(total / max(float(count), 1.0))
