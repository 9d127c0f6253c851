"""The ``--config`` flag of the commands (``main``, ``aot``) and their flag parsing, which turns
config errors (a missing file, an unknown preset or field, a bad value) into one clear line."""
import os
import sys

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ul2.py:tiny.", lock_config=True)


def _config_file_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv):
  """absl flag parsing with config errors (missing file, unknown preset, unknown field, bad
  value) as one clear line instead of a traceback."""
  config_arg = _config_file_arg(argv)
  if config_arg is not None:
    path = config_arg.partition(":")[0]
    if not os.path.isfile(path):
      shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
      names = sorted(f for f in os.listdir(shipped) if f.endswith(".py")) if os.path.isdir(shipped) else []
      sys.exit(f"config error: config file {path!r} not found (relative to {os.getcwd()})"
               + (f"; the shipped configs are in {shipped}: {', '.join(names)}" if names else ""))
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if "Traceback (most recent call last)" in message:  # raised inside the config file's get_config
      lines = [line.strip() for line in message.splitlines() if line.strip()]
      sys.exit(f"config error: --config={config_arg}: {lines[-1].split(': ', 1)[-1]}")
    sys.exit(f"config error: {message}\n(config fields are listed in raptr_jax/config.py; "
             "override them as --config.section.field=value)")
