"""Ahead-of-time compilation for TPU slices on this CPU machine (raptr_jax.aot, topology.py).

The compile tests need libtpu (in the test extras on Linux: compile-only TPU devices); each
runs the command in a subprocess, as a user runs it, so the TPU plugin never loads into the
test workers."""
import json
import os
import platform
import subprocess
import sys

import pytest

from raptr_jax import topology
from conftest import ROOT

needs_libtpu = pytest.mark.skipif(platform.system() != "Linux",
                                  reason="libtpu (compile-only TPU devices) ships for Linux only")


def test_slice_names_give_the_cloud_tpu_chip_grids():
  assert topology.parse("v4-8") == ("v4", (2, 2, 1))           # 8 TensorCores = 4 chips
  assert topology.parse("v4-32") == ("v4", (2, 2, 4))
  assert topology.parse("v5p-64") == ("v5p", (2, 4, 4))
  assert topology.parse("v5p-128") == ("v5p", (4, 4, 4))
  assert topology.parse("v5p-1024") == ("v5p", (8, 8, 8))
  assert topology.parse("v5e-1") == ("v5e", (1, 1))
  assert topology.parse("v5litepod-8") == ("v5e", (2, 4))
  assert topology.parse("v5e-256") == ("v5e", (16, 16))
  assert topology.parse("v6e-64") == ("v6e", (8, 8))
  assert topology.parse("V5P:4x4x8") == ("v5p", (4, 4, 8))


def test_hosts_hold_four_chips_of_a_3d_slice_and_up_to_eight_of_a_2d_one():
  assert topology.host_bounds((4, 4, 4)) == (2, 2, 1)   # v5p-128: 16 hosts
  assert topology.host_bounds((2, 4)) == (2, 4, 1)      # v5e-8: one host
  assert topology.host_bounds((4, 4)) == (2, 2, 1)      # v5e-16: 4 hosts
  assert topology.host_bounds((1, 1)) == (1, 1, 1)


@pytest.mark.parametrize("name,message", [
    ("v9-8", "unknown topology 'v9-8'"), ("tpu", "unknown topology"), ("v4-7", "two per chip"),
    ("v5e-6", "power-of-two"), ("v4-4", "at least 4"), ("v5e:2x2x2", "2-D chip grid")])
def test_bad_slice_names_are_refused_clearly(name, message):
  with pytest.raises(ValueError, match=message):
    topology.parse(name)


def _aot(tmp_path, *args, config="ul2.py:tiny"):
  report = tmp_path / "report.json"
  out = subprocess.run([sys.executable, "-m", "raptr_jax.aot", f"--config=configs/{config}", *args,
                        f"--report={report}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return out, (json.loads(report.read_text()) if report.exists() else None)


@needs_libtpu
def test_tiny_config_compiles_for_small_tpu_slices(tmp_path):
  """The real train and eval steps compile for a v4-8 (4 megacore chips) with data parallelism,
  and with FSDP: per-device parameters and optimizer state shrink 4x, the total stays far
  under the chip's 32 GiB, and the printed table and the JSON report agree."""
  out, data = _aot(tmp_path, "--topology=v4-8")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "v4 2x2x1, 4 chips" in out.stdout and "train stage 0" in out.stdout
  assert "WARNING" not in out.stderr  # libtpu's missing-metadata warnings are quieted
  assert data["mesh"] == {"data": 4, "stage": 1, "fsdp": 1, "tensor": 1}
  assert data["hbm_bytes"] == 32 * 2 ** 30
  names = [s["name"] for s in data["steps"]]
  assert names[0].startswith("train stage 0") and names[-1] == "eval (full model)"
  train = data["steps"][0]
  assert 0 < train["total"] < 2 ** 30 and train["flops"] > 0 and train["model_flops"] > 0
  assert train["arguments"] >= data["state"]["parameters"] + data["state"]["optimizer state"]
  out, fsdp = _aot(tmp_path, "--topology=v4-8", "--config.mesh.data=1", "--config.mesh.fsdp=4")
  assert out.returncode == 0, out.stderr[-3000:]
  for part in ("parameters", "optimizer state"):
    assert fsdp["state"][part] <= data["state"][part] / 3.5


@needs_libtpu
def test_multislice_and_every_step_kind(tmp_path):
  """Two v5e-4 slices over DCN (data crosses slices, fsdp within); random-LTD's distinct
  stages (--stages=all) each compile; batch selection's scoring pass compiles too."""
  out, data = _aot(tmp_path, "--topology=v5e-4", "--slices=2", "--config.mesh.data=2", "--config.mesh.fsdp=-1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert data["mesh"]["data"] == 2 and data["mesh"]["fsdp"] == 4 and "2 slice(s), 8 devices" in data["description"]
  out, data = _aot(tmp_path, "--topology=v5e-4", "--stages=all", config="gpt.py:tiny_random_ltd")
  assert out.returncode == 0, out.stderr[-3000:]
  assert [s["name"].split(" (")[0] for s in data["steps"]][:4] == [f"train stage {i}" for i in range(4)]
  out, data = _aot(tmp_path, "--topology=v4-8", config="bert.py:tiny_rho_loss")
  assert out.returncode == 0, out.stderr[-3000:]
  assert data["steps"][-1]["name"].startswith("scoring pass")


@needs_libtpu
def test_bad_topologies_meshes_and_a_config_that_does_not_fit(tmp_path):
  out, _ = _aot(tmp_path, "--topology=v9-8")
  assert out.returncode == 1 and "unknown topology 'v9-8'" in out.stderr and "Traceback" not in out.stderr
  out, _ = _aot(tmp_path, "--topology=v4-8", "--config.mesh.data=3")
  assert out.returncode == 1 and "topology v4-8 (4 devices" in out.stderr and "product is 4" in out.stderr
  out, _ = _aot(tmp_path, "--topology=v5e-4", "--slices=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  assert out.returncode == 1 and "mesh.data must be a multiple of 2" in out.stderr
  # 4 hosts of a v5e-16 with 2 rows each cannot split into 4 microbatches per host.
  out, _ = _aot(tmp_path, "--topology=v5e-16", "--config.mesh.data=1", "--config.mesh.tensor=-1",
                "--config.train.microbatches=4")
  assert out.returncode == 1 and "does not divide the 2 rows of each of the 4 hosts" in out.stderr, out.stderr[-2000:]
  # Full-batch logits of 512 rows x 2048 positions on 4 chips of 16 GiB: the activations dominate.
  out, data = _aot(tmp_path, "--topology=v5e-4", "--config.data.batch_size=512", "--config.data.seq_len=2048",
                   "--config.model.max_len=2048")
  assert out.returncode == 1 and data is None, out.stderr[-3000:]
  assert "does not fit: train stage 0" in out.stderr and "Traceback" not in out.stderr
  assert "activations (temporaries) dominate" in out.stderr
  for knob in ("model.remat=dots", "train.microbatches=2", "mesh.fsdp"):
    assert knob in out.stderr
