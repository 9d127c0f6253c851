"""The training loop: plan -> stages -> steps, with eval, checkpoints and metrics.

    state = init or restore(workdir)
    while progress < budget:
      stage = plan.stage_at(progress / budget)
      state, metrics = step_for(stage)(state, batch, key(step), progress / budget)
      progress += plan.charge(stage, hessian, fraction)
      log / eval / checkpoint at their cadences

Batch selection (selective backprop, RHO loss) puts a ``BatchFeed`` between the stream and the
step: it scores candidate batches on the device and hands over the rows it chose; its scoring
passes are charged too (``plan.scoring_charge``), and its state is saved with each checkpoint.

All randomness is a function of (seed, step) and the data stream's saved position, so a run that
is killed and re-started with the same workdir reaches the same losses as one that was not.

Faults: the workdir is locked while a run owns it (``workdir.WorkdirLock``); a resume restores
the newest checkpoint that reads back intact (corrupt ones are set aside,
``checkpoint.Checkpointer.restore_latest``) under the config that started the run
(``workdir.check_resume``); ``metrics.jsonl`` and TensorBoard keep each step once
(``metrics.MetricWriter.start``); SIGTERM / SIGINT finish the step, checkpoint it and raise
``preemption.Preempted``.

Several processes (``distributed``, ``cluster.initialize``): each host reads only its shards
of the training stream (``pipeline.HostStream``, ``data.shards``) and puts its rows on the mesh;
a checkpoint gathers every shard's position; a lost process stops the others with a message
(``cluster``). ``log.profile_steps`` traces chosen steps
(``profiling.StepProfiler``).
"""
import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp

from raptr_jax import checkpoint as ckpt_lib
from raptr_jax import cluster
from raptr_jax import config as config_lib
from raptr_jax import flops as flops_lib
from raptr_jax import metrics as metrics_lib
from raptr_jax import plan as plan_lib
from raptr_jax import preemption as preemption_lib
from raptr_jax import pretrained as pretrained_lib
from raptr_jax import profiling
from raptr_jax import rst
from raptr_jax import sharding as shd
from raptr_jax import workdir as workdir_lib
from raptr_jax.data import pipeline
from raptr_jax.run import Run, evaluate
from raptr_jax.run import setup as build_run


class TrainingError(RuntimeError):
  pass


def setup(cfg, need_costs: bool = True) -> Run:
  """``run.setup`` plus, for RST budgets (unless ``need_costs=False``), the step costs from the
  calibration table."""
  run = build_run(cfg)
  if run.plan.unit == "rst_seconds" and need_costs:
    run.plan = plan_lib.with_step_costs(run.plan, rst.step_costs(cfg, run))
  return run


def run_meta(cfg, mcfg) -> dict:
  """What a checkpoint records of its run and must match to be restored under ``cfg``: the
  model, optimizer, batch shape, budget unit and the run's method with its own options (a
  changed growth schedule is refused on resume)."""
  from raptr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  method = get_method(cfg.method.name).meta(cfg)
  return {"model": mcfg.identity(), "optimizer": cfg.optimizer.name,
          "method": json.dumps(method, sort_keys=True, default=list),
          "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "unit": cfg.budget.unit,
          ckpt_lib.LOOSE: {"model": RUN_ONLY_MODEL_FIELDS}}


RUN_ONLY_MODEL_FIELDS = ("remat", "attention_impl")  # may change on resume: how the model runs, not what


def eval_key(name: str) -> str:
  """The metric of validation set ``name``: ``eval/loss`` for the data's own, else
  ``eval/<name>/loss`` (``eval.sets``)."""
  return f"eval/{name}/loss" if name else "eval/loss"


