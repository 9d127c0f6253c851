"""The training loop: plan -> stages -> steps, with eval, checkpoints and metrics.

    state = init or restore(workdir)
    while progress < budget:
      stage = plan.stage_at(progress / budget)
      state, metrics = step_for(stage)(state, batch, key(step), progress / budget)
      progress += plan.charge(stage, hessian, fraction)
      log / eval / checkpoint at their cadences

All randomness is a function of (seed, step) and the data stream's saved position, so a run that
is killed and re-started with the same workdir reaches the same losses as one that was not.
"""
import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raptr_jax import checkpoint as ckpt_lib
from raptr_jax import flops as flops_lib
from raptr_jax import metrics as metrics_lib
from raptr_jax import plan as plan_lib
from raptr_jax import rst
from raptr_jax import sharding as shd
from raptr_jax import step as step_lib
from raptr_jax.config import validate
from raptr_jax.data import objectives, pipeline
from raptr_jax.methods import pld, raptr
from raptr_jax.data.corruption import mlm_max_predictions, target_length
from raptr_jax.data.vocab import load_vocabulary
from raptr_jax.models import get_family, model_config
from raptr_jax.optim import build_optimizer, decay_mask, learning_rate


class TrainingError(RuntimeError):
  pass


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

  def device_batch(self, batch):
    """This host's rows of a global numpy batch as global arrays on the mesh."""
    return device_batch(batch, self.mesh, self.steps.ctx.batch_fields)


def budget_in_units(cfg) -> tuple[str, float]:
  """(clock unit, budget): RST budgets given in hours run on a clock in seconds."""
  if cfg.budget.unit == "rst_hours":
    return "rst_seconds", float(cfg.budget.value) * 3600.0
  return cfg.budget.unit, float(cfg.budget.value)


def build_plan(cfg) -> plan_lib.Plan:
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  unit, budget = budget_in_units(cfg)
  if cfg.method.name in ("raptr", "pld"):
    if cfg.model.family == "t5" and cfg.model.num_decoder_layers not in (0, cfg.model.num_layers):
      raise ValueError(f"{cfg.method.name} on t5 draws one schedule for both stacks: give them the same depth")
    if cfg.method.name == "raptr":
      stages = raptr.plan_stages(cfg.method.raptr, cfg.model)
    else:
      stages = pld.plan_stages(cfg.method.pld, cfg.model.num_layers)
    return plan_lib.Plan(stages, unit, budget, tokens_per_step)
  return plan_lib.baseline_plan(unit, budget, tokens_per_step)


def lr_decay_start(cfg, plan: plan_lib.Plan) -> float:
  """RaPTr's paper LR: constant across stages, decaying over the final full-model stage."""
  if cfg.method.name == "raptr" and cfg.method.raptr.lr == "paper" and len(plan.stages) > 1:
    return plan.stages[-2].end
  return 0.0


def setup(cfg, need_costs: bool = True) -> Run:
  """Builds a run; RST runs (unless ``need_costs=False``, as for calibration) read their step
  costs from the calibration table."""
  validate(cfg)
  mesh = shd.make_mesh(cfg.mesh)
  dp = shd.data_parallel_size(mesh)
  if cfg.data.batch_size % dp:
    raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the data-parallel "
                     f"size {dp} (mesh.data x mesh.fsdp); use a multiple of {dp}")
  if cfg.data.batch_size % jax.process_count():
    raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the "
                     f"{jax.process_count()} hosts")
  synthetic = cfg.data.source == "synthetic"
  vocab = None if synthetic else load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids)
  if not (cfg.model.vocab_size or vocab):
    raise ValueError("model.vocab_size must be set when the data source has no vocabulary")
  derived = {}
  if cfg.model.family == "bert":
    derived["max_predictions"] = mlm_max_predictions(cfg.data.seq_len, cfg.data.mlm_rate,
                                                     cfg.data.max_predictions)
  if not synthetic:  # objective errors (lengths, sentinels) now, not in the data thread
    objectives.build_objective(cfg.data.objective, vocab, cfg.data)
  mcfg = model_config(cfg.model, vocab.vocab_size if vocab else 0, **derived)
  family = get_family(cfg.model.family)
  factory = lambda: family.module(mcfg, rngs=nnx.Rngs(params=cfg.seed))
  graphdef, abstract_params = nnx.split(nnx.eval_shape(factory))
  axes = shd.logical_axes_tree(abstract_params)
  pure = nnx.to_pure_dict(abstract_params)
  optimizer = build_optimizer(cfg.optimizer, mask=decay_mask(pure, axes))
  if optimizer.hessian_interval and family.logits_fn is None:
    raise ValueError(f"optimizer.name={cfg.optimizer.name!r} samples labels from the model's logits, "
                     f"which model.family={cfg.model.family!r} does not expose; use adamw, lion or sophia_h")
  init = step_lib.init_fn(factory, optimizer.tx)
  abstract = jax.eval_shape(init)
  shardings = step_lib.state_shardings(abstract, axes, mesh, optimizer.tx)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  s = cfg.schedule
  plan = build_plan(cfg)
  stage_flops = flops_lib.StageFlops(cfg.model.family, mcfg, cfg.data.batch_size, cfg.data.seq_len,
                                     target_length(cfg.data))
  plan = dataclasses.replace(plan, layer_cost_share=stage_flops.layer_share)
  lr_fn = functools.partial(learning_rate, name=s.name, peak=s.peak, warmup=s.warmup, final=s.final,
                            decay_start=lr_decay_start(cfg, plan))
  ctx = step_lib.StepContext(graphdef, family.loss_fn, family.logits_fn, optimizer, lr_fn, mesh,
                             shardings, mcfg.num_layers, family.batch_fields, packed=not synthetic,
                             wrap_select=lambda select: family.wrap_select(select, cfg.model))
  init_jit = jax.jit(init, out_shardings=shardings)
  run = Run(cfg, mesh, mcfg, plan, step_lib.StepCache(ctx), init_jit, abstract, stage_flops)
  if run.plan.unit == "rst_seconds" and need_costs:
    run.plan = plan_lib.with_step_costs(run.plan, rst.step_costs(cfg, run))
  return run


