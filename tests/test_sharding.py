import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from raptr_jax import sharding as shd
from conftest import ROOT


def test_mesh_shape_fills_and_rejects():
  assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 1, 2, 2)
  assert shd.mesh_shape({"data": 8, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1, 1)
  assert shd.mesh_shape({"data": -1, "stage": 4, "fsdp": 1, "tensor": 1}, 8) == (2, 4, 1, 1)
  with pytest.raises(ValueError, match="product"):
    shd.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    shd.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    shd.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


class FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_logical_rules_and_undivisible_dims():
  m = FakeMesh(data=2, fsdp=2, tensor=2)
  assert shd.spec_for(("layers", "embed", "mlp"), (4, 64, 256), m) == P(None, "fsdp", "tensor")
  assert shd.spec_for(("vocab", "embed"), (8192, 64), m) == P("tensor", "fsdp")
  assert shd.spec_for(("layers", "embed", "mlp"), (4, 63, 256), m) == P(None, None, "tensor")
  assert shd.spec_for(("batch", "length"), (8, 16), m) == P(("data", "fsdp"), None)
  # The pipeline axis splits the main stack's layers, never the auxiliary heads' stack.
  piped = FakeMesh(data=2, stage=4, fsdp=1, tensor=1)
  assert shd.spec_for(("layers", "embed", "mlp"), (8, 64, 256), piped) == P("stage", None, None)
  assert shd.spec_for(("aux_layers", "embed", "mlp"), (8, 64, 256), piped) == P(None, None, None)


def _run_tiny(workdir, devices, mesh, steps=6, extra=(), config="ul2"):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "raptr_jax.main", f"--config=configs/{config}.py:tiny", f"--workdir={workdir}",
         f"--config.budget.value={steps}", "--config.log.every=1", "--config.log.progress_bar=False",
         "--config.model.dtype=float32", "--config.eval.every=0.5",
         *[f"--config.mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor"), mesh)], *extra]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f][1:]  # row 0 is the evaluation before training


PLD = ("--config.method.name=pld", "--config.method.pld.gamma_f=5.0")
HEADS = ("--config.method.name=raptr", "--config.method.raptr.axis=heads", "--config.method.raptr.schedule=1-2")


@pytest.mark.parametrize("config,optimizer,method", [
    ("ul2", "adamw", ()), ("ul2", "sophia_g", ()), ("bert", "adamw", ()), ("t5", "adamw", ()),
    ("ul2", "adamw", PLD), ("t5", "adamw", HEADS)],
    ids=["ul2", "ul2-sophia_g", "bert", "t5", "ul2-pld", "t5-raptr_heads"])
def test_sharded_run_matches_single_device(tmp_path, config, optimizer, method):
  """The same tiny run on 1 device and on 8 fake devices (data=2, fsdp=2, tensor=2), for each
  family; Sophia-G's GNB pass (sampled labels) every 2 steps included; layer dropping (cond) and
  head selection (gathers of tensor-sharded weights) too."""
  extra = (f"--config.optimizer.name={optimizer}", "--config.optimizer.hessian_interval=2", *method)
  single = _run_tiny(tmp_path / "one", 1, (1, 1, 1), extra=extra, config=config)
  sharded = _run_tiny(tmp_path / "eight", 8, (2, 2, 2), extra=extra, config=config)
  assert [r["step"] for r in single] == [r["step"] for r in sharded] == list(range(1, 7))
  for key in ("train/loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in sharded], [r[key] for r in single], rtol=2e-5)
  evals = [(a["eval/loss"], b["eval/loss"]) for a, b in zip(single, sharded) if "eval/loss" in a]
  assert len(evals) == 2
  np.testing.assert_allclose(*zip(*evals), rtol=2e-5)


def test_activation_rules_keep_batch_over_data_and_fsdp():
  m = FakeMesh(data=2, fsdp=4, tensor=2)
  rules = shd.ACTIVATION_RULES
  assert shd.spec_for(("batch", "length", "embed"), (16, 32, 64), m, rules) == P(("data", "fsdp"), None, None)
  assert shd.spec_for(("batch", "length", "vocab"), (16, 32, 256), m, rules) == P(("data", "fsdp"), None, "tensor")
  assert shd.spec_for(("batch", "length", "heads", "head_dim"), (16, 32, 4, 8), m, rules) == P(
      ("data", "fsdp"), None, "tensor", None)
  # A lookup table: its fsdp shards gathered, its vocabulary still over tensor.
  assert shd.spec_for(("vocab", "embed"), (256, 64), m, rules) == P("tensor", None)


def test_constrain_is_identity_outside_a_step_and_checks_rank():
  import jax.numpy as jnp
  x = jnp.ones((4, 8, 16))
  assert shd.constrain(x, ("batch", "length", "embed")) is x
  mesh = shd.make_mesh({"data": 1})
  with shd.activation_sharding(mesh):  # one device: nothing to pin, but the axes must fit
    assert shd.constrain(x, ("batch", "length", "embed")) is x
    with pytest.raises(ValueError, match="2 logical axes"):
      shd.constrain(x, ("batch", "length"))


@pytest.mark.parametrize("config", ["ul2", "t5"])
def test_fsdp_shards_activations_like_data_parallelism(config):
  """The compiled train step's per-device temporaries on 8 devices are about the same for
  data=8, fsdp=8, data=2 x fsdp=4 and data=2 x fsdp=2 x tensor=2 (before the activation constraints, fsdp=8 kept
  full-batch activations and logits: 6.4x data=8's temporaries), and the three give the same
  losses and parameters."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "tests/fsdp_memory_check.py", config, "8,1,1", "1,8,1", "2,4,1", "2,2,2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Involuntary full rematerialization" not in out.stderr  # no re-sharding by replication
  results = json.loads(out.stdout.strip().splitlines()[-1])
  temps = {mesh: r["temp"] for mesh, r in results.items()}
  assert max(temps.values()) < 1.25 * min(temps.values()), temps
  # FSDP shards the parameters: 8x fewer argument bytes than replicating them (the batch aside).
  assert results["1,8,1"]["arguments"] < 0.25 * results["8,1,1"]["arguments"]
  data = results["8,1,1"]
  for mesh in ("1,8,1", "2,4,1", "2,2,2"):  # 2,2,2: heads, MLP units and vocabulary over tensor too
    np.testing.assert_allclose(results[mesh]["losses"], data["losses"], rtol=1e-5)
    np.testing.assert_allclose(results[mesh]["param_sums"], data["param_sums"], rtol=1e-5)
