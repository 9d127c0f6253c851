"""The ``--config`` flag of the commands (``main``, ``aot``) and their flag parsing, which turns
config errors (a missing file, an unknown preset, section or field, a bad value) into one clear
message; ``skip_absent_tpu`` keeps libtpu from starting (and printing its start-up errors) on a
machine without a TPU."""
import difflib
import glob
import importlib.util
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
    problem = override_problem(config_arg, argv)
    if problem:
      sys.exit(f"config error: {problem}")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    message = _innermost_message(e)
    if "Traceback (most recent call last)" in message:  # raised inside the config file's get_config
      lines = [line.strip() for line in message.splitlines() if line.strip()]
      sys.exit(f"config error: --config={config_arg}: {lines[-1].split(': ', 1)[-1]}")
    sys.exit(f"config error: {message}\n(config fields are listed in raptr_jax/config.py; "
             "override them as --config.section.field=value)")


def _innermost_message(e: BaseException) -> str:
  """The text of ``e``: a KeyError's own message (not its repr, which escapes quotes and line
  breaks), unwrapped where ml_collections wraps one error in another."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  if isinstance(e, KeyError) and e.args:
    return str(e.args[0])
  return str(e)


def _overrides(argv) -> list[tuple[str, str]]:
  """(dotted key, the argument as written) of every ``--config.KEY[=VALUE]`` in ``argv``."""
  found = []
  for arg in argv[1:]:
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        found.append((arg[len(prefix):].split("=", 1)[0], arg))
  return found


def _is_section(node) -> bool:
  return hasattr(node, "keys")


def _listing(node, where: str = "") -> str:
  """'The sections are: a, b; the fields outside a section: c' (of the top level), or 'The
  fields of WHERE are: ...' of a config node."""
  names = sorted(node.keys())
  sections = [n for n in names if _is_section(node[n])]
  fields = [n for n in names if not _is_section(node[n])]
  of = f" of {where}" if where else ""
  parts = []
  if sections:
    parts.append(f"the sections{of} are: {', '.join(sections)}")
  if fields:
    parts.append(f"the fields{' outside a section' if not where and sections else of} are: {', '.join(fields)}")
  text = "; ".join(parts)
  return text[:1].upper() + text[1:]


def _unknown(node, where: str, name: str, is_section: bool, arg: str) -> str:
  full = f"{where}.{name}" if where else name
  text = f"unknown config {'section' if is_section else 'field'} {full!r} (in {arg})."
  close = difflib.get_close_matches(name, list(node.keys()), n=1, cutoff=0.6)
  if close:
    text += f' Did you mean "{close[0]}"?'
  return f"{text} {_listing(node, where)}."


def check_override(cfg, key: str, arg: str) -> str | None:
  """Why ``--config.KEY`` cannot apply to ``cfg`` (an unknown section or field, a value used
  as a section, a section given a value), or None when it names a field."""
  node, where = cfg, ""
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not _is_section(node):
      return (f"config field {where!r} is a value, not a section, so {arg} names nothing; set it as "
              f"--config.{where}=VALUE")
    if part not in node:
      return _unknown(node, where, part, i < len(parts) - 1, arg)
    node, where = node[part], f"{where}.{part}" if where else part
  if _is_section(node):
    return (f"config {where!r} is a section, not a field ({arg}); set its fields, e.g. "
            f"--config.{where}.{sorted(node.keys())[0]}=VALUE. {_listing(node, where)}.")
  return None


def override_problem(config_arg: str, argv) -> str | None:
  """The first ``--config.KEY`` override in ``argv`` that does not name a field of the config
  file's config, explained (None when all do, or the config file itself fails: its own error
  is reported by the flag parsing)."""
  overrides = _overrides(argv)
  if not overrides:
    return None
  from raptr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_lib.import_config(config_arg)
  except Exception:  # pylint: disable=broad-except  (reported with the flags' own message)
    return None
  for key, arg in overrides:
    problem = check_override(cfg, key, arg)
    if problem:
      return problem
  return None


def tpu_present() -> bool:
  """Whether this machine has a TPU: a Google TPU on the PCI bus (how jax itself decides whether
  it runs on a Cloud TPU VM), or TPU device files (/dev/accel*, /dev/vfio/<n>)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return True
  except Exception:  # pylint: disable=broad-except  (a jax without it: the device files decide)
    pass
  return bool(glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()])


def skip_absent_tpu() -> bool:
  """On a machine without a TPU whose jax would still start libtpu (installed by the ``tpu`` and
  ``test`` extras, e.g. for the AOT compiles), restricts jax to the CPU, so that libtpu's
  start-up errors (``could not determine TPU accelerator type``, ``TPU_WORKER_HOSTNAMES``) are
  not printed. Changes nothing when JAX_PLATFORMS is set, JAX_FORCE_TPU_INIT or
  TPU_ACCELERATOR_TYPE is, libtpu is not installed, or a GPU is visible (its plugin decides).
  Returns whether it restricted jax. Call it before jax starts its backends."""
  if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ or os.environ.get("TPU_ACCELERATOR_TYPE"):
    return False
  if importlib.util.find_spec("libtpu") is None or tpu_present():
    return False
  if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):  # a GPU: leave the choice to jax
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"  # and for the processes this one starts
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return True