def evaluate_sets(run, params, eval_batches: dict, stage, fraction: float) -> dict:
  """{eval key: mean token loss} over every validation set's batches, and the downstream tasks
  of ``downstream.tasks`` (``downstream/<task>/<metric>``, the full model) when set."""
  out = {eval_key(name): evaluate(run, params, batches, stage, fraction) for name, batches in eval_batches.items()}
  d = run.cfg.downstream
  if d.tasks:
    from raptr_jax.downstream import suite, tasks  # pylint: disable=g-import-not-at-top
    names = tasks.parse_tasks(d.tasks, run.cfg.model.family)
    out |= suite.metrics_row(suite.run_tasks(run, params, names, tuple(d.shots), d.limit, d.cache_dir, progress=False))
  return out


def _eval_text(evals: dict) -> str:
  return ", ".join(f"{k.removeprefix('downstream/')} {v:.4f}" for k, v in evals.items())


def _check_finite(host_metrics, step, fraction, checkpointer, cfg):
  """Stops before a non-finite state can be logged as progress or saved over good checkpoints,
  with advice that works when followed: resuming under a lower learning rate is a config change,
  so it names train.allow_config_changes (which records the change in starts.jsonl)."""
  bad = {k: float(host_metrics[k]) for k in ("loss", "grad_norm", "update_norm")
         if not math.isfinite(float(host_metrics[k]))}
  if bad:
    try:
      checkpointer.wait()
    except ckpt_lib.CheckpointWriteError as e:  # reported, but the divergence is what stops the run
      print(f"warning: {e.brief}")
    raise TrainingError(f"non-finite training metrics {bad} at step {step} ({fraction:.1%} of the budget). "
                        + _divergence_advice(checkpointer.latest_step(), cfg))


