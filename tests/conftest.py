import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, preset: str = ""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.fixture
def tiny_config():
  cfg = load_config("ul2", "tiny")
  cfg.log.progress_bar = False
  cfg.log.tensorboard = False
  cfg.checkpoint.async_save = False
  return cfg
