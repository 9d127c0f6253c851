"""Compiled per-device memory and results of one config's train step on several meshes of the
same devices (run by tests/test_sharding.py on 8 fake CPU devices; prints one JSON line):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/fsdp_memory_check.py ul2 1,8,1 8,1,1 2,4,1
"""
import json
import sys

import jax
import numpy as np

from raptr_jax import run as run_lib
from raptr_jax.config import apply_overrides, load_config
from raptr_jax.data.corruption import target_length
from raptr_jax.data.pipeline import synthetic_batch


def measure(config: str, mesh: tuple[int, int, int], steps: int = 2):
  cfg = load_config(f"configs/{config}.py:tiny")
  cfg = apply_overrides(cfg, [f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)] + [
      "data.source=synthetic", "data.batch_size=64", "data.seq_len=128", "model.vocab_size=4096",
      "model.dtype=float32"])
  run = run_lib.setup(cfg)
  step = run.steps.train_step(run.plan.stages[0])
  batches = [synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, 4096, seed=i, family=cfg.model.family,
                             target_len=target_length(cfg.data)) for i in range(steps)]
  first = run.device_batch(batches[0])
  compiled = step.lower(run.abstract_state, first, jax.random.key(0), np.float32(0)).compile()
  memory = compiled.memory_analysis()
  state, losses = run.init(), []
  for i, batch in enumerate(batches):
    state, metrics = step(state, run.device_batch(batch), jax.random.key(i), np.float32(i / steps))
    losses.append(float(metrics["loss"]))
  params = [float(np.abs(np.asarray(p)).sum()) for p in jax.tree.leaves(state.params)]
  return {"temp": memory.temp_size_in_bytes, "arguments": memory.argument_size_in_bytes,
          "losses": losses, "param_sums": params}


if __name__ == "__main__":
  config, meshes = sys.argv[1], [tuple(int(n) for n in m.split(",")) for m in sys.argv[2:]]
  print(json.dumps({",".join(map(str, m)): measure(config, m) for m in meshes}))
