"""Reference system time (No Train No Gain, Section 2): budgets in seconds of a reference machine.

A run with ``budget.unit = "rst_seconds"`` (or ``"rst_hours"``) is charged, for each step, the
time its *step kind* took on the reference system, read from a calibration table; it stops when
the charges reach the budget. Step kinds: every stage shape of the plan, with and without
Sophia-G's Hessian pass, batch selection's forward-only scoring pass (``("score", rows)``), plus
full-model evaluation (timed, never charged). A method may charge a modelled time instead of
the compiled step's (``Method.modelled_step``: interlocking backprop's step on K devices); the
entry then keeps the model's inputs and the compiled step's time beside it.

    python -m raptr_jax.rst calibrate --config=configs/ul2.py [--table=rst_tables/mine.json]

compiles and times each step kind the config's plan will run (compilation excluded, median of
``--steps`` steps with ``block_until_ready``) and writes/updates a versioned, human-readable
JSON table: device kind and count, jax/jaxlib versions, dtype, batch, sequence length, shape key,
seconds per step, n. The run and the calibration build their keys with the same function
(``step_kind_key``), so the key mismatch of the reference implementation cannot happen.

"For free" ablations (Sections 5.4, 6.1): ``budget.free_hessian`` charges a Hessian step what
the plain step costs; ``budget.free_scoring`` does the same for forward-only scoring passes.
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from raptr_jax.data.corruption import target_length

TABLE_VERSION = 1
DEFAULT_TABLE = "rst_table.json"


def context_key(cfg, model_cfg) -> str:
  """What makes a step cost what it costs, apart from the stage: model, batch, dtype, optimizer."""
  what = {"model": model_cfg.identity(), "family": cfg.model.family,
          "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
          "optimizer": cfg.optimizer.name, "mesh": {k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")}}
  if target_length(cfg.data):  # t5: the decoder length costs too (absent elsewhere: keys unchanged)
    what["target_len"] = target_length(cfg.data)
  if int(cfg.train.get("microbatches", 1)) != 1:  # gradient accumulation (absent at 1: keys unchanged)
    what["microbatches"] = int(cfg.train.microbatches)
  if int(cfg.mesh.get("stage", 1)) != 1:  # a pipelined run (absent at 1: keys unchanged)
    what["mesh"]["stage"] = int(cfg.mesh.stage)
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_kind_key(context: str, kind: str, shape=None, hessian: bool = False) -> str:
  """The one key function shared by calibration and lookup."""
  if kind == "eval":
    return f"{context}/eval"
  return f"{context}/{kind}/{json.dumps(list(shape) if isinstance(shape, tuple) else shape)}/hessian={int(hessian)}"


def step_kinds(plan, hessian_interval: int):
  """(kind, shape, hessian) for every step kind the plan will run."""
  kinds, seen = [], set()
  for stage in plan.stages:
    for hessian in ((False, True) if hessian_interval else (False,)):
      if (stage.shape, hessian) not in seen:
        seen.add((stage.shape, hessian))
        kinds.append(("train", stage, hessian))
  if plan.scoring is not None:  # batch selection's forward-only scoring pass
    kinds.append(("score", plan.scoring, False))
  kinds.append(("eval", None, False))
  return kinds


def load_table(path: str) -> dict:
  if not os.path.exists(path):
    return {"version": TABLE_VERSION, "entries": {}}
  with open(path) as f:
    table = json.load(f)
  if table.get("version") != TABLE_VERSION:
    raise ValueError(f"RST table {path} has version {table.get('version')}, this code reads "
                     f"version {TABLE_VERSION}; recalibrate with `python -m raptr_jax.rst calibrate`")
  return table


def save_table(path: str, table: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def device_description() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "platform": jax.default_backend(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def table_path(cfg) -> str:
  return cfg.budget.rst_table or DEFAULT_TABLE


def step_costs(cfg, run) -> dict:
  """{(stage.shape, hessian): seconds to charge} for an RST run, from its table; clear errors."""
  path = table_path(cfg)
  command = f"python -m raptr_jax.rst calibrate --config=<this config> --table={path}"
  if not os.path.exists(path):
    raise ValueError(f"budget.unit={cfg.budget.unit!r} needs a calibration table, and {path!r} does "
                     f"not exist: set budget.rst_table, or create it with `{command}`")
  entries = load_table(path)["entries"]
  kinds = step_kinds(run.plan, run.steps.ctx.optimizer.hessian_interval)
  if cfg.budget.free_scoring and not any(kind == "score" for kind, _, _ in kinds):
    raise ValueError("budget.free_scoring=True, but this run has no forward-only scoring passes "
                     "(selective backprop / RHO loss have them); drop the switch")
  context = context_key(cfg, run.model_cfg)
  costs, devices = {}, set()
  for kind, stage, hessian in kinds:
    if kind == "eval":
      continue
    key = step_kind_key(context, kind, stage.shape, hessian)
    if key not in entries:
      what = (f"scoring pass of {stage.rows} rows" if kind == "score" else
              f"stage {stage.name!r}{', with Hessian pass' if hessian else ''}")
      raise ValueError(f"RST table {path} has no entry for step kind {key!r} ({what}) of this config; "
                       f"add it with `{command}`")
    entry = entries[key]
    devices.add(entry["device_kind"])
    seconds = entry["seconds"]
    if hessian and cfg.budget.free_hessian:
      seconds = entries[step_kind_key(context, kind, stage.shape, False)]["seconds"]
    costs[(stage.shape, hessian)] = seconds
  here = jax.devices()[0].device_kind
  if jax.process_index() == 0 and devices and devices != {here}:
    print(f"note: RST table {path} was calibrated on {sorted(devices)}; this run on {here!r} is charged "
          f"that reference system's times. To make this device the reference, recalibrate: `{command}`")
  return costs


def calibrate(cfg, steps: int = 10, warmup: int = 2, table: str | None = None, verbose: bool = True,
              only_missing: bool = False) -> dict:
  """Times every step kind of ``cfg``'s plan on this device and writes them into the table.

  ``only_missing``: only the kinds the table lacks, so existing reference times stay. When the
  table already holds a kind of this config's plan (timed on the reference system), or else the
  full step of this config without its method, that kind is timed here too as an *anchor*, and
  every new time is scaled by reference / here: the new kinds are charged what they would have
  cost on the reference system, assuming this device is uniformly faster or slower (the entry
  keeps the raw time, the anchor, the factor and this device). Without an anchor this device
  becomes the reference for the config."""
  from raptr_jax import run as run_lib  # pylint: disable=g-import-not-at-top  (run builds jax state)
  from raptr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  path = table or table_path(cfg)
  run = run_lib.setup(cfg)
  if cfg.data.source == "synthetic":
    sample = lambda: pipeline.synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, run.model_cfg.vocab_size,
                                             family=cfg.model.family, target_len=cfg.data.target_len)
  else:
    stream = pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, cfg.seed, train=True)
    sample = stream.next_batch
  batch = run.device_batch(sample())
  hbatch = run.device_batch(sample())
  if run.plan.scoring is not None:  # candidate batches of the scoring pass's rows
    rows = run.plan.scoring.rows
    candidates = (pipeline.synthetic_batch(rows, cfg.data.seq_len, run.model_cfg.vocab_size, family=cfg.model.family,
                                           target_len=cfg.data.target_len) if cfg.data.source == "synthetic" else
                  pipeline.build_stream(cfg.data, "train", rows, cfg.seed, train=True).next_batch())
  state = run.init()
  context = context_key(cfg, run.model_cfg)
  table = load_table(path)
  device = device_description()
  kinds = [(kind, stage, hessian, step_kind_key(context, kind, None if stage is None else stage.shape, hessian))
           for kind, stage, hessian in step_kinds(run.plan, run.steps.ctx.optimizer.hessian_interval)]
  anchor, scale = None, 1.0
  if only_missing:
    present = [k for k in kinds if k[3] in table["entries"] and k[0] != "eval"]
    kinds = [k for k in kinds if k[3] not in table["entries"]]
    if present and kinds:  # time one reference kind here to scale the new ones to the reference
      anchor = present[0]
      kinds.insert(0, anchor)
    elif kinds and cfg.method.name != "baseline":  # nothing of this config: its baseline's full step
      found = _baseline_anchor(cfg, table, batch, steps, warmup)
      if found is not None:
        anchor, scale = found
        if verbose:
          print(f"anchor {anchor[3]} (the baseline of this config): new kinds scaled by {scale:.3f}")
  for kind, stage, hessian, key in kinds:
    if kind == "eval":
      evaluate = run.steps.eval_step(run.plan.stages[-1])
      fn = lambda s, i: (s, evaluate(s.params, batch, jnp.float32(1.0)))
    elif kind == "score":
      score = run.steps.score_step(candidates["example_ids"].shape[1])
      device_candidates = run.device_batch(candidates)
      fn = lambda s, i, score=score, c=device_candidates: (s, score(s.params, c))
    else:
      step = run.steps.train_step(stage, hessian)
      # A dynamic layer count is timed with every layer running (the charge scales it down).
      at = 0.0 if stage.layer_fraction is not None else 0.5
      args = (batch, jnp.float32(at)) + ((hbatch,) if hessian else ())
      # Each timed step draws its own selection (a Bernoulli subnetwork's size varies).
      fn = lambda s, i, step=step, args=args: step(s, args[0], jax.random.key(i), *args[1:])
    state, seconds = _median_step(fn, state, steps, warmup)
    name = getattr(stage, "name", "score" if kind == "score" else None)
    modelled = {}
    if kind == "train" and not hessian:  # a method may charge a modelled time (K devices)
      model = run.method.modelled_step(run, stage, state, batch, steps, warmup)
      if model is not None:
        modelled = {"modelled": model, "compiled_step_seconds": seconds}
        seconds = float(model["seconds"])
    if anchor is not None and key == anchor[3]:
      scale = table["entries"][key]["seconds"] / seconds
      if verbose:
        print(f"anchor {key}: {seconds * 1e3:.2f} ms here, {table['entries'][key]['seconds'] * 1e3:.2f} ms on "
              f"the reference ({table['entries'][key]['device_kind']}): new kinds scaled by {scale:.3f}")
      continue
    scaled = {} if anchor is None else {  # charged as the reference system's time
        "measured_seconds": seconds, "anchor": anchor[3], "scaled_by": scale, "timed_on": device["device_kind"],
        "device_kind": table["entries"][anchor[3]]["device_kind"]}
    seconds *= scale
    table["entries"][key] = device | modelled | scaled | {
        "seconds": seconds, "n": steps, "kind": kind,
        "stage": name, "shape": None if stage is None else repr(stage.shape),
        "hessian": hessian, "dtype": cfg.model.dtype, "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len, "optimizer": cfg.optimizer.name, "model": repr(run.model_cfg),
        "calibrated": time.strftime("%Y-%m-%d %H:%M:%S")}
    if verbose:
      print(f"{kind:5s} {name or '':>10s} hessian={int(hessian)}: "
            f"{seconds * 1e3:9.2f} ms  (median of {steps}{', scaled' if anchor else ''})  {key}")
  save_table(path, table)
  if verbose:
    print(f"wrote {path}")
  return table


def _median_step(fn, state, steps: int, warmup: int):
  """(state, median seconds) of ``steps`` calls of ``fn(state, i) -> (state, out)`` after the
  compiling call and ``warmup`` untimed ones."""
  times = []
  for i in range(1 + warmup + steps):  # the first call compiles: never timed
    t = time.perf_counter()
    state, out = fn(state, i)
    jax.block_until_ready(out)
    if i > warmup:
      times.append(time.perf_counter() - t)
  return state, statistics.median(times)


def _baseline_anchor(cfg, table, batch, steps: int, warmup: int):
  """((kind, stage, hessian, key), scale) from the full train step of ``cfg`` without its method,
  when the table has it (a method that changes the model, e.g. interlocking's heads, has no
  kind of its own config there to anchor to); None otherwise."""
  from raptr_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  base = cfg.copy_and_resolve_references()
  base.method.name = "baseline"
  run = run_lib.setup(base)
  stage = run.plan.stages[0]
  key = step_kind_key(context_key(base, run.model_cfg), "train", stage.shape, False)
  if key not in table["entries"]:
    return None
  step = run.steps.train_step(stage)
  _, seconds = _median_step(lambda s, i: step(s, batch, jax.random.key(i), jnp.float32(0.5)), run.init(),
                            steps, warmup)
  return ("train", stage, False, key), table["entries"][key]["seconds"] / seconds


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.rst", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  cal = sub.add_parser("calibrate", help="time every step kind of a config's plan on this device")
  cal.add_argument("--config", required=True, help="config file[:preset], e.g. configs/ul2.py:tiny")
  cal.add_argument("--table", default=None, help=f"table to write (default: budget.rst_table or {DEFAULT_TABLE})")
  cal.add_argument("--steps", type=int, default=10)
  cal.add_argument("--warmup", type=int, default=2)
  cal.add_argument("--only_missing", action="store_true",
                   help="time only the kinds the table lacks, scaled to its reference system through a kind "
                        "it has (the comparison runner's default)")
  cal.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
  try:
    cfg = load_config(args.config, args.overrides)
    calibrate(cfg, args.steps, args.warmup, args.table, only_missing=args.only_missing)
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
