"""Ahead-of-time compilation of a config's real steps for a TPU slice (or this machine's
devices), on any machine: does the run fit, and what does a step cost (MaxText's
``train_compile``).

    pip install -e '.[tpu]'     # the libtpu wheel: compile-only TPU devices, no TPU needed
    python -m raptr_jax.aot --config=configs/ul2.py:paper --topology=v5p-128
    python -m raptr_jax.aot --config=configs/bert.py:large --topology=v4-32 --slices=2 \\
        --config.mesh.data=4 --config.mesh.fsdp=-1
    python -m raptr_jax.aot --config=configs/gpt.py:gpt3_1.3b --topology=local   # this machine

Every distinct step the run compiles is compiled here with the run's own shardings (the
first and last stage by default; ``--stages=all``): the train step (with Sophia-G's GNB pass
when the optimizer has one), the evaluation step and batch selection's scoring pass. For each,
per device: arguments (parameters, optimizer state, batch), outputs, temporaries (activations
kept for the backward pass, gradients, collective buffers), their total against the chip's
HBM, and the step's FLOPs (XLA's count, and the analytic model FLOPs). A step that does not
fit ends the command with exit code 1 and names what dominates and which knobs help
(``mesh.fsdp``, ``model.remat``, ``train.microbatches``). ``--report=FILE.json`` writes the
figures.
"""
import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from raptr_jax import run as run_lib
from raptr_jax import topology as topology_lib
from raptr_jax.data.corruption import target_length
from raptr_jax.data.pipeline import MAX_SEGMENTS, synthetic_batch
from raptr_jax.topology import GiB


class DoesNotFit(Exception):
  """A compiled step needs more memory per device than the chip has."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device figures of one compiled step."""
  name: str
  arguments: int
  outputs: int
  aliased: int          # outputs written into donated arguments (the train state)
  temporaries: int
  code: int
  flops: float          # XLA's count, per device
  model_flops: float    # analytic (flops.py), per device; 0 where not defined

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def abstract_batch(run, rows: int | None = None):
  """The batch a step reads, as sharded shapes (``rows`` default: the global batch)."""
  cfg = run.cfg
  rows = rows or cfg.data.batch_size
  one = synthetic_batch(1, cfg.data.seq_len, 8, family=cfg.model.family, target_len=target_length(cfg.data))
  sharding = run_lib.shd.batch_sharding(run.mesh)
  return {k: jax.ShapeDtypeStruct((rows, *one[k].shape[1:]), one[k].dtype, sharding=sharding)
          for k in run.steps.ctx.batch_fields}


