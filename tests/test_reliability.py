"""Reliability: corrupt checkpoints, config changes on resume, the workdir lock, metrics that
hold each step once, preemption by SIGTERM / SIGINT, SIGKILL at random moments, huge budgets."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from raptr_jax import checkpoint as ckpt_lib
from raptr_jax import train as train_lib
from raptr_jax import workdir as workdir_lib
from raptr_jax.metrics import read_metrics
from conftest import ROOT, load_config, quiet


def _final_state(cfg, workdir):
  """(step, the train state) of the newest checkpoint in ``workdir``."""
  run = train_lib.setup(cfg)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 0, False, writer=False)
  step, state, _, _ = checkpointer.restore_latest(run.abstract_state, train_lib.run_meta(cfg, run.model_cfg))
  checkpointer.close()
  return step, state


def _assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_each_step_once(workdir):
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == sorted(set(steps)), steps


@pytest.fixture
def cfg12(tiny_config):
  cfg = tiny_config
  cfg.budget.value, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.log.every = 12, 4, 3, 1
  return cfg


def _biggest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _truncate(step_dir):
  f = _biggest_data_file(step_dir)
  os.truncate(f, os.path.getsize(f) // 2)


def _overwrite(step_dir):
  """Overwrites 64 bytes of a data file in place where orbax reads the file back without an
  error but with other values (inside an incompressible array, stored as a raw zstd block):
  the silent corruption only the fingerprints catch. Found by trying spots on a copy."""
  import orbax.checkpoint as ocp
  read = lambda d: jax.tree.leaves(ocp.StandardCheckpointer().restore(os.path.join(d, "state")))
  original = read(step_dir)
  scratch = step_dir + ".scratch"
  files = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
  for path in reversed(files):
    for fraction in (0.5, 0.3, 0.7, 0.9, 0.1):
      shutil.rmtree(scratch, ignore_errors=True)
      shutil.copytree(step_dir, scratch)
      offset = int(os.path.getsize(path) * fraction)
      with open(os.path.join(scratch, os.path.relpath(path, step_dir)), "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).bytes(64))
      try:
        changed = any(not np.array_equal(a, b) for a, b in zip(read(scratch), original))
      except Exception:  # pylint: disable=broad-except  (orbax noticed: not the silent case)
        changed = False
      shutil.rmtree(scratch)
      if changed:
        with open(path, "r+b") as fh:
          fh.seek(offset)
          fh.write(np.random.default_rng(0).bytes(64))
        return
  raise AssertionError("no spot found where an overwrite is read back silently")


def _torn_meta(step_dir):
  os.truncate(os.path.join(step_dir, "meta", "metadata"), 40)


def _missing_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("corrupt,names", [(_truncate, "state/.*OUT_OF_RANGE"),
                                           (_overwrite, "read back differ"),
                                           (_torn_meta, "meta/metadata"),
                                           (_missing_state_metadata, "state/")])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one_and_the_run_ends_identical(
    cfg12, tmp_path, capsys, corrupt, names):
  train_lib.train(cfg12, str(tmp_path / "straight"))
  cfg12.train.stop_at_step = 10  # checkpoints at 4 and 8, then "killed"
  train_lib.train(cfg12, str(tmp_path / "run"))
  cfg12.train.stop_at_step = 0
  corrupt(str(tmp_path / "run" / "checkpoints" / "8"))
  capsys.readouterr()
  train_lib.train(cfg12, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "checkpoints/8 is corrupt" in out and "falling back to checkpoint" in out and "/4" in out
  import re
  assert re.search(names, out), out
  assert os.path.isdir(tmp_path / "run" / "corrupt_checkpoints" / "8")  # set aside, not deleted
  assert "resumed from" in out and "/checkpoints/4 at" in out
  _assert_same_state(_final_state(cfg12, tmp_path / "straight")[1], _final_state(cfg12, tmp_path / "run")[1])
  _assert_each_step_once(tmp_path / "run")
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(13))


def test_with_no_checkpoint_restorable_the_run_stops_and_nothing_is_moved(cfg12, tmp_path):
  cfg12.train.stop_at_step = 10
  train_lib.train(cfg12, str(tmp_path))
  cfg12.train.stop_at_step = 0
  for step in (4, 8):
    _overwrite(str(tmp_path / "checkpoints" / str(step)))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"(?s)no checkpoint in .* restores.*/8 is corrupt.*/4 is "
                                                      r"corrupt.*Nothing was moved or deleted"):
    train_lib.train(cfg12, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")


def test_a_checkpoint_of_another_model_is_refused_not_skipped(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.budget.value = 4
  train_lib.train(cfg, str(tmp_path))
  cfg.budget.value = 8
  cfg.model.d_model = 32
  with pytest.raises(workdir_lib.ConfigChanged, match=r"(?s)budget.value: 4.0 there, 8.0 here.*"
                                                      r"model.d_model: 64 there, 32 here.*allow_config_changes"):
    train_lib.train(cfg, str(tmp_path))
  cfg.train.allow_config_changes = True  # allowed changes still cannot restore another model
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model.d_model: 64 there, 32 here.*fresh --workdir"):
    train_lib.train(cfg, str(tmp_path))


def test_config_changes_on_resume_are_refused_or_recorded_with_the_step(cfg12, tmp_path):
  cfg12.train.stop_at_step = 6
  train_lib.train(cfg12, str(tmp_path))
  cfg12.train.stop_at_step = 0
  cfg12.log.every, cfg12.checkpoint.every, cfg12.eval.every = 3, 2, 0.25  # how, not what: free
  peak = cfg12.schedule.peak
  cfg12.schedule.peak, cfg12.seed, cfg12.data.objective = 2 * peak, 1, "causal_lm"
  with pytest.raises(workdir_lib.ConfigChanged) as err:
    train_lib.train(cfg12, str(tmp_path))
  message = str(err.value)
  for line in ("data.objective: 'ul2' there, 'causal_lm' here", f"schedule.peak: {peak!r} there, {2 * peak!r} here",
               "seed: 0 there, 1 here"):
    assert line in message
  assert "log.every" not in message and "checkpoint.every" not in message and "eval.every" not in message
  cfg12.data.objective, cfg12.seed = "ul2", 0
  cfg12.train.allow_config_changes = True
  train_lib.train(cfg12, str(tmp_path))
  with open(tmp_path / "starts.jsonl") as f:
    starts = [json.loads(line) for line in f]
  assert [s["step"] for s in starts] == [0, 4]  # the resume started from the checkpoint at step 4
  assert starts[1]["changes"] == {"schedule.peak": [peak, 2 * peak]}
  assert starts[1]["config"]["schedule.peak"] == 2 * peak
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["schedule"]["peak"] == 2 * peak


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_owner_does_not_block(tiny_config, tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirBusy, match=rf"in use by a running run \(pid {os.getpid()} on host"):
      train_lib.train(tiny_config, str(tmp_path))
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from raptr_jax.workdir import WorkdirLock;"
                             f"l = WorkdirLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); time.sleep(600)"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(workdir_lib.WorkdirBusy, match=rf"pid {holder.pid}"):
    train_lib.train(tiny_config, str(tmp_path))
  holder.kill()  # SIGKILL: the kernel drops its lock
  holder.wait()
  tiny_config.budget.value = 2
  assert train_lib.train(tiny_config, str(tmp_path))["step"] == 2


def test_metrics_hold_each_step_once_after_kills_and_warn_about_lost_rows(cfg12, tmp_path, capsys):
  tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  cfg12.log.tensorboard = True
  cfg12.train.stop_at_step = 3  # killed before the first checkpoint: the restart is a fresh start
  train_lib.train(cfg12, str(tmp_path))
  cfg12.train.stop_at_step = 7  # checkpoint at 4, killed after 7
  train_lib.train(cfg12, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "train/lo')  # a torn last line
  cfg12.train.stop_at_step = 10
  capsys.readouterr()
  train_lib.train(cfg12, str(tmp_path))
  assert "its last line is not complete JSON" in capsys.readouterr().out
  assert [r["step"] for r in read_metrics(tmp_path)] == list(range(11))
  cfg12.train.stop_at_step = 0
  train_lib.train(cfg12, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(13))
  acc = tb.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  events = acc.Scalars("train/loss")
  assert [e.step for e in events] == list(range(1, 13))
  np.testing.assert_allclose([e.value for e in events], [r["train/loss"] for r in rows[1:]], rtol=1e-6)
  cfg12.budget.value, cfg12.train.allow_config_changes = 16, True
  os.remove(tmp_path / "metrics.jsonl")
  capsys.readouterr()
  train_lib.train(cfg12, str(tmp_path))
  assert "metrics.jsonl is missing, but it held 13 when the checkpoint at step 12 was written" in capsys.readouterr().out
  assert [r["step"] for r in read_metrics(tmp_path)] == list(range(13, 17))


def test_a_paper_size_budget_starts_at_once(tiny_config, tmp_path, capsys):
  cfg = tiny_config
  cfg.budget.unit, cfg.budget.value, cfg.train.stop_at_step = "tokens", 1e12, 2
  cfg.eval.at_start = False
  out = train_lib.train(cfg, str(tmp_path))
  assert out["stopped"] and out["step"] == 2
  assert f"{-(-10**12 // (8 * 64)):,} steps" in capsys.readouterr().out


# --- signals, in real processes -----------------------------------------------------------------

def _env():
  cache = os.path.join(os.environ.get("RAPTR_TEST_JAX_CACHE", "/tmp/raptr_jax_test_cache"), "subprocess")
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


RUN_ARGS = ("--config=configs/ul2.py:tiny", "--config.log.progress_bar=False", "--config.log.tensorboard=False",
            "--config.log.every=1", "--config.eval.every=0.25", "--config.eval.batches=1")


def _start(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "raptr_jax.main", *RUN_ARGS, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir):
  try:
    return len(read_metrics(workdir))
  except (OSError, ValueError):
    return 0


def _wait_for(condition, proc, timeout=240):
  t0 = time.time()
  while not condition():
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() - t0 < timeout
    time.sleep(0.01)


def _config_of(*extra):
  cfg = quiet(load_config("ul2", "tiny"))
  from raptr_jax.config import apply_overrides
  return apply_overrides(cfg, [a.removeprefix("--") for a in RUN_ARGS[1:] + extra])


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_current_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, sig, code):
  extra = ("--config.budget.value=100", "--config.checkpoint.every=0")  # no periodic checkpoint
  proc = _start(tmp_path / "run", *extra)
  _wait_for(lambda: _logged_steps(tmp_path / "run") >= 5, proc)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == code, out
  import re
  received = re.search(rf"{sig.name} received during step (\d+)", out)
  written = re.search(rf"{sig.name}: checkpoint .*/checkpoints/(\d+) written at step (\d+)", out)
  assert received and written, out
  step = int(received.group(1))
  assert int(written.group(1)) == step and step < 100
  assert [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()] == [str(step)]
  assert read_metrics(tmp_path / "run")[-1]["step"] == step
  resumed = _start(tmp_path / "run", *extra)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0 and f"checkpoints/{step} at" in out, out
  cfg = _config_of(*extra)
  train_lib.train(cfg, str(tmp_path / "straight"))
  _assert_same_state(_final_state(cfg, tmp_path / "straight")[1], _final_state(cfg, tmp_path / "run")[1])
  straight, run = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "run")
  assert [r["step"] for r in run] == [r["step"] for r in straight]
  assert [r.get("train/loss") for r in run] == [r.get("train/loss") for r in straight]


def test_the_first_signal_is_noted_and_a_second_one_gets_the_previous_action():
  from raptr_jax.preemption import Preemption
  before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with Preemption() as preemption:
    preemption.current_step = 7
    assert not preemption.requested(6)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # the Python-level handler runs at the next bytecode
    assert preemption.requested(7) and preemption.signal == "SIGTERM" and preemption.step_at_signal == 7
    # A second SIGTERM now meets the default action: the process ends at once, wherever it is.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) not in (signal.SIG_DFL, before_int)
  with Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert preemption.signal == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before_int  # a second Ctrl-C: what it did before
  assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is before_int


def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tmp_path):
  """Fault injection: each trial kills a run with SIGKILL (at a random moment, or the moment an
  asynchronous checkpoint write is seen in progress), resumes it to completion, and compares its
  final parameters and metrics with an uninterrupted run."""
  extra = ("--config.budget.value=40", "--config.checkpoint.every=3", "--config.checkpoint.async_save=True")
  cfg = _config_of(*extra)
  train_lib.train(cfg, str(tmp_path / "straight"))
  _, want = _final_state(cfg, tmp_path / "straight")
  want_losses = [r.get("train/loss") for r in read_metrics(tmp_path / "straight")]
  rng = random.Random(0)
  during_write = 0
  for trial in range(4):
    where = tmp_path / f"trial{trial}"
    for kill in range(2):  # killed twice, then resumed to the end
      proc = _start(where, *extra)
      if trial % 2:  # the moment a checkpoint is being written (orbax's temporary folder exists)
        writing = lambda: glob.glob(str(where / "checkpoints" / f"*{ckpt_lib.TMP_MARK}*"))
        _wait_for(lambda: writing() and _logged_steps(where) > 1 + 10 * kill, proc)
      else:  # a random moment after the first steps
        _wait_for(lambda: _logged_steps(where) > 1 + 10 * kill, proc)
        time.sleep(rng.uniform(0.0, 0.3))
      os.kill(proc.pid, signal.SIGKILL)
      proc.communicate()
      during_write += bool(glob.glob(str(where / "checkpoints" / f"*{ckpt_lib.TMP_MARK}*")))
    proc = _start(where, *extra)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "done: 40 steps" in out, out
    assert not glob.glob(str(where / "checkpoints" / f"*{ckpt_lib.TMP_MARK}*"))  # unfinished writes removed
    _assert_same_state(want, _final_state(cfg, where)[1])
    assert [r.get("train/loss") for r in read_metrics(where)] == want_losses, trial
  assert during_write >= 1  # some kills did land during an asynchronous write


def test_resume_allows_how_fields_refuses_changed_files_and_fingerprints_any_layout(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.budget.value, cfg.checkpoint.every, cfg.train.stop_at_step = 8, 4, 4
  train_lib.train(cfg, str(tmp_path / "a"))
  cfg.train.stop_at_step = 0
  cfg.model.remat, cfg.eval.batches = "dots", 1  # how the model runs / is watched: a resume may change it
  assert train_lib.train(cfg, str(tmp_path / "a"))["step"] == 8
  # A files corpus that changes under the same config is refused at the resume.
  import gzip
  from raptr_jax.data import corpus
  folder = tmp_path / "corpus"
  folder.mkdir()
  docs = [d["text"] for d in corpus.read_documents("validation")]
  with gzip.open(folder / "a.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in docs[:20])
  files = quiet(load_config("ul2", "tiny"))
  files.data.source, files.data.files.train, files.data.token_cache = "files", str(folder / "*.jsonl.gz"), str(tmp_path / "c")
  files.data.files.validation_share = 0.25
  files.budget.value, files.checkpoint.every, files.train.stop_at_step = 8, 4, 4
  train_lib.train(files, str(tmp_path / "b"))
  with gzip.open(folder / "b.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in docs[20:30])
  files.train.stop_at_step = 0
  with pytest.raises(ValueError, match="the training data changed since this position was saved"):
    train_lib.train(files, str(tmp_path / "b"))
  files.train.allow_config_changes = True
  assert train_lib.train(files, str(tmp_path / "b"))["step"] == 8
  # Fingerprints: the row-major weighted sum, the same for any array layout.
  x = {"a": jax.numpy.arange(24, dtype=jax.numpy.float32).reshape(2, 3, 4), "b": jax.numpy.ones((5,), jax.numpy.bfloat16)}
  bits = np.asarray(jax.lax.bitcast_convert_type(x["a"], jax.numpy.uint32)).astype(np.uint64).reshape(-1)
  want = int((bits * (2 * np.arange(24, dtype=np.uint64) + 1)).sum() % (1 << 32))
  assert ckpt_lib.fingerprints(x)["['a']"] == want
  err = ckpt_lib._unreadable("d", 4, "state/: ", ValueError("UNAVAILABLE: connection reset"))  # pylint: disable=protected-access
  assert type(err) is ckpt_lib.CheckpointError and "transient" in str(err)
  assert isinstance(ckpt_lib._unreadable("d", 4, "state/: ", ValueError("OUT_OF_RANGE: x")), ckpt_lib.CorruptCheckpoint)  # pylint: disable=protected-access


def test_after_sigkill_between_checkpoints_tensorboard_holds_every_step_once(tmp_path):
  """TensorBoard events are written at each logged step and synced with each checkpoint, so a
  run killed between checkpoints and resumed shows every step exactly once, with the values of
  metrics.jsonl (tensorboardX's queue lost the steps before the checkpoint a resume purges from)."""
  tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  extra = ("--config.budget.value=20", "--config.checkpoint.every=5", "--config.log.tensorboard=True")
  where = tmp_path / "run"
  proc = _start(where, *extra)
  # Soon after the checkpoint of step 5 (row 0 is the evaluation at the start), before step 10's:
  # tensorboardX's buffered writer had not written any of steps 1-5 to the file by then.
  _wait_for(lambda: os.path.isdir(where / "checkpoints" / "5") and _logged_steps(where) >= 7, proc)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  assert [d for d in os.listdir(where / "checkpoints") if d.isdigit()] == ["5"]
  out, _ = _start(where, *extra).communicate(timeout=240)
  assert "done: 20 steps" in out and "checkpoints/5 at" in out, out
  rows = read_metrics(where)
  assert [r["step"] for r in rows] == list(range(21))
  acc = tb.EventAccumulator(str(where / "tensorboard"))
  acc.Reload()
  for tag in ("train/loss", "grad_norm"):
    events = acc.Scalars(tag)
    assert [e.step for e in events] == list(range(1, 21)), tag
    np.testing.assert_allclose([e.value for e in events], [r[tag] for r in rows[1:]], rtol=1e-6)
