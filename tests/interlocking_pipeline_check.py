"""Run by ``test_interlocking.py`` in a process with fake CPU devices (``XLA_FLAGS``): for each
mode given, one train step of interlocking backprop pipelined over ``mesh.stage = K`` (and
``mesh.data`` = the remaining devices) against the same step unpipelined on one device of the
same process, from the same state and batch. Prints one JSON line per mode: the largest
relative difference of the parameter updates (per leaf, against the
largest update), the routed gradients and the logged metrics.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/interlocking_pipeline_check.py \\
        '[{"family": "decoder", "components": 4, "n": 2}]'
"""
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import load_config, quiet  # pylint: disable=wrong-import-position
from raptr_jax import run as run_lib  # pylint: disable=wrong-import-position
from raptr_jax.data import pipeline  # pylint: disable=wrong-import-position


MESH_KEYS = ("fsdp", "tensor")
CONFIGS = {"decoder": ("ul2", "tiny"), "bert": ("bert", "tiny"), "gpt": ("gpt", "tiny_interlocking")}


def _config(mode: dict, stage: int):
  """``mode``: family (decoder: UL2, untied; gpt: tied, learned positions; bert), layers, mesh
  fsdp / tensor sizes of the pipelined run, and ``method.interlocking`` options."""
  cfg = quiet(load_config(*CONFIGS[mode["family"]]))
  cfg.model.update(num_layers=mode.get("layers", 4), dtype="float32")
  # Adam's first step is g / (|g| + eps): with eps = 1e-8 it is sign(g) and turns float noise in
  # near-zero gradient entries into whole updates (an update's error is about the gradient's
  # times max|g| / eps); a larger eps keeps the update a smooth function of the gradient, so
  # the comparison measures the routing, not that conditioning.
  cfg.optimizer.eps = 1e-2
  cfg.method.name = "interlocking"
  options = {k: v for k, v in mode.items() if k not in ("family", "layers") + MESH_KEYS}
  cfg.method.interlocking.update(**options)
  if stage == 1:
    cfg.mesh.update(data=1, stage=1, fsdp=1, tensor=1)
  else:
    other = {k: mode.get(k, 1) for k in MESH_KEYS}
    cfg.mesh.update(data=jax.device_count() // (stage * other["fsdp"] * other["tensor"]), stage=stage, **other)
  return cfg


def _setup(cfg, devices):
  """``run_lib.setup`` on ``devices`` (the first device alone: the single-device version)."""
  return run_lib.setup(cfg, devices=devices)


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def check(mode: dict) -> dict:
  K = mode["components"]
  single = _setup(_config(mode, 1), jax.devices()[:1])
  piped = _setup(_config(mode, K), jax.devices())
  state = jax.device_get(single.init())  # on the host: each run places (and donates) its own copy
  stream = pipeline.build_stream(single.cfg.data, "train", single.cfg.data.batch_size, single.cfg.seed, train=True)
  batch = stream.next_batch()
  key, progress = jax.random.key(7), np.float32(0.5)
  stage = single.plan.stages[0]
  out = {}
  for name, run in (("single", single), ("pipelined", piped)):
    placed = jax.device_put(state, run.steps.ctx.state_shardings)
    ctx = run.steps.ctx
    model_of = lambda p, ctx=ctx: nnx.merge(ctx.graphdef, p)
    grads = jax.jit(run.method.value_and_grad(ctx, model_of))(placed.params, run.device_batch(batch))[1]
    new_state, metrics = run.steps.train_step(stage)(placed, run.device_batch(batch), key, progress)
    out[name] = jax.device_get((new_state.params, grads, metrics))
  (p1, g1, m1), (p2, g2, m2) = out["single"], out["pipelined"]
  sharded = piped.steps.ctx.state_shardings.params["layers"]
  before = jax.tree.leaves(state.params)
  updates = lambda params: [np.asarray(p, np.float64) - np.asarray(q, np.float64)
                            for p, q in zip(jax.tree.leaves(params), before)]
  return {"mode": mode, "updates": max(_relative(a, b) for a, b in zip(updates(p2), updates(p1))),
          "grads": max(_relative(a, b) for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1))),
          "metrics": {k: _relative(m2[k], m1[k]) for k in m1 if k in m2},
          "unmatched_metrics": sorted(set(m1) ^ set(m2)),
          "layer_spec": str(jax.tree.leaves(sharded, is_leaf=lambda x: hasattr(x, "spec"))[0].spec),
          "mesh": dict(piped.mesh.shape)}


if __name__ == "__main__":
  for m in json.loads(sys.argv[1]):
    print(json.dumps(check(m)), flush=True)