def _divergence_advice(latest: int | None, cfg) -> str:
  lower = f"--config.schedule.peak={cfg.schedule.peak / 10:g}"
  others = ("a longer --config.schedule.warmup or a lower --config.optimizer.grad_clip may help too, "
            "given the same way")
  if latest is None:
    return (f"No checkpoint was written yet, so nothing is lost: re-run the same command with a lower learning "
            f"rate, e.g. {lower} (the run starts afresh; {others}).")
  return (f"Checkpoints already written are intact (latest: step {latest}). To resume from it with a lower "
          f"learning rate, re-run the same command with e.g. {lower} --config.train.allow_config_changes=True "
          f"(the change is recorded with its step in starts.jsonl; {others}). If it diverges again right after "
          f"step {latest}, that checkpoint is already damaged: start afresh with the lower rate in a new --workdir.")


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run of ``cfg`` in ``workdir``; returns the final metrics.

  The workdir is locked for the run (a second run on it is refused); SIGTERM / SIGINT
  checkpoint the current step and raise ``preemption.Preempted`` (a ``SystemExit``)."""
  if cfg.distributed.initialize:
    cluster.initialize(cfg.distributed, workdir)
  lead = jax.process_index() == 0
  fresh = not ckpt_lib.Checkpointer.has_steps(os.path.join(workdir, "checkpoints"))
  cfg, source = pretrained_lib.resolve(cfg, workdir, announce=lead and fresh)
  workdir_lib.make_workdir(workdir)  # a path that is a file is refused by name
  with (preemption_lib.Preemption() as preemption, workdir_lib.WorkdirLock(workdir, enabled=lead),
        contextlib.closing(ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                                 cfg.checkpoint.async_save,
                                                 on_write_error=cfg.checkpoint.on_write_error)) as checkpointer):
    try:
      return _train(cfg, workdir, preemption, lead, checkpointer, source)
    except jax.errors.JaxRuntimeError as e:  # a collective whose peer died: report it and exit (75)
      cluster.exit_if_peer_lost(e)
      raise
    finally:  # the others must not take this process for lost while it leaves
      cluster.stop_heartbeat()


def _train(cfg, workdir: str, preemption, lead: bool, checkpointer, source=None) -> dict:
  run = setup(cfg)
  plan, mesh = run.plan, run.mesh
  budget = plan.budget
  writer = metrics_lib.MetricWriter(workdir, cfg.log.tensorboard, enabled=lead)
  scoring = plan.scoring  # batch selection: the stream yields candidate batches for its scoring passes
  # Each host reads its own shards of the training stream; batch selection chooses rows of the
  # whole candidate batch, so every host reads all of it.
  num_shards = 1 if scoring else (cfg.data.shards or jax.process_count())
  stream = pipeline.build_train_stream(cfg.data, scoring.rows if scoring else cfg.data.batch_size, cfg.seed,
                                       num_shards, jax.process_index(), jax.process_count())
  local_rows = isinstance(stream, pipeline.HostStream)
  if local_rows and shd.data_parallel_size(mesh) % jax.process_count():
    raise ValueError(f"mesh {dict(mesh.shape)}: each of the {jax.process_count()} hosts reads its own shards of the "
                     "training stream, so mesh.data x mesh.fsdp must be a multiple of the host count; change the "
                     "mesh, or set data.shards=1 (every host reads the whole stream)")
  eval_batches = {}  # validation set name ("": data itself, eval/loss) -> its batches
  for name, data_cfg in ({"": cfg.data} | config_lib.eval_sets(cfg)).items():
    val = pipeline.build_stream(data_cfg, "validation", cfg.data.batch_size, cfg.seed, train=False)
    eval_batches[name] = [b for _, b in zip(range(cfg.eval.batches or 1 << 30), val)]
  expected_meta = run_meta(cfg, run.model_cfg)
  if cfg.downstream.tasks:  # fetch the evaluation data now: a failed fetch stops the run before step 1
    from raptr_jax.downstream import suite, tasks  # pylint: disable=g-import-not-at-top
    suite.load(tasks.parse_tasks(cfg.downstream.tasks, cfg.model.family), cfg.downstream.cache_dir)

  if lead:
    n_steps, exact = plan.step_count(run.steps.ctx.optimizer.hessian_interval)
    print(f"workdir {os.path.abspath(workdir)}: {plan.unit} budget {budget:g}, "
          f"{'' if exact else '~'}{n_steps:,} steps{'' if exact else ' (estimated)'}, "
          f"{len(plan.stages)} stage(s) ({len({st.shape for st in plan.stages})} step shape(s) to "
          f"compile), mesh {dict(mesh.shape)}")
  changes = {}

  def check_config(step, meta):  # against the config that wrote this checkpoint (its meta)
    changes.clear()
    changes.update(workdir_lib.check_resume(workdir, cfg, step, meta.get("config")))

  restored = checkpointer.restore_latest(run.abstract_state, expected_meta, feed=bool(scoring),
                                         check_meta=check_config)
  if restored is None:
    state, progress, step, tokens, wall_before = run.init(), 0.0, 0, 0, 0.0
    if source is not None:  # a pretrained model (init.source, or the workdir's import)
      state = pretrained_lib.load(run, state, source)
    usage = {"layers": 0.0, "flops": 0.0, "layer_tokens": 0.0}
    state_stage = 0  # the plan stage whose model the train state holds (growth changes it)
    feed_state, metrics_rows = None, None
  else:
    _, state, meta, feed_state = restored
    progress, step, tokens = float(meta["progress"]), int(meta["step"]), int(meta["tokens"])
    state_stage = int(meta.get("stage", plan.stage_index(progress / budget)))
    if state_stage > plan.stage_index(progress / budget):
      raise TrainingError(
          f"checkpoint {checkpointer.directory}/{step} holds the model of stage {state_stage} "
          f"({plan.stages[min(state_stage, len(plan.stages) - 1)].name}), but at budget.value={cfg.budget.value:g} "
          f"its progress lies in stage {plan.stage_index(progress / budget)}: a changed budget moves "
          "the stage boundaries of this run. Resume with the budget that wrote it, or use a fresh --workdir.")
    wall_before = float(meta.get("wall_s", 0.0))
    usage = {"layer_tokens": 0.0} | dict(meta.get("usage", {"layers": 0.0, "flops": 0.0}))
    stream.set_state(meta["data"], allow_changed_source=cfg.train.allow_config_changes)
    metrics_rows = meta.get("metrics_rows")
    if lead:
      print(f"resumed from {checkpointer.directory}/{step} at {progress / budget:.1%} of the budget")
      for key, (was, now) in changes.items():
        print(f"config changed at step {step} (train.allow_config_changes): {key}: {was!r} -> {now!r}")
    if progress >= budget:
      last = {}
      if lead and os.path.exists(writer.path):
        for row in metrics_lib.read_metrics(workdir):
          last |= row
        print(f"this run is already complete (step {step}, eval/loss {last.get('eval/loss', float('nan')):.4f}); "
              "to train further raise budget.value and pass --config.train.allow_config_changes=True "
              "(the schedule then stretches over the new budget), or use a fresh --workdir")
      return {"step": step, "stopped": False, **last}
  if lead:
    workdir_lib.record_start(workdir, cfg, step, changes)
  writer.start(None if restored is None else step, metrics_rows)

  config_record = workdir_lib.flat_config(cfg)

  def save(step, state, progress, tokens):
    writer.flush()  # TensorBoard and metrics.jsonl hold every step up to each checkpoint (kill -9 included)
    checkpointer.save(step, state, expected_meta | {
        "step": step, "progress": progress, "tokens": tokens, "wall_s": wall(), "usage": dict(usage),
        "stage": state_stage, "data": pipeline.gather_state(batches.get_state()), "metrics_rows": writer.rows, "config": config_record},
        feed.state() if feed is not None else None)

  if restored is None and cfg.eval.at_start:
    initial = evaluate_sets(run, state.params, eval_batches, plan.stages[0], 0.0)
    writer.write(0, {"progress": 0.0, "progress_units": 0.0, "tokens": 0} | initial)
    if lead:
      print(f"step 0: {_eval_text(initial)}")

  batches = pipeline.Prefetcher(stream, depth=2)
  profiler = profiling.StepProfiler(cfg.log.profile_steps, cfg.log.profile_dir or os.path.join(workdir, "profile"))
  feed = run.method.batch_feed(run, batches) if scoring else None
  if feed is not None and feed_state is not None:
    feed.restore(feed_state)
  base_key = jax.random.key(cfg.seed)
  timer = metrics_lib.StepTimer(cfg.train.peak_flops or flops_lib.device_peak_flops(), jax.device_count())
  bar = metrics_lib.ProgressBar(budget, plan.unit, progress, enabled=lead and cfg.log.progress_bar)
  wall0, last = time.perf_counter() - wall_before, {}
  wall = lambda: time.perf_counter() - wall0  # wall-clock seconds of training, across resumes
  compiled = set(run.steps.compiled_shapes)
  stage_flops = run.stage_flops
  hessian_interval = run.steps.ctx.optimizer.hessian_interval
  width_keys = sorted({k for st in plan.stages for k in st.model_fields()} - {"num_layers", "num_decoder_layers"})
  try:
    while progress < budget:
      fraction = progress / budget
      stage_index = plan.stage_index(fraction)
      stage = plan.stages[stage_index]
      if stage_index != state_stage:  # a stage boundary: the method may transform the state
        state = run.transition(state, state_stage, stage_index)
        state_stage = stage_index
      preemption.current_step = step + 1
      key = jax.random.fold_in(base_key, step)
      if feed is not None:  # batch selection: scoring passes on the device choose the rows
        batch, passes = feed.next_batch(state.params, step)
      else:
        batch, passes = batches.next_batch(), 0
      args = (state, run.device_batch(batch, local_rows), key, jnp.float32(fraction))
      hessian = plan_lib.is_hessian_step(step, hessian_interval)  # Sophia-G
      if hessian:
        args += (run.device_batch(batches.next_batch(), local_rows),)
      with profiler.step(step + 1):
        state, m = run.steps.train_step(stage, hessian)(*args)
      step += 1
      profiler.after(step, m)
      step_tokens = stage.tokens_per_step or plan.tokens_per_step
      tokens += step_tokens + (passes * scoring.tokens if passes else 0)
      charge = plan.charge(stage, hessian, fraction) + plan.scoring_charge(passes)
      step_flops = stage_flops(stage, fraction)
      active = stage_flops.layers(stage, fraction)
      prev, progress = fraction, progress + charge
      usage["layers"] += active
      usage["flops"] += step_flops / stage_flops.full
      usage["layer_tokens"] += stage_flops.layer_tokens(stage, fraction)
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
        _check_finite(host, step, fraction, checkpointer, cfg)
      if do_log:
        row = {"progress": fraction, "progress_units": progress, "stage": stage_index,
               "lr": host["lr"], "grad_norm": host["grad_norm"], "update_norm": host["update_norm"],
               "tokens": tokens, "wall_s": wall()} | timer.report(host["loss"])
        if plan.unit == "rst_seconds":
          row |= {"rst_s": progress, "rst_per_wall": progress / max(row["wall_s"], 1e-9)}
        if plan.unit == "layer_tokens":
          row["layer_tokens"] = usage["layer_tokens"]
        if len(plan.stages) > 1 or stage.select is not None:  # subnetwork now, average, FLOPs vs full
          row |= {"subnetwork/layers": active, "subnetwork/avg_layers": usage["layers"] / step,
                  "flops/relative": usage["flops"] / step, "layer_tokens": usage["layer_tokens"],
                  "layer_tokens/saved": 1.0 - usage["layer_tokens"] / (step * stage_flops.full_layer_tokens)}
          fields = stage.model_fields()  # width now (heads, MLP, hidden size) where stages vary it
          row |= {f"subnetwork/{k}": fields.get(k, getattr(run.model_cfg, k)) for k in width_keys}
        row |= run.method.metrics(stage, fraction)
        row |= {k: v for k, v in host.items() if "/" in k}  # namespaced: sophia/*, a method's own
      if do_eval:
        evals = evaluate_sets(run, state.params, eval_batches, plan.stages[state_stage], fraction)
        row |= evals
        if lead:
          bar.write(f"step {step}: {_eval_text(evals)} ({fraction:.0%} of the budget)")
        timer.skip()
      if row:
        writer.write(step, row)
        last |= row
      bar.update(charge, step, last.get("train/loss"), last.get("tokens_per_s"))
      if do_save:
        save(step, state, progress, tokens)
      if preemption.requested(step) and progress < budget:  # (at the budget the run has just finished)
        if not do_save:
          _check_finite(jax.device_get(m), step, fraction, checkpointer, cfg)  # never save a diverged state
          save(step, state, progress, tokens)
        checkpointer.wait()
        message = (f"{preemption.signal}: checkpoint {checkpointer.directory}/{step} written at step {step} "
                   f"({fraction:.1%} of the budget); re-run the same command to resume")
        if lead:
          bar.write(message)
        raise preemption_lib.Preempted(preemption.signal, step, message)
      if cfg.train.stop_at_step and step >= cfg.train.stop_at_step and progress < budget:
        checkpointer.wait()
        if lead:
          bar.write(f"stopped at step {step} (train.stop_at_step); re-run to resume")
        return {"step": step, "stopped": True, **last}
  finally:
    profiler.close()
    batches.close()
    bar.close()
    writer.close()
  checkpointer.wait()  # the final checkpoint is written (or its failure reported) before "done"
  if lead:
    print(f"done: {step} steps, eval/loss {last.get('eval/loss', float('nan')):.4f}\n"
          f"outputs in {os.path.abspath(workdir)}: metrics.jsonl, tensorboard/, checkpoints/")
  return {"step": step, "stopped": False, **last}
