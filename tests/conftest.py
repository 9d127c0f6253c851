import os
import tempfile

# The suite runs on CPU. The test extras install libtpu (tests/test_aot.py compiles for TPU
# slices), which jax would otherwise try to start as a backend in every test and subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

from raptr_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests build the same tiny models over and over (every run compiles its init and steps): a
# persistent compilation cache, one folder per xdist worker (no two writers), compiles each
# program once per worker and keeps it for the next session (halves the suite on 2 cores).
# RAPTR_TEST_JAX_CACHE="" turns it off; a path moves it.
_cache = os.environ.get("RAPTR_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "raptr_jax_test_cache"))
if _cache:
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(_cache, os.environ.get("PYTEST_XDIST_WORKER", "main")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_config(name: str, preset: str = ""):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  return config_lib.load_config(f"{path}:{preset}" if preset else path)


def quiet(cfg):
  """No progress bar, no TensorBoard, synchronous checkpoints: what tests want."""
  cfg.log.progress_bar = False
  cfg.log.tensorboard = False
  cfg.checkpoint.async_save = False
  return cfg


@pytest.fixture
def tiny_config():
  return quiet(load_config("ul2", "tiny"))


def register_method(monkeypatch, name, stages):
  """Registers a method for one test (one registry line, as a user adds one): its plan is
  ``stages(cfg)``; run configs select it with ``method.name = name``."""
  from raptr_jax import methods  # pylint: disable=g-import-not-at-top
  cls = type(name, (methods.Method,), {"name": name, "stages": lambda self, cfg, model_cfg: stages(cfg)})
  monkeypatch.setitem(methods.REGISTRY, name, cls)
  return cls


def straight_and_resumed(cfg, tmp_path, stop: int, keys):
  """Trains ``cfg`` uninterrupted and again killed after step ``stop`` then resumed; asserts
  both logged the same steps and the same values of ``keys``; returns the straight run's rows."""
  from raptr_jax import train as train_lib
  from raptr_jax.metrics import read_metrics
  train_lib.train(cfg, str(tmp_path / "straight"))
  cfg.train.stop_at_step = stop
  assert train_lib.train(cfg, str(tmp_path / "killed"))["stopped"]
  cfg.train.stop_at_step = 0
  train_lib.train(cfg, str(tmp_path / "killed"))
  straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
  assert [r["step"] for r in resumed] == [r["step"] for r in straight]
  for a, b in zip(straight, resumed):
    for key in keys:
      assert a.get(key) == b.get(key), (a["step"], key)
  return straight


def assert_resumes_exactly(build, skip: int, more):
  """Reads ``skip`` batches of the stream ``build()`` makes, saves its state, reads on (``more``
  batches, or while ``more(stream, batches_read)``), and checks that a fresh stream set to the
  saved state yields exactly those batches."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  stream = build()
  for _ in range(skip):
    stream.next_batch()
  state = stream.get_state()
  want = []
  while (len(want) < more) if isinstance(more, int) else more(stream, len(want)):
    want.append(stream.next_batch())
  resumed = build()
  resumed.set_state(state)
  for w in want:
    got = resumed.next_batch()
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