def parameter_count(run) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(run.abstract_state.params))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded shapes (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def chosen_stages(plan, which: str):
  """Distinct stage shapes: ``ends`` (first and last), ``all``, or indices ``0,3``."""
  distinct = {}
  for i, stage in enumerate(plan.stages):
    distinct.setdefault(stage.shape, (i, stage))
  stages = list(distinct.values())
  if which == "all":
    return stages
  if which == "ends":
    return stages if len(stages) <= 2 else [stages[0], stages[-1]]
  try:
    picks = [int(i) for i in which.split(",")]
  except ValueError:
    raise ValueError(f"--stages={which!r}: use ends, all or stage indices such as 0,2") from None
  bad = [i for i in picks if not 0 <= i < len(plan.stages)]
  if bad:
    raise ValueError(f"--stages: the plan has stages 0..{len(plan.stages) - 1}, not {bad}")
  return [(i, plan.stages[i]) for i in picks]


def _memory(name, compiled, model_flops: float) -> StepMemory:
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return StepMemory(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                    int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                    int(m.generated_code_size_in_bytes), float((cost or {}).get("flops", 0.0)), model_flops)


def compile_steps(run, which: str = "ends", hbm_bytes: int | None = None):
  """Compiles the run's steps (``chosen_stages``) for its mesh: ``[StepMemory]``. With
  ``hbm_bytes``, a step over it (or one the TPU compiler finds out of memory) raises
  ``DoesNotFit`` with what dominates and what to change."""
  devices = run.mesh.size
  key = jax.eval_shape(lambda: jax.random.key(0))
  progress = jax.ShapeDtypeStruct((), jnp.float32)
  batch = abstract_batch(run)
  hessian = bool(run.steps.ctx.optimizer.hessian_interval)
  out = []
  for index, stage in chosen_stages(run.plan, which):
    label = f"train stage {index} ({stage.name})" + (" + GNB pass" if hessian else "")
    args = (run.abstract_state, batch, key, progress) + ((batch,) if hessian else ())
    compiled = _compile(label, lambda: run.steps.train_step(stage, hessian).lower(*args).compile(), run, hbm_bytes)
    flops = run.stage_flops(stage, 0.0) * (2 if hessian else 1) / devices  # GNB: about one more step
    out.append(_memory(label, compiled, flops))
  params = run.abstract_state.params
  compiled = _compile("eval", lambda: run.steps.eval_step(None).lower(params, batch, progress).compile(), run, hbm_bytes)
  out.append(_memory("eval (full model)", compiled, run.stage_flops.full / 3 / devices))
  if run.plan.scoring is not None:
    rows = abstract_batch(run, run.plan.scoring.rows)
    compiled = _compile("scoring pass", lambda: run.steps.score_step(MAX_SEGMENTS).lower(params, rows)
                        .compile(), run, hbm_bytes)
    out.append(_memory(f"scoring pass ({run.plan.scoring.rows} rows)", compiled,
                       run.stage_flops.full / 3 * run.plan.scoring.rows / run.cfg.data.batch_size / devices))
  if hbm_bytes:
    for m in out:
      if m.total > hbm_bytes:
        raise DoesNotFit(advice(run, m, hbm_bytes))
  return out


def _compile(label, fn, run, hbm_bytes):
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  (XLA's errors have no narrower type)
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      raise DoesNotFit(advice(run, None, hbm_bytes, label=label, compiler=text)) from None
    raise


def state_breakdown(run) -> dict[str, int]:
  """Per-device bytes of the train state's parts and its largest arrays."""
  state = run.abstract_state
  parts = {"parameters": per_device_bytes(state.params), "optimizer state": per_device_bytes(state.opt_state)}
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  sizes = sorted(((per_device_bytes(leaf), jax.tree_util.keystr(path)) for path, leaf in flat), reverse=True)
  return parts | {f"largest parameter {name}": size for size, name in sizes[:2]}


def advice(run, memory: StepMemory | None, hbm_bytes, label: str = "", compiler: str = "") -> str:
  """What dominates a step's memory and the knobs that reduce it."""
  cfg = run.cfg
  mesh = dict(run.mesh.shape)
  dp = run_lib.shd.data_parallel_size(run.mesh)
  parts = state_breakdown(run)
  lines = []
  if memory is not None:
    lines.append(f"{memory.name} needs {memory.total / GiB:.2f} GiB per device, the chip has "
                 f"{hbm_bytes / GiB:.2f} GiB: arguments {memory.arguments / GiB:.2f} GiB (parameters "
                 f"{parts['parameters'] / GiB:.2f}, optimizer state {parts['optimizer state'] / GiB:.2f}), "
                 f"temporaries {memory.temporaries / GiB:.2f} GiB, outputs not aliased "
                 f"{(memory.outputs - memory.aliased) / GiB:.2f} GiB")
    state_dominates = memory.arguments > memory.temporaries
  else:
    top = [line.strip() for line in compiler.splitlines() if re.search(r"\d+(\.\d+)?[GMK]i?B", line)][:8]
    lines.append(f"{label}: the compiler ran out of device memory ({(hbm_bytes or 0) / GiB:.0f} GiB per device):")
    lines += [f"  {line[:300]}" for line in top] or [f"  {compiler.splitlines()[0][:300]}"]
    lines.append(f"train state per device: parameters {_size(parts['parameters'])}, optimizer state "
                 f"{_size(parts['optimizer state'])}")
    state = parts["parameters"] + parts["optimizer state"]
    state_dominates = hbm_bytes is not None and state > 0.5 * hbm_bytes
  lines.append(f"mesh {mesh}, model.remat={cfg.model.remat!r}, train.microbatches={cfg.train.microbatches}, "
               f"{cfg.data.batch_size // dp} rows per device")
  fsdp = (f"mesh.fsdp (now {mesh['fsdp']}) shards parameters and optimizer state over more devices: "
          f"e.g. --config.mesh.fsdp={min(run.mesh.size, max(2, 2 * mesh['fsdp']))} --config.mesh.data=-1")
  remat = {"none": "model.remat=dots keeps only the matmul outputs for the backward pass (model.remat=full: nothing)",
           "dots": "model.remat=full recomputes every layer in the backward pass",
           "dots_all": "model.remat=dots or full keeps fewer activations"}.get(cfg.model.remat)
  more = [m for m in range(cfg.train.microbatches + 1, cfg.data.batch_size // dp + 1)
          if cfg.data.batch_size % m == 0 and (cfg.data.batch_size // m) % dp == 0]
  micro = (f"train.microbatches={more[0]} divides the activations of a step by {more[0] / cfg.train.microbatches:g} "
           "(same update, gradients accumulated)") if more else None
  knobs = [fsdp] + [k for k in (remat, micro) if k] if state_dominates else [k for k in (remat, micro) if k] + [fsdp]
  lines.append(("the train state dominates" if state_dominates else "activations (temporaries) dominate")
               + "; what helps, first the most:")
  lines += [f"  - {k}" for k in knobs]
  return "\n".join(lines)


def _size(n: int) -> str:
  return f"{n / GiB:.2f}G" if abs(n) >= GiB / 10 else f"{n / 2 ** 20:.1f}M"


def format_report(topology, run, steps) -> str:
  cfg = run.cfg
  hbm = topology.hbm_bytes
  state = state_breakdown(run)
  count = parameter_count(run)
  out = [f"{topology.name}: {topology.description}",
         f"mesh {dict(run.mesh.shape)}; batch {cfg.data.batch_size} x {cfg.data.seq_len}, "
         f"microbatches {cfg.train.microbatches}, remat {cfg.model.remat}; {count / 1e6:.1f}M parameters; per device: "
         f"parameters {_size(state['parameters'])}, optimizer state {_size(state['optimizer state'])}",
         f"{'step (per device)':<44} {'args':>8} {'temps':>8} {'out':>8} {'total':>8} {'of HBM':>7} "
         f"{'TFLOP':>9} {'model':>9}"]
  for m in steps:
    share = f"{100 * m.total / hbm:6.1f}%" if hbm else "      -"
    out.append(f"{m.name[:44]:<44} {_size(m.arguments):>8} {_size(m.temporaries):>8} "
               f"{_size(m.outputs - m.aliased):>8} {_size(m.total):>8} {share} {m.flops / 1e12:9.4g} "
               f"{m.model_flops / 1e12:9.4g}")
  out.append("args: parameters, optimizer state and batch; out: outputs not written over the donated state; "
             "TFLOP: XLA's count; model: analytic (flops.py)")
  return "\n".join(out)


def run_aot(cfg, topology_name: str, slices: int = 1, stages: str = "ends"):
  """Compiles ``cfg`` for a topology: (topology, run, [StepMemory]); raises ``DoesNotFit``."""
  topo = topology_lib.get_topology(topology_name, slices)
  try:
    run = run_lib.setup(cfg, devices=topo.devices)
  except ValueError as e:
    raise ValueError(f"topology {topology_name} ({len(topo.devices)} devices, {topo.hosts} hosts): {e}") from None
  return topo, run, compile_steps(run, stages, topo.hbm_bytes)


def to_json(topology, run, steps) -> dict:
  cfg = run.cfg
  return {"topology": topology.name, "description": topology.description, "mesh": dict(run.mesh.shape),
          "rows_per_device": cfg.data.batch_size // run_lib.shd.data_parallel_size(run.mesh),
          "microbatches": cfg.train.microbatches, "remat": cfg.model.remat, "jax": jax.__version__,
          "parameters": parameter_count(run),
          "hbm_bytes": topology.hbm_bytes, "state": state_breakdown(run),
          "steps": [dataclasses.asdict(m) | {"total": m.total} for m in steps]}


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  cfg = flags.FLAGS.config
  try:
    topo, run, steps = run_aot(cfg, flags.FLAGS.topology, flags.FLAGS.slices, flags.FLAGS.stages)
  except DoesNotFit as e:
    sys.exit(f"does not fit: {e}")
  except (ValueError, RuntimeError) as e:
    sys.exit(f"error: {e}")
  print(format_report(topo, run, steps))
  if flags.FLAGS.report:
    with open(flags.FLAGS.report, "w") as f:
      json.dump(to_json(topo, run, steps), f, indent=1)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from raptr_jax import cli  # pylint: disable=g-import-not-at-top  (--config, its errors)
  flags.DEFINE_string("topology", None, f"TPU slice ({topology_lib.EXAMPLES})", required=True)
  flags.DEFINE_integer("slices", 1, "TPU slices joined over DCN (multislice)")
  flags.DEFINE_string("stages", "ends", "which stages' steps: ends (first and last), all, or indices 0,2")
  flags.DEFINE_string("report", None, "also write the figures to this JSON file")
  app.run(main, flags_parser=cli.parse_flags)
