"""Faults of one process that must lose nothing and say what happened: failed checkpoint,
metrics, TensorBoard and token-cache writes, advice that works when followed (a diverged run),
and bad input answered with the real problem (empty vocabulary, unknown config section, corrupt
checkpoint meta, a workdir that is a file) without a stack trace."""
import errno
import gc
import glob
import json
import os
import re
import sys

import jax
import numpy as np
import pytest

from raptr_jax import checkpoint as ckpt_lib
from raptr_jax import cli
from raptr_jax import config as config_lib
from raptr_jax import metrics as metrics_lib
from raptr_jax import train as train_lib
from raptr_jax.data import token_cache, vocab as vocab_lib
from raptr_jax.metrics import read_metrics
from conftest import ROOT, load_config, quiet
from test_reliability import _assert_same_state, _final_state


def _steps_on_disk(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _cfg16():
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.budget.value, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.log.every = 16, 4, 2, 1
  return cfg


@pytest.fixture(scope="module")
def straight16(tmp_path_factory):
  """An uninterrupted run of ``_cfg16()``: (its final state, its logged losses)."""
  where = tmp_path_factory.mktemp("straight16")
  cfg = _cfg16()
  train_lib.train(cfg, str(where))
  return _final_state(cfg, where)[1], [r.get("train/loss") for r in read_metrics(where)]


def _fail_meta_writes(monkeypatch, steps, error=errno.ENOSPC):
  """Makes orbax's write of the checkpoint meta (in its background commit thread, as a real
  write is) fail at ``steps`` with ``error``."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
  original = handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def failing(self, item, directory):
    if item.get("step") in steps:
      raise OSError(error, os.strerror(error), str(directory / "metadata"))
    return await original(self, item, directory)
  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", failing)


# --- checkpoint writes --------------------------------------------------------------------------

def test_a_failed_checkpoint_write_stops_with_the_file_keeps_the_others_and_resumes_exactly(
    tmp_path, monkeypatch, capsys, straight16):
  cfg = _cfg16()
  _fail_meta_writes(monkeypatch, {12})
  with pytest.raises(ckpt_lib.CheckpointWriteError) as err:
    train_lib.train(cfg, str(tmp_path))
  message = str(err.value)
  assert "checkpoints/12 could not be written: No space left on device (writing " in message
  assert "12.orbax-checkpoint-tmp" in message and "meta" in message  # the file
  assert "intact (latest: step 8)" in message and "re-run the same command to resume from step 8" in message
  assert "--config.checkpoint.on_write_error=retry" in message
  assert _steps_on_disk(tmp_path) == ["4", "8"]  # both kept (keep=2), nothing of 12 (no temporary folder)
  monkeypatch.undo()  # space freed
  capsys.readouterr()
  assert train_lib.train(cfg, str(tmp_path))["step"] == 16
  assert "resumed from" in capsys.readouterr().out
  want_state, want_losses = straight16
  _assert_same_state(want_state, _final_state(cfg, tmp_path)[1])
  assert [r.get("train/loss") for r in read_metrics(tmp_path)] == want_losses  # each step once


def test_with_on_write_error_retry_an_async_failure_is_reported_and_training_goes_on(
    tmp_path, monkeypatch, capsys, straight16):
  cfg = _cfg16()
  cfg.checkpoint.async_save, cfg.checkpoint.on_write_error = True, "retry"
  _fail_meta_writes(monkeypatch, {8}, errno.EACCES)
  assert train_lib.train(cfg, str(tmp_path))["step"] == 16
  out = capsys.readouterr().out
  assert out.count("could not be written") == 1, out
  assert "checkpoints/8 could not be written: Permission denied" in out and "Training goes on" in out
  assert _steps_on_disk(tmp_path) == ["12", "16"]
  _assert_same_state(straight16[0], _final_state(cfg, tmp_path)[1])


def test_the_final_checkpoint_failing_in_retry_mode_is_an_error_not_done(tmp_path, monkeypatch):
  cfg = _cfg16()
  cfg.budget.value, cfg.checkpoint.on_write_error = 8, "retry"
  _fail_meta_writes(monkeypatch, {8})
  with pytest.raises(ckpt_lib.CheckpointWriteError, match=r"checkpoints/8 could not be written.*resume from step 4"):
    train_lib.train(cfg, str(tmp_path))
  assert _steps_on_disk(tmp_path) == ["4"]


# --- metrics.jsonl and TensorBoard writes ------------------------------------------------------

class _FullDisk:
  """``open`` for metrics.py whose appends write half their data and raise ENOSPC while
  ``full`` is set: a torn write."""

  def __init__(self):
    self.full = False

  def __call__(self, path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)  # pylint: disable=consider-using-with
    if not (self.full and mode.startswith("a")):
      return f
    disk = self

    class Torn:
      def __enter__(self):
        return self

      def __exit__(self, *exc):
        f.close()
        return False

      def write(self, data):
        f.write(data[:len(data) // 2])
        f.flush()
        if disk.full:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return Torn()


def test_a_full_disk_while_logging_warns_keeps_training_and_loses_no_row(tmp_path, monkeypatch, capsys):
  tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every, cfg.log.tensorboard = 12, 6, 1, True
  disk = _FullDisk()
  monkeypatch.setattr(metrics_lib, "open", disk, raising=False)
  original_write = metrics_lib.MetricWriter.write

  def write(self, step, metrics):
    disk.full = 3 <= step <= 8  # full from step 3; space freed at step 9
    original_write(self, step, metrics)
  monkeypatch.setattr(metrics_lib.MetricWriter, "write", write)
  assert train_lib.train(cfg, str(tmp_path))["step"] == 12
  out = capsys.readouterr().out
  assert out.count("warning: cannot write") == 2, out  # once per file: metrics.jsonl and the event file
  assert "metrics.jsonl: No space left on device (at step 3). Training goes on" in out
  assert "metrics.jsonl can be written again: the 7 rows held since then (steps 3-9) are in it" in out
  rows = read_metrics(tmp_path)  # no torn line: every line is JSON
  assert [r["step"] for r in rows] == list(range(13))
  acc = tb.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
  np.testing.assert_allclose([e.value for e in acc.Scalars("train/loss")], [r["train/loss"] for r in rows[1:]],
                             rtol=1e-6)


# --- the token cache of files sources ----------------------------------------------------------

def test_a_failed_token_cache_write_leaves_nothing_a_later_run_trusts(tmp_path, monkeypatch):
  from test_files import write_corpus  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(write_corpus(str(tmp_path / "corpus"), "jsonl")))
  read_args, vocab = {"fmt": "jsonl", "field": "body"}, vocab_lib.load_vocabulary()
  cache_dir = str(tmp_path / "cache")
  real_savez = np.savez

  def savez_on_a_full_disk(f, **arrays):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(token_cache.np, "savez", savez_on_a_full_disk)
  with pytest.raises(token_cache.CacheWriteError, match=r"token cache .* could not be written: No space left on "
                                                        r"device \(writing .*documents.npz\)\. Nothing of it was kept"):
    token_cache.load_or_build(paths, read_args, vocab, cache_dir, progress=False)
  assert os.listdir(cache_dir) == []  # no partial folder, no folder a later run would take
  monkeypatch.setattr(token_cache.np, "savez", real_savez)
  built = token_cache.load_or_build(paths, read_args, vocab, cache_dir, progress=False)
  tokens = np.array(built.tokens)
  # A cache damaged after it was built (tokens.bin cut short) is set aside and built again.
  os.truncate(os.path.join(built.path, "tokens.bin"), 10)
  rebuilt = token_cache.load_or_build(paths, read_args, vocab, cache_dir, progress=False)
  np.testing.assert_array_equal(np.array(rebuilt.tokens), tokens)
  assert sorted(os.listdir(cache_dir)) == [os.path.basename(built.path)]


# --- advice that works when followed ------------------------------------------------------------

def _advised_overrides(message: str) -> list[str]:
  return [m.removeprefix("--") for m in re.findall(r"--config\.[\w.]+=\S+?(?=[\s,;)]|$)", message)]


def test_the_divergence_advice_when_followed_resumes_and_is_recorded(tmp_path, capsys):
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every, cfg.eval.at_start = 12, 2, 1, False
  cfg.schedule.peak = 300.0  # diverges at step 10, after the checkpoint of step 8
  with pytest.raises(train_lib.TrainingError) as err:
    train_lib.train(cfg, str(tmp_path))
  message = str(err.value)
  assert "non-finite" in message and "latest: step 8" in message and "allow_config_changes=True" in message
  advised = [o for o in _advised_overrides(message) if o.startswith(("config.schedule.peak", "config.train."))]
  assert advised == ["config.schedule.peak=30", "config.train.allow_config_changes=True"], message
  capsys.readouterr()
  followed = config_lib.apply_overrides(cfg, advised)  # "re-run the same command with ..."
  assert train_lib.train(followed, str(tmp_path))["step"] == 12  # accepted, and it trains on at 30
  assert "resumed from" in capsys.readouterr().out
  with open(tmp_path / "starts.jsonl") as f:
    starts = [json.loads(line) for line in f]
  assert starts[-1]["step"] == 8 and starts[-1]["changes"] == {"schedule.peak": [300.0, 30.0]}


def test_the_divergence_advice_without_a_checkpoint_says_so_and_starts_afresh(tmp_path):
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every, cfg.eval.at_start = 12, 0, 1, False
  cfg.schedule.peak = 1000.0
  with pytest.raises(train_lib.TrainingError) as err:
    train_lib.train(cfg, str(tmp_path))
  message = str(err.value)
  assert "No checkpoint was written yet" in message and "None" not in message
  assert "allow_config_changes" not in message  # a fresh start needs no permission
  followed = config_lib.apply_overrides(cfg, [o for o in _advised_overrides(message) if "schedule.peak" in o])
  assert followed.schedule.peak == 100.0
  assert train_lib.train(followed, str(tmp_path))["step"] == 12


# --- bad input, the real problem named ---------------------------------------------------------

@pytest.mark.parametrize("name", ["spm.model", "tokenizer.json", "vocab.txt", "folder/spiece.model"])
def test_an_empty_vocabulary_file_is_called_empty(tmp_path, name):
  path = tmp_path / name
  path.parent.mkdir(exist_ok=True)
  path.write_bytes(b"")
  given = str(path.parent if name.startswith("folder") else path)
  with pytest.raises(ValueError, match=r"is empty \(the file holds no data"):
    vocab_lib.load_vocabulary(given, 100)
  if name.endswith(".model"):
    with pytest.raises(ValueError, match=r"is empty") as err:
      vocab_lib.Vocabulary(str(path))
    assert "special ids" not in str(err.value)


def _config_error(*overrides) -> str:
  with pytest.raises(SystemExit) as err:
    cli.parse_flags(["main", f"--config={os.path.join(ROOT, 'configs', 'ul2.py')}:tiny", *overrides])
  return str(err.value.code)


def test_config_errors_name_the_valid_sections_and_fields_in_plain_text():
  message = _config_error("--config.foo.bar=1")
  assert message.startswith("config error: unknown config section 'foo' (in --config.foo.bar=1).")
  assert "The sections are: budget, checkpoint, data," in message and "outside a section are: seed" in message
  message = _config_error("--config.schedule.peek=1")
  assert 'Did you mean "peak"?' in message and "The fields of schedule are: final, name, peak, warmup." in message
  assert "\\'" not in message and "\\n" not in message
  assert "is a section, not a field" in _config_error("--config.schedule=1")
  assert "is a value, not a section" in _config_error("--config.schedule.peak.x=1")
  # ml_collections' own KeyErrors (when the pre-check cannot run) are printed, not repr'd.
  wrapped = AttributeError(KeyError("'peek'\nDid you mean \"peak\" instead of \"peek\"?"))
  assert cli._innermost_message(wrapped) == "'peek'\nDid you mean \"peak\" instead of \"peek\"?"  # pylint: disable=protected-access


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  cfg = quiet(load_config("ul2", "tiny"))
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"--workdir .*file is a file, not a folder"):
    train_lib.train(cfg, str(tmp_path / "file"))
  with pytest.raises(NotADirectoryError, match=r"lies under .*file, which is a file"):
    train_lib.train(cfg, str(tmp_path / "file" / "run"))


def _small_state():
  rng = np.random.default_rng(0)
  return {f"w{i}": jax.numpy.asarray(rng.normal(size=(64, 256)), jax.numpy.float32) for i in range(4)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.mark.parametrize("damage,names", [
    (lambda d: open(os.path.join(d, "meta", "metadata"), "wb").close(), r"meta/metadata is empty \(0 bytes\)"),
    (lambda d: open(os.path.join(d, "meta", "metadata"), "wb").write(b'{"step": 2, "da'),
     r"meta/metadata is not valid JSON .* truncated or overwritten"),
])
def test_a_damaged_meta_file_is_named_with_what_is_wrong(tmp_path, capsys, damage, names):
  state = _small_state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), 0, False)
  for step in (1, 2):
    checkpointer.save(step, state, {"step": step})
  damage(str(tmp_path / "checkpoints" / "2"))
  assert checkpointer.restore_latest(_abstract(state), {})[0] == 1
  checkpointer.close()
  out = capsys.readouterr().out
  assert re.search(f"checkpoints/2 is corrupt: .*{names}", out), out
  assert "StopIteration" not in out


def test_after_a_corrupt_checkpoint_falls_back_nothing_is_printed_by_what_orbax_left(
    tmp_path, capfd, monkeypatch):
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.object)))
  state = _small_state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), 0, False)
  for step in (1, 2):
    checkpointer.save(step, state, {"step": step})
  data = max(glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**" / "d" / "*"), recursive=True),
             key=os.path.getsize)
  os.truncate(data, os.path.getsize(data) // 2)
  step, restored, _, _ = checkpointer.restore_latest(_abstract(state), {})
  checkpointer.close()
  gc.collect()
  assert step == 1
  _assert_same_state(state, restored)
  captured = capfd.readouterr()
  assert "falling back to checkpoint" in captured.out
  assert unraisable == []  # (without the filter: <coroutine object _read_array_index_and_device_put ...>)
  assert "Traceback" not in captured.err and "Exception ignored" not in captured.err, captured.err


def test_the_cli_starts_no_tpu_runtime_on_a_machine_without_one(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
  monkeypatch.setattr(cli, "tpu_present", lambda: False)
  monkeypatch.setattr(cli.glob, "glob", lambda pattern: [])  # no GPU device files either
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # (this process's backends are up already)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else real_find_spec(name))
  assert cli.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "")  # the user's choice (here: "any") is left alone
  assert not cli.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == ""
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(cli, "tpu_present", lambda: True)
  assert not cli.skip_absent_tpu() and "JAX_PLATFORMS" not in os.environ
