import os

import pytest

from raptr_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, preset: str = ""):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  return main.load_config(f"{path}:{preset}" if preset else path)


def quiet(cfg):
  """No progress bar, no TensorBoard, synchronous checkpoints: what tests want."""
  cfg.log.progress_bar = False
  cfg.log.tensorboard = False
  cfg.checkpoint.async_save = False
  return cfg


@pytest.fixture
def tiny_config():
  return quiet(load_config("ul2", "tiny"))
