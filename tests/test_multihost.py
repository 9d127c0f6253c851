"""Several processes on one machine (jax.distributed with a local coordinator, CPU collectives):
2 processes x 4 devices train exactly as 1 process x 8 devices, each process reading only
its own shard of the training stream."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT

STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(ids_file, workdir, *extra):
  return [sys.executable, "tests/multihost_check.py", str(ids_file), "--config=configs/ul2.py:tiny",
          f"--workdir={workdir}", f"--config.budget.value={STEPS}", "--config.log.every=1",
          "--config.log.progress_bar=False", "--config.log.tensorboard=False", "--config.model.dtype=float32",
          "--config.eval.every=0.5", "--config.data.shards=2", "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.checkpoint.async_save=False", *extra]


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def _ids(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f][1:]


def test_two_processes_of_four_devices_train_as_one_of_eight(tmp_path):
  single = subprocess.run(_command(tmp_path / "ids_single.jsonl", tmp_path / "single"), cwd=ROOT, env=_env(8),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  # The two-process run is stopped after step 3 and resumed: its checkpoint holds both
  # processes' stream positions (gathered), and each resumes its own shard from there.
  for extra in (("--config.train.stop_at_step=3", "--config.checkpoint.every=3"), ("--config.checkpoint.every=3",)):
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(_command(tmp_path / f"ids_{i}.jsonl", tmp_path / "multi", "--config.distributed.initialize=True",
                                       f"--config.distributed.coordinator_address={address}",
                                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                                       "--config.distributed.timeout_s=120", *extra),
                              cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
  assert "resumed from" in outs[0][0]
  straight, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
  assert [r["step"] for r in multi] == [r["step"] for r in straight] == list(range(1, STEPS + 1))
  for key in ("train/loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in straight], rtol=1e-5)
  # Each process read only its own rows: process i the rows of shard i, half of every global batch.
  # (The prefetcher reads ahead of the stop: the resumed run's batches follow the 3 used ones.)
  whole = _ids(tmp_path / "ids_single.jsonl")
  first, second = [_ids(tmp_path / f"ids_{i}.jsonl") for i in range(2)]
  def used(read):  # each process read ahead on its own: its resumed run starts again at batch 4
    again = [i for i, batch in enumerate(read) if i > 3 and batch == read[3]]
    assert again, "the resumed run did not start at the 4th batch"
    return read[:3] + read[again[0]:]
  first, second = used(first), used(second)
  steps = min(len(first), len(second), len(whole))
  assert steps >= STEPS
  for batch, a, b in zip(whole[:steps], first, second):
    assert len(a) == len(b) == len(batch) // 2
    assert a + b == batch  # the global batch is shard 0's rows, then shard 1's
    assert not {i for row in a for i in row} & {i for row in b for i in row}


def test_a_coordinator_that_cannot_be_reached_times_out_with_a_message(tmp_path):
  start = time.monotonic()
  out = subprocess.run(_command(tmp_path / "ids.jsonl", tmp_path / "w", "--config.distributed.initialize=True",
                                f"--config.distributed.coordinator_address=localhost:{_free_port()}",
                                "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
                                "--config.distributed.timeout_s=3"),
                       cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and time.monotonic() - start < 60
  assert "could not reach the coordinator at localhost:" in out.stderr and "Traceback" not in out.stderr
