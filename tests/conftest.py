import os

import pytest

from raptr_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
