"""What every benchmark's ``--json=FILE`` report carries: the machine and software it ran on,
its command, and its figures. ``run_all.py`` collects them into one report."""
import json
import os
import platform
import sys


def environment() -> dict:
  """Device, counts and versions (jax, jaxlib, the backend's own: CUDA / libtpu / XLA CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"platform": device.platform, "device": device.device_kind, "devices": jax.device_count(),
          "processes": jax.process_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          # CUDA / cuDNN versions on GPUs, libtpu's build on TPUs
          "backend_version": getattr(device.client, "platform_version", ""), "libraries": _libraries(),
          "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}


def _libraries() -> dict:
  """Versions of the accelerator plugins installed (jax-cuda*-plugin, libtpu), when present."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for dist in metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(("jax-cuda", "jax_cuda", "libtpu", "nvidia-cudnn", "nvidia-cuda-runtime")):
      out[name] = dist.version
  return out


def write(path: str, figures: dict) -> None:
  """Writes ``figures`` with the environment and the command line to ``path`` (no-op for "")."""
  if not path:
    return
  record = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "environment": environment(),
            "figures": figures}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=float)
  os.replace(tmp, path)