def device_batch(batch, mesh, fields):
  """Puts this host's rows of a global numpy batch onto the mesh as global arrays."""
  local = pipeline.host_rows(batch, jax.process_index(), jax.process_count())
  sharding = shd.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
          for k in fields}


def evaluate(run: Run, params, batches) -> float:
  total, count = 0.0, 0.0
  for batch in batches:
    s, c = run.steps.eval_step(params, run.device_batch(batch))
    total, count = total + s, count + c
  return float(total / jnp.maximum(count, 1.0))


def run_meta(cfg, mcfg) -> dict:
  """What a checkpoint records of its run and must match to be restored under ``cfg``."""
  return {"model": dataclasses.asdict(mcfg), "optimizer": cfg.optimizer.name,
          "method": json.dumps(cfg.method.to_dict(), sort_keys=True, default=list),
          "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "unit": cfg.budget.unit}


def _check_finite(host_metrics, step, fraction, checkpointer):
  """Stops before a non-finite state can be logged as progress or saved over good checkpoints."""
  bad = {k: float(host_metrics[k]) for k in ("loss", "grad_norm", "update_norm")
         if not math.isfinite(float(host_metrics[k]))}
  if bad:
    checkpointer.wait()
    raise TrainingError(
        f"non-finite training metrics {bad} at step {step} ({fraction:.1%} of the budget). "
        f"Checkpoints already written are intact (latest: step {checkpointer.latest_step()}); "
        "lower schedule.peak or raise schedule.warmup / optimizer.grad_clip, then re-run the "
        "same command to resume from the latest checkpoint.")


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run of ``cfg`` in ``workdir``; returns the final metrics."""
  if cfg.distributed.initialize:
    jax.distributed.initialize()
  run = setup(cfg)
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  plan, mesh = run.plan, run.mesh
  budget = plan.budget
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                       cfg.checkpoint.async_save)
  writer = metrics_lib.MetricWriter(workdir, cfg.log.tensorboard, enabled=lead)
  stream = pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, cfg.seed, train=True)
  val = pipeline.build_stream(cfg.data, "validation", cfg.data.batch_size, cfg.seed, train=False)
  eval_batches = [b for _, b in zip(range(cfg.eval.batches or 1 << 30), val)]
  expected_meta = run_meta(cfg, run.model_cfg)

  if lead:
    print(f"workdir {os.path.abspath(workdir)}: {plan.unit} budget {budget:g}, "
          f"{plan.total_steps(run.steps.ctx.optimizer.hessian_interval)} steps, "
          f"{len(plan.stages)} stage(s), mesh {dict(mesh.shape)}")
  start = checkpointer.latest_step()
  if start is None:
    state, progress, step, tokens, wall_before = run.init(), 0.0, 0, 0, 0.0
    usage = {"layers": 0.0, "flops": 0.0}
  else:
    state, meta = checkpointer.restore(start, run.abstract_state, expected_meta)
    progress, step, tokens = float(meta["progress"]), int(meta["step"]), int(meta["tokens"])
    wall_before = float(meta.get("wall_s", 0.0))
    usage = dict(meta.get("usage", {"layers": 0.0, "flops": 0.0}))
    stream.set_state(meta["data"])
    writer.truncate_after(step)
    if lead:
      print(f"resumed from {checkpointer.directory}/{step} at {progress / budget:.1%} of the budget")
    if progress >= budget:
      checkpointer.close()
      writer.close()
      last = {}
      if lead and os.path.exists(writer.path):
        for row in metrics_lib.read_metrics(workdir):
          last |= row
        print(f"this run is already complete (step {step}, eval/loss {last.get('eval/loss', float('nan')):.4f}); "
              "raise budget.value to train further, or use a fresh --workdir")
      return {"step": step, "stopped": False, **last}

  def save(step, state, progress, tokens):
    checkpointer.save(step, state, expected_meta | {
        "step": step, "progress": progress, "tokens": tokens, "wall_s": wall(), "usage": dict(usage),
        "data": batches.get_state()})

  if start is None and cfg.eval.at_start:
    initial = evaluate(run, state.params, eval_batches)
    writer.write(0, {"progress": 0.0, "progress_units": 0.0, "tokens": 0, "eval/loss": initial})
    if lead:
      print(f"step 0: eval/loss {initial:.4f}")

  batches = pipeline.Prefetcher(stream, depth=2)
  base_key = jax.random.key(cfg.seed)
  timer = metrics_lib.StepTimer(cfg.train.peak_flops or flops_lib.device_peak_flops(), jax.device_count())
  bar = metrics_lib.ProgressBar(budget, plan.unit, progress, enabled=lead and cfg.log.progress_bar)
  wall0, last = time.perf_counter() - wall_before, {}
  wall = lambda: time.perf_counter() - wall0  # wall-clock seconds of training, across resumes
  compiled = set(run.steps.compiled_shapes)
  stage_flops = run.stage_flops
  hessian_interval = run.steps.ctx.optimizer.hessian_interval
  try:
    while progress < budget:
      fraction = progress / budget
      stage_index = plan.stage_index(fraction)
      stage = plan.stages[stage_index]
      key = jax.random.fold_in(base_key, step)
      args = (state, run.device_batch(batches.next_batch()), key, jnp.float32(fraction))
      hessian = bool(hessian_interval) and step % hessian_interval == hessian_interval - 1  # Sophia-G
      if hessian:
        args += (run.device_batch(batches.next_batch()),)
      state, m = run.steps.train_step(stage, hessian)(*args)
      step += 1
      step_tokens = stage.tokens_per_step or plan.tokens_per_step
      tokens += step_tokens
      charge = plan.charge(stage, hessian, fraction)
      step_flops = stage_flops(stage, fraction)
      active = stage_flops.layers(stage, fraction)
      prev, progress = fraction, progress + charge
      usage["layers"] += active
      usage["flops"] += step_flops / stage_flops.full
      if (stage.shape, hessian) in compiled:
        timer.add(m, step_tokens, step_flops * (2 if hessian else 1))
      else:  # this step compiled: keep it out of the timings
        jax.block_until_ready(m)
        compiled.add((stage.shape, hessian))
        timer.skip()
      fraction = progress / budget
      do_eval = plan_lib.crossed(prev, fraction, cfg.eval.every) or progress >= budget
      do_log = step % cfg.log.every == 0 or do_eval
      do_save = progress >= budget or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
      row = {}
      if do_log or do_save:
        host = jax.device_get(m)
        _check_finite(host, step, fraction, checkpointer)
      if do_log:
        row = {"progress": fraction, "progress_units": progress, "stage": stage_index,
               "lr": host["lr"], "grad_norm": host["grad_norm"], "update_norm": host["update_norm"],
               "tokens": tokens, "wall_s": wall()} | timer.report(host["loss"])
        if plan.unit == "rst_seconds":
          row |= {"rst_s": progress, "rst_per_wall": progress / max(row["wall_s"], 1e-9)}
        if len(plan.stages) > 1 or stage.select is not None:  # subnetwork now, average, FLOPs vs full
          row |= {"subnetwork/layers": active, "subnetwork/avg_layers": usage["layers"] / step,
                  "flops/relative": usage["flops"] / step}
          if cfg.method.name == "raptr" and cfg.method.raptr.axis != "depth":  # heads / MLP width now
            width = {"num_heads": run.model_cfg.num_heads, "mlp_dim": run.model_cfg.mlp_dim} | (stage.width or {})
            row |= {f"subnetwork/{k}": v for k, v in width.items()}
        row |= {k: v for k, v in host.items() if k.startswith("sophia/")}
      if do_eval:
        row["eval/loss"] = evaluate(run, state.params, eval_batches)
        if lead:
          bar.write(f"step {step}: eval/loss {row['eval/loss']:.4f} ({fraction:.0%} of the budget)")
        timer.skip()
      if row:
        writer.write(step, row)
        last |= row
      bar.update(charge, step, last.get("train/loss"), last.get("tokens_per_s"))
      if do_save:
        save(step, state, progress, tokens)
      if cfg.train.stop_at_step and step >= cfg.train.stop_at_step and progress < budget:
        checkpointer.wait()
        if lead:
          bar.write(f"stopped at step {step} (train.stop_at_step); re-run to resume")
        return {"step": step, "stopped": True, **last}
  finally:
    batches.close()
    bar.close()
    checkpointer.close()
    writer.close()
  if lead:
    print(f"done: {step} steps, eval/loss {last.get('eval/loss', float('nan')):.4f}\n"
          f"outputs in {os.path.abspath(workdir)}: metrics.jsonl, tensorboard/, checkpoints/")
  return {"step": step, "stopped": False, **last}
