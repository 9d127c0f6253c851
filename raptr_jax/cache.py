"""Where raptr_jax keeps what it builds or fetches once: ``$XDG_CACHE_HOME/raptr_jax/<kind>``
(default ``~/.cache/raptr_jax/<kind>``), unless the config names a folder."""
import os


def cache_path(kind: str, configured: str = "") -> str:
  if configured:
    return os.path.expanduser(configured)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "raptr_jax", kind)
