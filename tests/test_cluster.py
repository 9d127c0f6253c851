"""A lost process among several (raptr_jax/cluster.py): the survivors name it, say which checkpoint
every process committed and how to resume, and exit (75) instead of waiting in a collective.

The unit tests run the detection and the report on fakes; the last test kills one of two real
processes (2 x 4 CPU devices) after the first checkpoint and checks the survivor's exit time and
that the re-launch ends with the uninterrupted run's losses: process 1 in the default suite,
process 0 (the coordinator) with ``-m faults``."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from raptr_jax import cluster

from test_multihost import _command, _env, _free_port, ROOT


class FakeStore:
  """JAX's key-value store as the distributed client exposes it."""

  def __init__(self):
    self.values, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      assert allow_overwrite or key not in self.values
      self.values[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _heartbeats(store, n, verdicts):
  # silent_s well above any scheduling pause of a loaded test machine: a healthy thread is never judged
  return [cluster.Heartbeat(store, i, n, silent_s=1.5, on_lost=lambda lost, i=i: verdicts.append((i, lost)),
                            interval_s=0.05) for i in range(n)]


def test_the_heartbeat_names_the_process_whose_counter_stopped_and_not_one_that_finished():
  store, verdicts = FakeStore(), []
  beats = _heartbeats(store, 4, verdicts)
  time.sleep(0.2)
  beats[3].close()  # process 3 ends its run normally: done, not lost
  beats[2]._stop.set()  # process 2 dies: its counter stops  pylint: disable=protected-access
  deadline = time.monotonic() + 10
  while len(verdicts) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
  time.sleep(0.1)
  for b in beats:
    b.close()
  assert sorted(verdicts) == [(0, [2]), (1, [2])]
  assert store.values[cluster.Heartbeat.PREFIX + "3"] == cluster.Heartbeat.DONE


@pytest.fixture
def watch(tmp_path, monkeypatch):
  ckpt = tmp_path / "checkpoints"
  for name in ("4", "8", "12.orbax-checkpoint-tmp-3"):  # step 12 unfinished: not committed
    (ckpt / name).mkdir(parents=True)
  monkeypatch.setattr(cluster.WATCH, "process_id", 0)
  monkeypatch.setattr(cluster.WATCH, "num_processes", 2)
  monkeypatch.setattr(cluster.WATCH, "checkpoint_dir", str(ckpt))
  monkeypatch.setattr(cluster.WATCH, "heartbeat", None)
  monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "raptr_jax", "main.py"), "--config=configs/ul2.py:tiny",
                                    "--workdir=runs/two", "--config.distributed.process_id=0"])

  def exit_(code):
    raise SystemExit(code)
  monkeypatch.setattr(cluster.os, "_exit", exit_)
  return ckpt


def test_the_report_names_the_lost_process_the_committed_checkpoint_and_the_command(watch, capfd):
  with pytest.raises(SystemExit) as stop:
    cluster.report_lost([1], "no heartbeat for 15 s")
  assert stop.value.code == cluster.LOST_PROCESS_EXIT == 75
  err = capfd.readouterr().err
  assert "process 1 of 2 was lost (no heartbeat for 15 s)" in err and "process 0 stops here" in err
  assert f"{watch}/8 (step 8)" in err  # the unfinished step 12 is not offered
  assert "re-launch all 2 processes" in err
  assert "python -m raptr_jax.main --config=configs/ul2.py:tiny --workdir=runs/two" in err
  assert "Traceback" not in err


def test_a_collective_failed_by_a_dead_peer_ends_with_the_report_and_code_75(watch, capfd):
  for name in ("4", "8"):
    os.rmdir(watch / name)
  with pytest.raises(SystemExit) as stop:
    cluster.exit_if_peer_lost(jax.errors.JaxRuntimeError("Gloo all-reduce failed: Connection reset by peer"))
  assert stop.value.code == 75
  err = capfd.readouterr().err
  assert "another process of this run was lost (a collective failed: Gloo all-reduce failed" in err
  assert "No checkpoint was committed yet" in err


def test_other_errors_are_left_to_be_raised(watch):
  cluster.exit_if_peer_lost(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"))
  cluster.exit_if_peer_lost(ValueError("Connection closed by peer"))  # not from JAX


def test_a_heartbeat_of_zero_seconds_is_refused_by_name():
  class D:
    heartbeat_s = 0
  with pytest.raises(ValueError, match="distributed.heartbeat_s=0 must be > 0"):
    cluster.initialize(D, "w")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f][1:]


def _launch(tmp_path, workdir, address, extra=()):
  return [subprocess.Popen(
      _command(tmp_path / f"ids_{i}.jsonl", workdir, "--config.distributed.initialize=True",
               f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
               f"--config.distributed.process_id={i}", "--config.distributed.timeout_s=120",
               "--config.distributed.heartbeat_s=10", "--config.checkpoint.every=2", *extra),
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.faults)])
def test_kill_9_of_one_process_ends_the_other_within_the_heartbeat_and_the_relaunch_is_exact(tmp_path, victim):
  straight = _launch(tmp_path, tmp_path / "straight", f"localhost:{_free_port()}")
  for p in straight:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  procs = _launch(tmp_path, tmp_path / "multi", f"localhost:{_free_port()}")
  ckpt = tmp_path / "multi" / "checkpoints"
  deadline = time.monotonic() + 600
  while not (ckpt / "2").exists():  # past the first checkpoint, inside the steps after it
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  procs[victim].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  survivor = procs[1 - victim]
  survivor.wait(timeout=120)
  waited = time.monotonic() - killed
  err = survivor.stderr.read()
  assert survivor.returncode != 0 and waited < 10 + 15, (waited, err[-2000:])
  if victim:  # the survivor hosts the key-value store: the heartbeat names the lost process
    assert survivor.returncode == cluster.LOST_PROCESS_EXIT, err[-2000:]
    assert "process 1 of 2 was lost (no heartbeat for 5 s)" in err and "re-launch all 2 processes" in err, err[-2000:]
  relaunch = _launch(tmp_path, tmp_path / "multi", f"localhost:{_free_port()}")
  for p in relaunch:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "multi")
  assert [r["step"] for r in b] == [r["step"] for r in a]
  np.testing.assert_array_equal([r["train/loss"] for r in b], [r["train/loss"] for r in a])
